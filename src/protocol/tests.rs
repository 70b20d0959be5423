use super::*;

#[test]
fn printable_escapes_only_control_characters() {
    assert_eq!(printable("disk-1 'ok' é"), "disk-1 'ok' é");
    assert_eq!(printable("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
}
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    max_transfer: 1 << 20,
};

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Read),
        Just(Op::Write),
        Just(Op::Flush),
        Just(Op::Trim),
        Just(Op::WriteZeroes),
        Just(Op::Ping)
    ]
}

prop_compose! {
    fn request()(op in op_strategy(), fua in any::<bool>(), txid in any::<u64>(), back in any::<u64>(),
                 offset in any::<u64>(), length in 0u32..4096, seed in any::<u8>())
                 -> (RequestHeader, Vec<u8>) {
        let (offset, length) = if op.has_range() { (offset, length) } else { (0, 0) };
        let h = RequestHeader { op, flags: if fua { FLAG_FUA } else { 0 }, txid, floor: txid - back % (txid.max(1)), offset, length };
        let data = if op == Op::Write { (0..length).map(|i| (i as u8) ^ seed).collect() } else { Vec::new() };
        (h, data)
    }
}

prop_compose! {
    fn hello()(version in any::<u16>(), export in "[a-z0-9_.-]{0,40}", rw in any::<bool>(),
               session in proptest::option::of(any::<[u8; 16]>()), max_transfer in any::<u32>(),
               features in any::<u64>()) -> Hello {
        Hello { version, export, access: if rw { Access::ReadWrite } else { Access::ReadOnly },
                session, max_transfer, features }
    }
}

prop_compose! {
    fn welcome()(accepted in any::<bool>(), export in "[a-z0-9]{0,40}", session in any::<[u8; 16]>(),
                 resumed in any::<bool>(), size in any::<u64>(), bs_shift in 9u32..=16,
                 mt in 65536u32..=MAX_TRANSFER_LIMIT, features in any::<u64>(),
                 status in 1u32..200, message in "\\PC{0,100}", boot_id in "[0-9a-f-]{0,36}") -> Welcome {
        if accepted {
            Welcome::Accepted(ExportInfo { version: PROTOCOL_VERSION, export, access: Access::ReadWrite,
                session, resumed, boot_id, size, block_size: 1 << bs_shift, max_transfer: mt, features })
        } else {
            Welcome::Refused { status, message }
        }
    }
}

fn one(buf: &[u8]) -> Frame<'_> {
    let (f, used) = decode_frame(buf, &LIMITS).expect("decodes");
    assert_eq!(used, buf.len());
    f
}

proptest! {
    #[test]
    fn requests_round_trip((h, data) in request()) {
        let mut buf = Vec::new();
        encode_request(&mut buf, &h, &data);
        prop_assert_eq!(one(&buf), Frame::Request(h, &data));
    }

    #[test]
    fn replies_round_trip(txid in any::<u64>(), status in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let data = if status == 0 { data } else { Vec::new() };
        let h = ReplyHeader { txid, status };
        let mut buf = Vec::new();
        encode_reply(&mut buf, &h, &data);
        prop_assert_eq!(one(&buf), Frame::Reply(h, &data));
    }

    #[test]
    fn hellos_round_trip(h in hello()) {
        let mut buf = Vec::new();
        encode_hello(&mut buf, &h);
        prop_assert_eq!(one(&buf), Frame::Hello(h));
    }

    #[test]
    fn welcomes_round_trip(w in welcome()) {
        let mut buf = Vec::new();
        encode_welcome(&mut buf, &w);
        prop_assert_eq!(one(&buf), Frame::Welcome(w));
    }

    #[test]
    fn truncated_frames_are_incomplete((h, data) in request(), cut in any::<prop::sample::Index>()) {
        let mut buf = Vec::new();
        encode_request(&mut buf, &h, &data);
        let cut = cut.index(buf.len());
        prop_assert_eq!(decode_frame(&buf[..cut], &LIMITS).unwrap_err(), DecodeError::Incomplete);
    }

    #[test]
    fn corrupted_frames_never_panic((h, data) in request(), w in welcome(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        for mut buf in [Vec::new(), Vec::new()] {
            if byte % 2 == 0 { encode_request(&mut buf, &h, &data) } else { encode_welcome(&mut buf, &w) }
            let i = pos.index(buf.len());
            buf[i] ^= byte | 1;
            // Whatever the damage, decoding ends in a value or an error, never a panic,
            // and never claims more bytes than exist.
            if let Ok((_, used)) = decode_frame(&buf, &LIMITS) {
                prop_assert!(used <= buf.len());
            }
        }
    }

    #[test]
    fn heads_decode_as_their_whole_frames((h, data) in request(), reply in any::<bool>(), w in welcome(),
                                          pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut buf = Vec::new();
        match byte % 4 {
            0 => encode_welcome(&mut buf, &w),
            _ if reply => encode_reply(&mut buf, &ReplyHeader { txid: h.txid, status: 0 }, &data),
            _ => encode_request(&mut buf, &h, &data),
        }
        if byte % 3 == 0 {
            let i = pos.index(buf.len());
            buf[i] ^= byte | 1;
        }
        match (decode_frame(&buf, &LIMITS), decode_head(&buf, &LIMITS)) {
            (Ok((Frame::Request(fh, d), used)), Ok(Some((Head::Request(hh), head)))) => {
                prop_assert_eq!((fh, head + d.len()), (hh, used));
                // The head's bytes are all it needs.
                prop_assert_eq!(decode_head(&buf[..head], &LIMITS), Ok(Some((Head::Request(hh), head))));
            }
            (Ok((Frame::Reply(fh, d), used)), Ok(Some((Head::Reply(hh), head)))) => {
                prop_assert_eq!((fh, head + d.len()), (hh, used));
            }
            (Ok((Frame::Hello(_) | Frame::Welcome(_), _)), Ok(None)) => {}
            (Err(DecodeError::Malformed(_)), Err(DecodeError::Malformed(_)) | Ok(None)) => {}
            // A damaged length may make the whole frame incomplete, not its head.
            (Err(DecodeError::Incomplete), _) => {}
            (f, hd) => prop_assert!(false, "frame {:?} but head {:?}", f, hd),
        }
    }

    #[test]
    fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&buf, &LIMITS);
    }

    #[test]
    fn oversized_lengths_are_refused_from_the_header(len in (LIMITS.max_frame() as u32 + 1)..) {
        let mut buf = len.to_be_bytes().to_vec();
        buf.push(KIND_REQUEST);
        prop_assert!(matches!(frame_len(&buf, &LIMITS), Err(DecodeError::Malformed(_))));
    }
}

