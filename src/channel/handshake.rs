//! The handshake without I/O: an [`Initiator`] (the client) and a [`Responder`] (the
//! server), each fed the bytes its peer sent, each giving the bytes to send and then an
//! outcome: [`Established`] (the two record keys and the peer's key), or a failure with
//! what to tell the peer before closing. The wire is drawn in the [channel](super) docs.
//!
//! The server's verdict on the client's key is not part of these objects: message 2 is
//! the same whoever the client is, and the verdict goes in the server's first record
//! ([`verdict_record`]), once the client's first record proves it live.

use zeroize::Zeroizing;

use super::noise::{noise_builder, snow_err, split, weak_ephemeral};
use super::record::{Decoder, Encoder};
use super::{ChannelError, NOISE_MAX};
use crate::cipher::{Cipher, RecordKey};
use crate::keys::{PrivateKey, PublicKey};

/// The channel's version, in the preamble. 2: the verdict on the client's key moved from
/// message 2 to the server's first record.
pub const PREAMBLE_VERSION: u8 = 2;
/// Bytes of the preamble.
pub const PREAMBLE_LEN: usize = 8;

/// Why a server refused a handshake: the code in a cleartext answer or in its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a dst client, or a preamble version this server does not speak.
    Preamble = 1,
    /// The client's cipher is not among those the server accepts.
    Cipher = 2,
    /// The server could not read the client's first message: wrong pinned server key.
    ServerKey = 3,
    /// The client's key is not in the server's allowlist.
    ClientKey = 4,
    /// The server is at a limit (connections, shutting down); try again later.
    Busy = 5,
}

impl Refusal {
    fn from_u8(v: u8) -> Option<Refusal> {
        Some(match v {
            1 => Refusal::Preamble,
            2 => Refusal::Cipher,
            3 => Refusal::ServerKey,
            4 => Refusal::ClientKey,
            5 => Refusal::Busy,
            _ => return None,
        })
    }

    /// The error a peer's refusal with code `code` and reason `why` is.
    fn error(code: u8, why: &[u8]) -> ChannelError {
        let why = String::from_utf8_lossy(why).into_owned();
        match Refusal::from_u8(code) {
            Some(r) => ChannelError::Refused(r, why),
            None => ChannelError::Protocol(format!("unknown handshake refusal {code}: {why}")),
        }
    }
}

/// The preamble of a client choosing `cipher`.
pub fn preamble(cipher: Cipher) -> [u8; PREAMBLE_LEN] {
    [b'D', b'S', b'T', PREAMBLE_VERSION, cipher.id(), 0, 0, 0]
}

/// `prefix len:u16 msg`: every handshake message and cleartext refusal.
fn u16_message(prefix: &[u8], msg: &[u8]) -> Vec<u8> {
    let len = msg.len().min(u16::MAX as usize);
    let mut out = Vec::with_capacity(prefix.len() + 2 + len);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&msg[..len]);
    out
}

/// The plaintext of a side's first record: 0 for its peer accepted, or the refusal's code
/// and reason. A client's is always 0, its confirmation that it holds the session keys.
pub fn verdict_record(verdict: &Result<(), (Refusal, String)>) -> Vec<u8> {
    match verdict {
        Ok(()) => vec![0],
        Err((code, why)) => [&[*code as u8], why.as_bytes()].concat(),
    }
}

/// Reads the plaintext of the peer's first record.
pub fn verdict(plain: &[u8]) -> Result<(), ChannelError> {
    match plain {
        [0] => Ok(()),
        [0, ..] | [] => Err(ChannelError::Protocol(
            "the peer's first record is not a verdict".into(),
        )),
        [code, why @ ..] => Err(Refusal::error(*code, why)),
    }
}

/// A finished handshake: this side's record keys and the peer's static key.
pub struct Established {
    cipher: Cipher,
    send: Zeroizing<[u8; 32]>,
    recv: Zeroizing<[u8; 32]>,
    pub peer: PublicKey,
}

impl Established {
    /// The record codecs: to the peer and from it.
    pub fn codecs(&self) -> (Encoder, Decoder) {
        (
            Encoder::new(RecordKey::new(self.cipher, &self.send)),
            Decoder::new(RecordKey::new(self.cipher, &self.recv)),
        )
    }
}

/// A failed handshake: why, and what to send the peer before closing (maybe nothing).
#[derive(Debug)]
pub struct Failed {
    pub error: ChannelError,
    pub reply: Vec<u8>,
}

impl Failed {
    fn silent(error: ChannelError) -> Failed {
        Failed {
            error,
            reply: Vec::new(),
        }
    }

