//! The record codec in memory: frames sealed by an [`Encoder`], the ciphertext cut,
//! reordered, replayed, flipped or truncated, fed to a [`Decoder`]. Whatever it is fed, a
//! decoder gives the frames that were sealed, in order, and then a clean end or an error:
//! never a frame that was not sent, never a panic.

use super::*;
use crate::cipher::Cipher;
use crate::protocol::{Op, ReplyHeader, RequestHeader};
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    max_transfer: 300_000,
};

/// A sealing and an opening side of one direction, the verdict already sealed.
fn codecs(cipher: Cipher) -> (Encoder, Decoder) {
    let key = [7u8; 32];
    let mut enc = Encoder::new(RecordKey::new(cipher, &key));
    enc.seal_parts(&[&handshake::verdict_record(&Ok(()))]);
    (enc, Decoder::new(RecordKey::new(cipher, &key)))
}

/// Everything sealed, taken as the socket would.
fn take(enc: &mut Encoder) -> Vec<u8> {
    let wire = enc.pending().to_vec();
    enc.consume(wire.len());
    wire
}

/// A frame of `len` payload bytes: a WRITE request, or for odd `txid` a READ reply.
fn owned(txid: u64, len: usize) -> OwnedFrame {
    let h = RequestHeader {
        op: Op::Write,
        flags: 0,
        txid,
        floor: 1,
        offset: 0,
        length: len as u32,
    };
    let payload = (0..len).map(|i| (i as u64 * 31 + txid) as u8).collect();
    let head = if txid.is_multiple_of(2) {
        Head::Request(h)
    } else {
        Head::Reply(ReplyHeader { txid, status: 0 })
    };
    OwnedFrame { head, payload }
}

/// The frames of `sizes` sealed in batches, each frame ending a batch where `ends` says.
/// A batch is either encoded whole, so records cut frames anywhere, or (every other one)
/// sealed as [`Outgoing`] parts, large payloads in records of their own.
fn seal_frames(enc: &mut Encoder, sizes: &[usize], ends: &[bool]) -> Vec<OwnedFrame> {
    let frames: Vec<OwnedFrame> = (0..sizes.len())
        .map(|i| owned(i as u64 + 1, sizes[i]))
        .collect();
    let mut out = Outgoing::default();
    let mut start = 0;
    for i in 0..frames.len() {
        if !ends[i % ends.len()] && i + 1 < frames.len() {
            continue;
        }
        out.clear();
        for (j, f) in frames[start..=i].iter().enumerate() {
            let whole = i % 2 == 0 || f.payload.len() < Outgoing::INLINE;
            let payload = if whole { f.payload.as_slice() } else { &[] };
            let staged = out.staged();
            match f.head {
                Head::Request(h) if whole => protocol::encode_request(staged, &h, payload),
                Head::Request(h) => protocol::encode_request_head(staged, &h, f.payload.len()),
                Head::Reply(h) if whole => protocol::encode_reply(staged, &h, payload),
                Head::Reply(h) => protocol::encode_reply_head(staged, &h, f.payload.len()),
                Head::Resize(size) => protocol::encode_resize(staged, size),
            }
            if !whole {
                out.payload(j);
            }
        }
        enc.seal_parts(&out.parts(|j| &frames[start + j].payload));
        start = i + 1;
    }
    frames
}

