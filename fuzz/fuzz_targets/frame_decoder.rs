//! The frame decoder and negotiation (HELLO, WELCOME), and RESIZE notices, on arbitrary bytes: never a panic,
//! never more bytes claimed than given, and whatever decodes re-encodes to the same bytes.
#![no_main]

use dst::protocol::{self, Frame, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the limits, as negotiation would.
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_transfer: 1 << (pick % 24),
    };
    let _ = protocol::frame_len(bytes, &limits);
    let Ok((frame, used)) = protocol::decode_frame(bytes, &limits) else {
        return;
    };
    assert!(used <= bytes.len());
    let mut again = Vec::new();
    match &frame {
        Frame::Request(h, d) => protocol::encode_request(&mut again, h, d),
        Frame::Reply(h, d) => protocol::encode_reply(&mut again, h, d),
        // Negotiation skips unknown fields, so only what it understood round-trips.
        Frame::Hello(h) => protocol::encode_hello(&mut again, h),
        Frame::Welcome(w) => protocol::encode_welcome(&mut again, w),
        Frame::Resize(size) => protocol::encode_resize(&mut again, *size),
    }
    let (back, _) = protocol::decode_frame(
        &again,
        &Limits {
            max_transfer: u32::MAX >> 1,
        },
    )
    .expect("re-encoded frame decodes");
    assert_eq!(back, frame);
});