    /// A refusal that the peer is told in clear.
    fn refuse(code: Refusal, why: String) -> Failed {
        Failed {
            reply: u16_message(&[code as u8], why.as_bytes()),
            error: ChannelError::Refused(code, why),
        }
    }
}

/// The bytes of `prefix len:u16 body` gathered as fed: how many more are wanted, then the
/// whole.
struct Gather {
    prefix: usize,
    buf: Vec<u8>,
}

impl Gather {
    fn new(prefix: usize) -> Gather {
        Gather {
            prefix,
            buf: Vec::new(),
        }
    }

    fn wants(&self) -> usize {
        let head = self.prefix + 2;
        if self.buf.len() < head {
            return head - self.buf.len();
        }
        let len = u16::from_be_bytes([self.buf[self.prefix], self.buf[self.prefix + 1]]);
        head + len as usize - self.buf.len()
    }

    /// Takes at most `max` bytes of `bytes`; returns how many it took.
    fn take(&mut self, bytes: &[u8], max: usize) -> usize {
        let n = max.min(bytes.len());
        self.buf.extend_from_slice(&bytes[..n]);
        n
    }

    /// The prefix and the body, once the whole is in.
    fn whole(&self) -> Option<(&[u8], &[u8])> {
        (self.wants() == 0).then(|| (&self.buf[..self.prefix], &self.buf[self.prefix + 2..]))
    }
}

/// The client's side.
pub struct Initiator {
    hs: snow::HandshakeState,
    cipher: Cipher,
    server: PublicKey,
    answer: Gather,
}

impl Initiator {
    /// Starts a handshake with the server whose key is `server` (pinned); returns it and
    /// the first flight to send: the preamble and message 1.
    pub fn start(
        local: &PrivateKey,
        server: &PublicKey,
        cipher: Cipher,
    ) -> Result<(Initiator, Vec<u8>), ChannelError> {
        // Parsing refuses weak keys already; this one may have come from elsewhere.
        if server.is_weak() {
            return Err(ChannelError::Protocol(format!(
                "the pinned server key {server} is a low-order (weak) key, which authenticates \
                 nothing; pin the server's real key (its KEY.pub)"
            )));
        }
        let pre = preamble(cipher);
        let mut hs = noise_builder(cipher)
            .local_private_key(local.bytes())
            .and_then(|b| b.remote_public_key(&server.0))
            .and_then(|b| b.prologue(&pre))
            .and_then(|b| b.build_initiator())
            .map_err(snow_err)?;
        let mut msg = vec![0u8; NOISE_MAX];
        let n = hs.write_message(&[], &mut msg).map_err(snow_err)?;
        let initiator = Initiator {
            hs,
            cipher,
            server: *server,
            answer: Gather::new(1),
        };
        Ok((initiator, u16_message(&pre, &msg[..n])))
    }

    /// Bytes of the server's answer still to come; 0 once it is whole.
    pub fn wants(&self) -> usize {
        self.answer.wants()
    }

    /// Takes what it wants of `bytes`, the server's answer; returns how much.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.answer.take(bytes, self.answer.wants())
    }

    /// Reads the whole answer: the server refused in clear, or it proved its key.
    pub fn finish(mut self) -> Result<Established, ChannelError> {
        let Some((code, answer)) = self.answer.whole() else {
            return Err(ChannelError::Protocol(
                "the server's handshake answer is incomplete".into(),
            ));
        };
        let code = code[0];
        if code != 0 {
            return Err(Refusal::error(code, answer));
        }
        if weak_ephemeral(answer) {
            return Err(ChannelError::Protocol(
                "the server's handshake answer carries a low-order (weak) ephemeral key; \
                 it is not a dst-server, or something between tampers with the connection"
                    .into(),
            ));
        }
        let mut payload = vec![0u8; NOISE_MAX];
        let n = self.hs.read_message(answer, &mut payload).map_err(|_| {
            ChannelError::Protocol(
                "the server's handshake answer did not authenticate: it does not hold the \
                 pinned server key"
                    .into(),
            )
        })?;
        if n > 0 {
            return Err(ChannelError::Protocol(
                "the server's handshake answer carries a payload; is it an older dst-server?"
                    .into(),
            ));
        }
        let (to_server, to_client) = split(&mut self.hs);
        Ok(Established {
            cipher: self.cipher,
            send: to_server,
            recv: to_client,
            peer: self.server,
        })
    }
}

/// The server's side, up to its answer; what it has gathered of the client's first flight.
pub struct Responder {
    ciphers: Vec<Cipher>,
    flight: Gather,
}