/// What a receiver gets from `wire` fed in pieces that `cut` sizes: the frames, through
/// `buffer`/`frame` or (if `owned`) `start_payload`/`fill`, then how the stream ended.
fn receive(
    wire: &[u8],
    mut cut: impl FnMut() -> usize,
    owned: bool,
    cipher: Cipher,
) -> (Vec<OwnedFrame>, Result<(), ChannelError>) {
    let (_, mut dec) = codecs(cipher);
    let pool = Pool::new(1 << 20);
    let mut at = 0;
    let mut more = |dec: &mut Decoder| {
        if at == wire.len() {
            return false;
        }
        let n = cut().clamp(1, wire.len() - at);
        at += dec.feed(&wire[at..at + n]);
        true
    };
    let mut frames = Vec::new();
    loop {
        let at_least = if owned { HEAD_MAX } else { usize::MAX };
        let total = match dec.buffer(&LIMITS, at_least) {
            Err(e) => return (frames, Err(e)),
            Ok(None) if more(&mut dec) => continue,
            Ok(None) => return (frames, dec.end_of_stream()),
            Ok(Some(total)) => total,
        };
        if !owned {
            match dec.frame(&LIMITS) {
                Ok(Frame::Request(h, d)) => frames.push(OwnedFrame {
                    head: Head::Request(h),
                    payload: d.to_vec(),
                }),
                Ok(Frame::Reply(h, d)) => frames.push(OwnedFrame {
                    head: Head::Reply(h),
                    payload: d.to_vec(),
                }),
                Ok(other) => panic!("a frame that was never sent: {other:?}"),
                Err(e) => return (frames, Err(e)),
            }
            continue;
        }
        let (head, head_len) = match dec.head(&LIMITS) {
            Ok(v) => v,
            Err(e) => return (frames, Err(e)),
        };
        let mut filling = dec.start_payload(head, head_len, total, &pool);
        loop {
            match dec.fill(&mut filling) {
                Ok(true) => break,
                Ok(false) if more(&mut dec) => {}
                Ok(false) => return (frames, Err(dec.end_of_stream().unwrap_err())),
                Err(e) => return (frames, Err(e)),
            }
        }
        frames.push(filling.into_frame());
    }
}

/// The frames received are the first ones sent, exactly.
fn assert_prefix(got: &[OwnedFrame], sent: &[OwnedFrame]) {
    assert!(
        got.len() <= sent.len(),
        "{} frames of {}",
        got.len(),
        sent.len()
    );
    for (i, (g, s)) in got.iter().zip(sent).enumerate() {
        assert_eq!(g.head, s.head, "frame {i}");
        assert!(g.payload == s.payload, "frame {i}: payload");
    }
}

/// The byte ranges of the records of `wire`.
fn records(wire: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 2 <= wire.len() {
        let end = at + 2 + u16::from_be_bytes([wire[at], wire[at + 1]]) as usize;
        out.push(at..end);
        at = end;
    }
    out
}

#[test]
fn frames_of_every_size_cross_records_intact_both_ways_of_receiving() {
    let sizes: Vec<usize> = (0..120)
        .map(|i| match i % 5 {
            0 => (i * 7919 + i * i * 131) % 300_000,
            1 => i * 37,
            2 => RECORD_PLAINTEXT * (i % 4) + i % 3,
            3 => Outgoing::INLINE + i,
            _ => 0,
        })
        .collect();
    let ends: Vec<bool> = (0..13).map(|i| i % 3 == 0 || i == 7).collect();
    for cipher in Cipher::ALL {
        let (mut enc, _) = codecs(cipher);
        let sent = seal_frames(&mut enc, &sizes, &ends);
        let wire = take(&mut enc);
        for owned in [false, true] {
            let mut n = 0usize;
            // Pieces from one byte to several records.
            let cut = || {
                n += 1;
                (n * 104_729) % 200_000
            };
            let (got, end) = receive(&wire, cut, owned, cipher);
            assert_prefix(&got, &sent);
            assert_eq!(got.len(), sent.len());
            end.unwrap();
        }
    }
}

#[test]
fn input_split_at_every_byte_decodes_the_same() {
    let (mut enc, _) = codecs(Cipher::ChaChaPoly);
    let sent = seal_frames(&mut enc, &[0, 3, 40, 1, 100], &[true, false]);
    let wire = take(&mut enc);
    for split in 0..=wire.len() {
        for owned in [false, true] {
            let mut first = true;
            let cut = || {
                let n = if first { split } else { usize::MAX };
                first = false;
                n
            };
            let (got, end) = receive(&wire, cut, owned, Cipher::ChaChaPoly);
            assert_eq!(got.len(), sent.len(), "split at {split}");
            assert_prefix(&got, &sent);
            end.unwrap();
        }
    }
}

#[test]
fn limits_are_enforced_from_the_head() {
    let limits = Limits { max_transfer: 4096 };
    let mut h = RequestHeader {
        op: Op::Read,
        flags: 0,
        txid: 1,
        floor: 1,
        offset: 0,
        length: 8192,
    };
    let mut read_over = Vec::new();
    protocol::encode_request_head(&mut read_over, &h, 0);
    h.op = Op::Write;
    h.length = 4096;
    let mut short_write = Vec::new();
    protocol::encode_request_head(&mut short_write, &h, 4000);
    let cases: [(&[u8], &str); 3] = [
        // A frame that declares 2 GiB: refused from its length alone.
        (&[0x7f, 0xff, 0xff, 0xff, 3], "over the limit"),
        // A read over the maximum transfer, a write whose frame holds less than its length.
        (&read_over, "maximum transfer"),
        (&short_write, "payload bytes"),
    ];
    for (frame, expect) in cases {
        let (mut enc, mut dec) = codecs(Cipher::ChaChaPoly);
        enc.seal_parts(&[frame]);
        dec.feed(&take(&mut enc));
        let err = dec
            .buffer(&limits, HEAD_MAX)
            .and_then(|_| dec.head(&limits))
            .unwrap_err();
        assert!(err.to_string().contains(expect), "{err}");
    }
}