#[test]
fn heads_with_separate_payloads_equal_whole_frames() {
    let h = RequestHeader {
        op: Op::Write,
        flags: FLAG_FUA,
        txid: 9,
        floor: 3,
        offset: 4096,
        length: 5,
    };
    let (mut whole, mut parts) = (Vec::new(), Vec::new());
    encode_request(&mut whole, &h, b"abcde");
    encode_request_head(&mut parts, &h, 5);
    parts.extend_from_slice(b"abcde");
    assert_eq!(whole, parts);
    let r = ReplyHeader { txid: 9, status: 0 };
    let (mut whole, mut parts) = (Vec::new(), Vec::new());
    encode_reply(&mut whole, &r, b"xyz");
    encode_reply_head(&mut parts, &r, 3);
    parts.extend_from_slice(b"xyz");
    assert_eq!(whole, parts);
}

#[test]
fn write_longer_than_max_transfer_is_refused() {
    let small = Limits { max_transfer: 4096 };
    let h = RequestHeader {
        op: Op::Write,
        flags: 0,
        txid: 1,
        floor: 1,
        offset: 0,
        length: 8192,
    };
    let mut buf = Vec::new();
    encode_request(&mut buf, &h, &[7; 8192]);
    assert!(matches!(
        decode_frame(&buf, &small),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn write_with_wrong_payload_length_is_refused() {
    let h = RequestHeader {
        op: Op::Write,
        flags: 0,
        txid: 1,
        floor: 0,
        offset: 0,
        length: 10,
    };
    let mut buf = Vec::new();
    encode_request(&mut buf, &h, &[1; 9]);
    let err = decode_frame(&buf, &LIMITS).unwrap_err();
    assert!(err.to_string().contains("payload"), "{err}");
}

#[test]
fn resize_notices_round_trip_and_decode_strictly() {
    let mut buf = Vec::new();
    encode_resize(&mut buf, 3 << 30);
    assert_eq!(buf.len(), FRAME_HEADER + RESIZE_BODY);
    assert_eq!(one(&buf), Frame::Resize(3 << 30));
    assert_eq!(
        decode_head(&buf, &LIMITS),
        Ok(Some((Head::Resize(3 << 30), buf.len())))
    );
    // Cut short: more is needed, then both decoders agree it is whole.
    assert_eq!(
        decode_frame(&buf[..buf.len() - 1], &LIMITS),
        Err(DecodeError::Incomplete)
    );
    // A size of the wrong width, longer or shorter, is refused by both decoders.
    for body in [&[0u8; 7][..], &[0u8; 9][..], &[][..]] {
        let mut bad = Vec::new();
        let start = begin_frame(&mut bad, KIND_RESIZE);
        bad.extend_from_slice(body);
        end_frame(&mut bad, start);
        assert!(
            matches!(decode_frame(&bad, &LIMITS), Err(DecodeError::Malformed(_))),
            "{body:?}"
        );
        assert!(
            matches!(decode_head(&bad, &LIMITS), Err(DecodeError::Malformed(_))),
            "{body:?}"
        );
    }
}

#[test]
fn resize_is_a_feature_of_this_build() {
    assert_ne!(features::ALL & features::RESIZE, 0);
    // Distinct from the others, so older peers that lack it still agree on those.
    let others = features::FLUSH | features::FUA | features::TRIM | features::WRITE_ZEROES;
    assert_eq!(others & features::RESIZE, 0);
}

#[test]
fn unknown_fields_are_skipped() {
    let h = Hello {
        version: 1,
        export: "disk".into(),
        access: Access::ReadOnly,
        session: None,
        max_transfer: 1 << 20,
        features: 0,
    };
    let mut buf = Vec::new();
    encode_hello(&mut buf, &h);
    // A newer peer's field, appended to the body.
    buf.extend_from_slice(&[0x7f, 0x00, 0, 3, 1, 2, 3]);
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(one(&buf), Frame::Hello(h));
}

#[test]
fn repeated_fields_are_refused() {
    let mut buf = Vec::new();
    let start = begin_frame(&mut buf, KIND_HELLO);
    put_field(&mut buf, tag::EXPORT, b"a");
    put_field(&mut buf, tag::EXPORT, b"b");
    end_frame(&mut buf, start);
    assert!(matches!(
        decode_frame(&buf, &LIMITS),
        Err(DecodeError::Malformed(_))
    ));
}
