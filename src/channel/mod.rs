//! The encrypted channel: a Noise handshake that authenticates both ends by static key,
//! then an AEAD-encrypted stream of protocol frames over any byte stream.
//!
//! Handshake, on a fresh connection:
//!
//! ```text
//! client -> server   "DST" version:u8 cipher:u8 0 0 0       cleartext preamble (8 bytes)
//! client -> server   len:u16 noise-IK message 1             carries the client's static key
//! server -> client   0:u8 len:u16 noise-IK message 2        empty payload, whoever the client is
//!                  | code:u8 len:u16 reason (UTF-8)         refused in clear, then closed
//! client -> server   record: 0                              first record: the client's confirmation
//! server -> client   record: 0                              first record: the client's key accepted,
//!                  | record: code:u8 reason (UTF-8)         or refused (then closed)
//! ```
//!
//! The preamble is the Noise prologue, so a tampered cipher choice fails the handshake.
//! The client pins the server's key (pattern IK). Message 2 has the same length whether or
//! not the server admits the client's key: a first message can be replayed, and an answer
//! that differed would tell whoever replays a recorded one whether that client is still
//! allowed. Only a live client can seal its first record (a replayer lacks the ephemeral
//! key), so the server gives its verdict on the client's key encrypted, as its own first
//! record, after that record decrypts. A refusal comes with its reason so that the client
//! can tell its user which side to fix instead of seeing a closed socket; it is in clear
//! only where no session key exists yet (bad preamble, cipher, server key).
//!
//! Transport: records `len:u16 ciphertext` of at most 65535 bytes (the Noise limit). The
//! plaintext of consecutive records after the first is one byte stream of
//! [`protocol`](crate::protocol) frames, so a large frame spans records and several small
//! frames share one. Each direction has its own key and nonce counter
//! ([`crate::cipher`]), so the two halves of a connection run independently.
//!
//! The parts: [`handshake`] and [`record`] are the protocol without I/O, fed bytes and
//! giving bytes; `establish` runs the handshake over a stream, `stream` the records.

mod establish;
pub mod handshake;
mod noise;
pub mod record;
mod stream;

use std::fmt;
use std::io;

use crate::cipher::TAG_LEN;
use crate::protocol::{self, DecodeError};

pub use establish::{accept, accept_first_flight, connect, FirstFlight};
pub use handshake::Refusal;
pub use record::{Outgoing, OwnedFrame, Sealed};
pub use stream::{Hangup, Receiver, Sender};

/// Largest Noise message, ciphertext included.
pub const NOISE_MAX: usize = 65535;
/// Largest plaintext in one record.
pub const RECORD_PLAINTEXT: usize = NOISE_MAX - TAG_LEN;

/// Failures of the channel.
#[derive(Debug)]
pub enum ChannelError {
    Io(io::Error),
    /// The peer refused the handshake and said why.
    Refused(Refusal, String),
    /// A record did not authenticate: corrupted, replayed, or not from the peer.
    Decrypt,
    /// The peer broke the protocol.
    Protocol(String),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Io(e) => write!(f, "{e}"),
            // The reason may come from the peer.
            ChannelError::Refused(_, why) => write!(
                f,
                "server refused the connection: {}",
                protocol::printable(why)
            ),
            ChannelError::Decrypt => {
                write!(f, "a record failed authentication (corrupted or forged)")
            }
            ChannelError::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl std::error::Error for ChannelError {}

impl From<io::Error> for ChannelError {
    fn from(e: io::Error) -> Self {
        ChannelError::Io(e)
    }
}

impl From<DecodeError> for ChannelError {
    fn from(e: DecodeError) -> Self {
        ChannelError::Protocol(e.to_string())
    }
}

/// Channels over socket pairs, for tests here and of the modules that use channels.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::cipher::Cipher;
    use smol::net::unix::UnixStream;

    pub type Pair = (Sender<UnixStream>, Receiver<UnixStream>);

    /// The client's and the server's halves of a channel over a fresh socket pair.
    pub fn pair(cipher: Cipher) -> (Pair, Pair) {
        let (server_key, client_key) = (crate::keys::generate(), crate::keys::generate());
        let server_pub = server_key.public();
        let (a, b) = UnixStream::pair().unwrap();
        smol::block_on(async {
            let client = connect(a.clone(), a, &client_key, &server_pub, cipher);
            let server = accept(b.clone(), b, &server_key, &Cipher::ALL, |_| Ok(()));
            let (c, s) = smol::future::zip(client, server).await;
            let (s_tx, s_rx, _) = s.unwrap();
            (c.unwrap(), (s_tx, s_rx))
        })
    }
}