#[test]
fn a_negotiation_frame_is_no_owned_frame() {
    let (mut enc, mut dec) = codecs(Cipher::AesGcm);
    let mut hello = Vec::new();
    let h = protocol::Hello {
        version: 1,
        export: "disk".into(),
        access: protocol::Access::ReadOnly,
        session: None,
        max_transfer: 4096,
        features: 0,
    };
    protocol::encode_hello(&mut hello, &h);
    enc.seal_parts(&[&hello]);
    dec.feed(&take(&mut enc));
    let limits = Limits { max_transfer: 4096 };
    assert!(dec.buffer(&limits, HEAD_MAX).unwrap().is_some());
    assert!(dec.head(&limits).is_err());
}

#[test]
fn a_stream_ending_inside_an_owned_payload_is_an_error() {
    let (mut enc, _) = codecs(Cipher::ChaChaPoly);
    let sent = seal_frames(&mut enc, &[200_000], &[true]);
    let wire = take(&mut enc);
    let cut = records(&wire)[3].start;
    let (got, end) = receive(&wire[..cut], || usize::MAX, true, Cipher::ChaChaPoly);
    assert!(got.is_empty() && sent.len() == 1);
    let err = end.unwrap_err();
    assert!(err.to_string().contains("inside a frame"), "{err}");
}

#[test]
fn an_abandoned_payload_leaves_the_decoder_unusable() {
    let (mut enc, mut dec) = codecs(Cipher::ChaChaPoly);
    seal_frames(&mut enc, &[200_000, 10], &[true]);
    let wire = take(&mut enc);
    dec.feed(&wire[..100_000]);
    let total = dec.buffer(&LIMITS, HEAD_MAX).unwrap().unwrap();
    let (head, head_len) = dec.head(&LIMITS).unwrap();
    let filling = dec.start_payload(head, head_len, total, &Pool::new(1 << 20));
    drop(filling);
    let err = dec.buffer(&LIMITS, HEAD_MAX).unwrap_err();
    assert!(err.to_string().contains("abandoned"), "{err}");
}

