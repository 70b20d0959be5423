//! The record codec on arbitrary input. Arbitrary ciphertext: never a panic. Arbitrary
//! plaintext, sealed into records of arbitrary sizes and fed in arbitrary pieces: the
//! decoder gives exactly the frames that decoding the plaintext directly gives, through
//! `buffer`/`frame`, or a prefix of them through the owned path, then ends as that does.
#![no_main]

use dst::channel::handshake::verdict_record;
use dst::channel::record::{Decoder, Encoder, HEAD_MAX};
use dst::channel::ChannelError;
use dst::cipher::{Cipher, RecordKey};
use dst::pool::Pool;
use dst::protocol::{self, Frame, Head, Limits};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [5; 32];

/// A frame as the decoder gave it, owned.
#[derive(Debug, PartialEq)]
enum Got {
    Frame(String),
    Owned(Head, Vec<u8>),
}

/// Feeds `wire` in pieces of `step` and takes every frame; then how the stream ended.
fn drive(
    dec: &mut Decoder,
    wire: &[u8],
    step: usize,
    owned: bool,
    limits: &Limits,
) -> (Vec<Got>, Result<(), ChannelError>) {
    let pool = Pool::new(1 << 20);
    let mut at = 0;
    let mut more = |dec: &mut Decoder| {
        if at == wire.len() {
            return false;
        }
        let end = (at + step).min(wire.len());
        at += dec.feed(&wire[at..end]);
        true
    };
    let mut got = Vec::new();
    loop {
        let total = match dec.buffer(limits, if owned { HEAD_MAX } else { usize::MAX }) {
            Err(e) => return (got, Err(e)),
            Ok(None) if more(dec) => continue,
            Ok(None) => return (got, dec.end_of_stream()),
            Ok(Some(total)) => total,
        };
        if !owned {
            match dec.frame(limits) {
                Ok(f) => got.push(Got::Frame(format!("{f:?}"))),
                Err(e) => return (got, Err(e)),
            }
            continue;
        }
        let (head, head_len) = match dec.head(limits) {
            Ok(v) => v,
            Err(e) => return (got, Err(e)),
        };
        let mut filling = dec.start_payload(head, head_len, total, &pool);
        loop {
            match dec.fill(&mut filling) {
                Ok(true) => break,
                Ok(false) if more(dec) => {}
                Ok(false) => return (got, Err(dec.end_of_stream().unwrap_err())),
                Err(e) => return (got, Err(e)),
            }
        }
        let frame = filling.into_frame();
        got.push(Got::Owned(frame.head, frame.payload));
    }
}

/// The frames of `plain` decoded directly, and whether it ends cleanly between frames.
fn reference(plain: &[u8], limits: &Limits, owned: bool) -> (Vec<Got>, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < plain.len() {
        match protocol::frame_len(&plain[pos..], limits) {
            Ok(n) if n <= plain.len() - pos => {}
            _ => return (out, false),
        }
        let Ok((frame, used)) = protocol::decode_frame(&plain[pos..], limits) else {
            return (out, false);
        };
        out.push(match frame {
            _ if !owned => Got::Frame(format!("{frame:?}")),
            Frame::Request(h, d) => Got::Owned(Head::Request(h), d.to_vec()),
            Frame::Reply(h, d) => Got::Owned(Head::Reply(h), d.to_vec()),
            Frame::Resize(size) => Got::Owned(Head::Resize(size), Vec::new()),
            _ => return (out, false),
        });
        pos += used;
    }
    (out, true)
}

fuzz_target!(|data: &[u8]| {
    let [pick, seal, step, rest @ ..] = data else {
        return;
    };
    let cipher = Cipher::ALL[(pick & 1) as usize];
    let owned = pick & 2 != 0;
    let limits = Limits {
        max_transfer: 1 << (pick >> 3).min(25),
    };
    let step = 1 + (*step as usize) * 257;
    let mut dec = Decoder::new(RecordKey::new(cipher, &KEY));
    if pick & 4 != 0 {
        // Arbitrary ciphertext: it may only fail cleanly.
        let _ = drive(&mut dec, rest, step, owned, &limits);
        return;
    }
    let mut enc = Encoder::new(RecordKey::new(cipher, &KEY));
    enc.seal_parts(&[&verdict_record(&Ok(()))]);
    let parts: Vec<&[u8]> = rest.chunks(1 + (*seal as usize) * 97).collect();
    enc.seal_parts(&parts);
    let wire = enc.pending().to_vec();
    let (got, end) = drive(&mut dec, &wire, step, owned, &limits);
    let (want, clean) = reference(rest, &limits, owned);
    assert!(got.len() <= want.len(), "more frames than were sealed");
    assert_eq!(got[..], want[..got.len()]);
    if !owned {
        assert_eq!(got.len(), want.len());
        assert_eq!(end.is_ok(), clean, "{end:?}");
    } else if end.is_ok() {
        assert!(clean && got.len() == want.len());
    }
});