impl Responder {
    /// A responder that accepts the ciphers of `ciphers`.
    pub fn new(ciphers: &[Cipher]) -> Responder {
        Responder {
            ciphers: ciphers.to_vec(),
            flight: Gather::new(PREAMBLE_LEN),
        }
    }

    /// Bytes of the first flight still to come; 0 once it is whole.
    pub fn wants(&self) -> usize {
        match PREAMBLE_LEN.checked_sub(self.flight.buf.len()) {
            Some(n) if n > 0 => n,
            _ => self.flight.wants(),
        }
    }

    /// Takes what it wants of `bytes`, the client's first flight; returns how much. A bad
    /// preamble or a cipher not accepted is refused as soon as the preamble is in.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, Failed> {
        let had = self.flight.buf.len();
        let n = self.flight.take(bytes, self.wants());
        if had < PREAMBLE_LEN && self.flight.buf.len() == PREAMBLE_LEN {
            self.cipher(&self.flight.buf)?;
        }
        Ok(n)
    }

    /// The cipher that preamble `pre` asks for, if it is a dst client's that may have it.
    fn cipher(&self, pre: &[u8]) -> Result<Cipher, Failed> {
        if &pre[..3] != b"DST" || pre[3] != PREAMBLE_VERSION {
            return Err(Failed::refuse(
                Refusal::Preamble,
                format!("not a dst client, or a channel version other than {PREAMBLE_VERSION}"),
            ));
        }
        if let Some(c) = Cipher::from_id(pre[4]).filter(|c| self.ciphers.contains(c)) {
            return Ok(c);
        }
        let asked = Cipher::from_id(pre[4]).map_or(format!("#{}", pre[4]), |c| c.to_string());
        let names = self
            .ciphers
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>();
        Err(Failed::refuse(
            Refusal::Cipher,
            format!(
                "cipher {asked} is not accepted by this server (it accepts: {}); choose one \
                 of those with --cipher",
                names.join(", ")
            ),
        ))
    }

    /// With the whole first flight, the crypto: returns message 2 to send, with an empty
    /// payload whoever the client is, and the keys. The client's key is checked later,
    /// once its first record proves it live.
    pub fn answer(self, local: &PrivateKey) -> Result<(Vec<u8>, Established), Failed> {
        let Some((pre, msg)) = self.flight.whole() else {
            return Err(Failed::silent(ChannelError::Protocol(
                "the client's first flight is incomplete".into(),
            )));
        };
        let cipher = self.cipher(pre)?;
        let mut hs = noise_builder(cipher)
            .local_private_key(local.bytes())
            .and_then(|b| b.prologue(pre))
            .and_then(|b| b.build_responder())
            .map_err(|e| Failed::silent(snow_err(e)))?;
        // No honest client sends a low-order ephemeral key; its `es` term would be zero.
        if weak_ephemeral(msg) {
            return Err(Failed::silent(ChannelError::Protocol(
                "the client's first message carries a low-order (weak) ephemeral key".into(),
            )));
        }
        // A weak client key ends the handshake here, before anyone looks it up. With it
        // `ss` is zero, so `read_message` fails (NonzeroDh), but only after it read the
        // key; the key is checked whatever `read_message` returned.
        let mut payload = vec![0u8; NOISE_MAX];
        let read = hs.read_message(msg, &mut payload);
        let client = hs
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(PublicKey);
        if let Some(key) = client.filter(PublicKey::is_weak) {
            return Err(Failed::refuse(
                Refusal::ClientKey,
                format!(
                    "client key {key} is a low-order (weak) key, which authenticates nothing; \
                     no dst-server admits it (make a key with dst-keygen)"
                ),
            ));
        }
        if read.is_err() {
            return Err(Failed::refuse(
                Refusal::ServerKey,
                "the handshake could not be read: the client pinned a server key other than \
                 this server's; fix the client's --server-key (compare it with the server's \
                 KEY.pub)"
                    .into(),
            ));
        }
        let Some(client) = client else {
            return Err(Failed::silent(ChannelError::Protocol(
                "handshake without a client key".into(),
            )));
        };
        let mut answer = vec![0u8; NOISE_MAX];
        let n = hs
            .write_message(&[], &mut answer)
            .map_err(|e| Failed::silent(snow_err(e)))?;
        let (to_server, to_client) = split(&mut hs);
        let established = Established {
            cipher,
            send: to_client,
            recv: to_server,
            peer: client,
        };
        Ok((u16_message(&[0], &answer[..n]), established))
    }
}

#[cfg(test)]
mod tests;