#[test]
fn a_refusing_verdict_is_the_first_receive_s_error() {
    let key = [3u8; 32];
    let mut enc = Encoder::new(RecordKey::new(Cipher::AesGcm, &key));
    let mut dec = Decoder::new(RecordKey::new(Cipher::AesGcm, &key));
    let refusal = Err((
        handshake::Refusal::ClientKey,
        "not in authorized keys".into(),
    ));
    enc.seal_parts(&[&handshake::verdict_record(&refusal), b"more"]);
    dec.feed(&take(&mut enc));
    match dec.buffer(&LIMITS, 1) {
        Err(ChannelError::Refused(handshake::Refusal::ClientKey, why)) => {
            assert_eq!(why, "not in authorized keys")
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
}

#[test]
fn a_payload_sealed_apart_is_the_stream_it_would_have_been_and_opens_again() {
    for cipher in Cipher::ALL {
        let frame = owned(2, 150_000);
        let mut head = Vec::new();
        let Head::Request(h) = &frame.head else {
            unreachable!()
        };
        protocol::encode_request_head(&mut head, h, frame.payload.len());
        let (mut together, _) = codecs(cipher);
        together.seal_parts(&[&head, &frame.payload]);
        let (mut apart, _) = codecs(cipher);
        apart.seal_parts(&[&head]);
        let sealed = apart.seal_apart(&frame.payload, vec![0xAA; 7]);
        let mut wire = take(&mut apart);
        wire.extend_from_slice(sealed.records());
        assert_eq!(wire, take(&mut together), "{cipher}");
        // What follows continues the stream's nonces.
        apart.seal_parts(&[&head]);
        together.seal_parts(&[&head]);
        assert_eq!(take(&mut apart), take(&mut together), "{cipher}");

        let (got, end) = receive(&wire, || 40_000, true, cipher);
        assert!(end.is_ok(), "{cipher}: {end:?}");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].head, frame.head);
        assert!(
            got[0].payload == frame.payload,
            "{cipher}: the payload arrives"
        );

        let mut plain = vec![1; 3];
        sealed.open(&mut plain).unwrap();
        assert!(plain == frame.payload, "{cipher}: opens to the payload");
        assert_eq!(sealed.plain_len(), frame.payload.len());
        let mut records = sealed.into_buffer();
        records[70_000] ^= 1;
        let key = Arc::new(RecordKey::new(cipher, &[7u8; 32]));
        let tampered = Sealed {
            records,
            key,
            nonce: 2,
            len: frame.payload.len(),
        };
        assert_eq!(tampered.open(&mut plain), Err(Unauthentic), "{cipher}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn frames_decode_exactly_whatever_the_record_and_read_boundaries(
        sizes in proptest::collection::vec(
            prop_oneof![0usize..100, 0usize..20_000, 0usize..300_000], 1..16),
        ends in proptest::collection::vec(any::<bool>(), 1..8),
        cuts in proptest::collection::vec(1usize..150_000, 1..16),
        owned in any::<bool>(),
    ) {
        let (mut enc, _) = codecs(Cipher::ChaChaPoly);
        let sent = seal_frames(&mut enc, &sizes, &ends);
        let wire = take(&mut enc);
        let mut i = 0;
        let cut = || { i += 1; cuts[i % cuts.len()] };
        let (got, end) = receive(&wire, cut, owned, Cipher::ChaChaPoly);
        assert_prefix(&got, &sent);
        prop_assert_eq!(got.len(), sent.len());
        prop_assert!(end.is_ok());
    }

    #[test]
    fn a_flipped_bit_is_never_a_wrong_frame(
        sizes in proptest::collection::vec(0usize..70_000, 1..6),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        owned in any::<bool>(),
    ) {
        let (mut enc, _) = codecs(Cipher::AesGcm);
        let sent = seal_frames(&mut enc, &sizes, &[true, false]);
        let mut wire = take(&mut enc);
        let at = at.index(wire.len());
        wire[at] ^= 1 << bit;
        let (got, end) = receive(&wire, || 30_000, owned, Cipher::AesGcm);
        assert_prefix(&got, &sent);
        prop_assert!(end.is_err(), "a flip at {} went unnoticed", at);
    }

    #[test]
    fn a_truncated_stream_gives_a_prefix_then_ends(
        sizes in proptest::collection::vec(0usize..70_000, 1..6),
        keep in any::<prop::sample::Index>(),
        owned in any::<bool>(),
    ) {
        let (mut enc, _) = codecs(Cipher::ChaChaPoly);
        let sent = seal_frames(&mut enc, &sizes, &[true, false]);
        let wire = take(&mut enc);
        let keep = keep.index(wire.len());
        let (got, end) = receive(&wire[..keep], || 50_000, owned, Cipher::ChaChaPoly);
        assert_prefix(&got, &sent);
        prop_assert!(got.len() < sent.len());
        // A clean end only where the cut falls between records and between frames.
        if end.is_ok() {
            prop_assert!(records(&wire).iter().any(|r| r.end == keep));
        }
    }

    #[test]
    fn a_reordered_or_replayed_record_is_refused(
        sizes in proptest::collection::vec(1usize..70_000, 2..6),
        pick in any::<(prop::sample::Index, prop::sample::Index)>(),
        replay in any::<bool>(),
        owned in any::<bool>(),
    ) {
        let (mut enc, _) = codecs(Cipher::AesGcm);
        let sent = seal_frames(&mut enc, &sizes, &[true]);
        let wire = take(&mut enc);
        let recs = records(&wire);
        let (a, b) = (pick.0.index(recs.len()), pick.1.index(recs.len()));
        prop_assume!(a != b);
        let mut order: Vec<usize> = (0..recs.len()).collect();
        if replay {
            order.insert(b, a);
        } else {
            order.swap(a, b);
        }
        let changed: Vec<u8> = order.iter().flat_map(|&i| wire[recs[i].clone()].to_vec()).collect();
        let (got, end) = receive(&changed, || 40_000, owned, Cipher::AesGcm);
        assert_prefix(&got, &sent);
        prop_assert!(matches!(end, Err(ChannelError::Decrypt)), "{:?}", end);
    }
}
