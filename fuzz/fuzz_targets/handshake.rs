//! The handshake on arbitrary bytes, as a server and as a client sees them: the responder
//! fed a first flight, the initiator fed an answer, each in arbitrary pieces; then, if the
//! responder got that far, the rest fed to its record decoder as the client's first
//! record. Each fails cleanly or establishes; never a panic.
#![no_main]

use std::sync::OnceLock;

use dst::channel::handshake::{Initiator, Responder};
use dst::cipher::Cipher;
use dst::keys::PrivateKey;
use libfuzzer_sys::fuzz_target;

/// The server's key, one for the whole run.
fn server_key() -> &'static PrivateKey {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    KEY.get_or_init(dst::keys::generate)
}

fuzz_target!(|data: &[u8]| {
    let [pick, step, rest @ ..] = data else {
        return;
    };
    let step = 1 + *step as usize;
    let key = server_key();
    if pick & 1 == 0 {
        let ciphers = match pick >> 1 & 3 {
            0 => &Cipher::ALL[..],
            1 => &Cipher::ALL[..1],
            _ => &Cipher::ALL[1..],
        };
        let mut responder = Responder::new(ciphers);
        let mut at = 0;
        while responder.wants() > 0 && at < rest.len() {
            let end = (at + step).min(rest.len());
            match responder.feed(&rest[at..end]) {
                Ok(n) => at += n,
                Err(_) => return,
            }
        }
        let Ok((answer, keys)) = responder.answer(key) else {
            return;
        };
        assert_eq!(answer[0], 0);
        let (_, mut dec) = keys.codecs();
        dec.feed(&rest[at..]);
        let _ = dec.verdict();
    } else {
        let cipher = Cipher::ALL[(pick >> 1 & 1) as usize];
        let Ok((mut initiator, _)) = Initiator::start(&dst::keys::generate(), &key.public(), cipher)
        else {
            return;
        };
        for piece in rest.chunks(step) {
            if initiator.wants() == 0 {
                break;
            }
            initiator.feed(piece);
        }
        let _ = initiator.finish();
    }
});
