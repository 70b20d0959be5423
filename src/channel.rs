//! The encrypted channel: a Noise handshake that authenticates both ends by static key,
//! then an AEAD-encrypted stream of protocol frames over any byte stream.
//!
//! Handshake, on a fresh connection:
//!
//! ```text
//! client -> server   "DST" version:u8 cipher:u8 0 0 0       cleartext preamble (8 bytes)
//! client -> server   len:u16 noise-IK message 1             carries the client's static key
//! server -> client   0:u8 len:u16 noise-IK message 2        accepted, or refused with an
//!                                                           encrypted code and reason
//!                  | code:u8 len:u16 reason (UTF-8)         refused in clear, then closed
//! ```
//!
//! The preamble is the Noise prologue, so a tampered cipher choice fails the handshake.
//! The client pins the server's key (pattern IK); the server checks the client's key
//! against its allowlist before answering. A refusal comes with its reason so that the
//! client can tell its user which side to fix instead of seeing a closed socket; it is in
//! clear only where no session key exists yet (bad preamble, cipher, server key).
//!
//! Transport: records `len:u16 ciphertext` of at most 65535 bytes (the Noise limit). The
//! plaintext of consecutive records is one byte stream of [`protocol`](crate::protocol)
//! frames, so a large frame spans records and several small frames share one.
//! Each direction has its own key and nonce counter ([`crate::cipher`]), so
//! the two halves of a connection run independently.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::cipher::{Cipher, RecordKey, TAG_LEN};
use crate::keys::{PrivateKey, PublicKey};
use crate::pool::Pool;
use crate::protocol::{self, DecodeError, Frame, Head, Limits};

/// Largest Noise message, ciphertext included.
pub const NOISE_MAX: usize = 65535;
/// Largest plaintext in one record.
pub const RECORD_PLAINTEXT: usize = NOISE_MAX - TAG_LEN;
const PREAMBLE_VERSION: u8 = 1;

/// Why a server refused a handshake; sent in clear as the first byte of its answer.
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
}

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

fn preamble(cipher: Cipher) -> [u8; 8] {
    [b'D', b'S', b'T', PREAMBLE_VERSION, cipher.id(), 0, 0, 0]
}

async fn read_u16_message<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    r.read_exact(buf).await
}

fn u16_message(prefix: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + 2 + msg.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Tells the client why it is refused, in clear, before the connection closes.
async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, code: Refusal, why: String) -> ChannelError {
    // Best effort: the client may already be gone.
    let _ = writer
        .write_all(&u16_message(&[code as u8], why.as_bytes()))
        .await;
    let _ = writer.flush().await;
    ChannelError::Refused(code, why)
}

fn snow_err(e: snow::Error) -> ChannelError {
    ChannelError::Protocol(format!("noise: {e}"))
}

/// A snow builder whose Diffie-Hellman refuses an all-zero result.
///
/// Snow 0.10 does not: its 25519 DH (the default resolver's, curve25519-dalek's
/// `MontgomeryPoint::mul_clamped`; the ring resolver has none) returns `Ok` with the all-zero
/// result for a low-order peer key, and the handshake goes on mixing a constant that anyone
/// knows. So a weak remote static or ephemeral key is refused here twice: by name, where the
/// keys are read ([`PublicKey::is_weak`]), and by this DH, which makes any all-zero term
/// (`ee`, `es`, `se`, `ss`) a handshake error. Otherwise it is exactly `snow::Builder::new`.
fn noise_builder(cipher: Cipher) -> snow::Builder<'static> {
    use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
    let snow_default = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    snow::Builder::with_resolver(
        cipher.noise_params(),
        Box::new(FallbackResolver::new(
            Box::new(NonzeroDhResolver),
            Box::new(snow_default),
        )),
    )
}

/// Resolves only the DH, to [`NonzeroDh`] around snow's own.
struct NonzeroDhResolver;

impl snow::resolvers::CryptoResolver for NonzeroDhResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        None
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        let inner = snow::resolvers::DefaultResolver.resolve_dh(choice)?;
        Some(Box::new(NonzeroDh(inner)))
    }

    fn resolve_hash(
        &self,
        _choice: &snow::params::HashChoice,
    ) -> Option<Box<dyn snow::types::Hash>> {
        None
    }

    fn resolve_cipher(
        &self,
        _choice: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        None
    }
}

/// A DH that fails where the result is all zeros, that is, where the peer's key is a
/// low-order point. Dropped, it clears the private key it holds (snow's does not).
struct NonzeroDh(Box<dyn snow::types::Dh>);

impl Drop for NonzeroDh {
    fn drop(&mut self) {
        // Once per key of a handshake, never per record.
        let zero = [0u8; 32];
        self.0.set(&zero[..self.0.priv_len().min(32)]);
    }
}

impl snow::types::Dh for NonzeroDh {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn pub_len(&self) -> usize {
        self.0.pub_len()
    }
    fn priv_len(&self) -> usize {
        self.0.priv_len()
    }
    fn dh_len(&self) -> usize {
        self.0.dh_len()
    }
    fn set(&mut self, privkey: &[u8]) {
        self.0.set(privkey)
    }
    fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        self.0.generate(rng)
    }
    fn pubkey(&self) -> &[u8] {
        self.0.pubkey()
    }
    fn privkey(&self) -> &[u8] {
        self.0.privkey()
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        self.0.dh(pubkey, out)?;
        // The result is secret: look at every byte, whatever they are.
        let len = self.0.dh_len().min(out.len());
        if out[..len].iter().fold(0, |acc, b| acc | b) == 0 {
            return Err(snow::Error::Dh);
        }
        Ok(())
    }
}

/// The ephemeral key that starts a handshake message (in clear, in every Noise message of
/// pattern IK), if it is a low-order one.
fn weak_ephemeral(msg: &[u8]) -> bool {
    msg.get(..32)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .is_some_and(|k| PublicKey(k).is_weak())
}

/// Runs the client side of the handshake. `server` is the pinned server key.
pub async fn connect<R, W>(
    mut reader: R,
    mut writer: W,
    local: &PrivateKey,
    server: &PublicKey,
    cipher: Cipher,
) -> Result<(Sender<W>, Receiver<R>), ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let pre = preamble(cipher);
    // Parsing refuses weak keys already; this one may have come from elsewhere.
    if server.is_weak() {
        return Err(ChannelError::Protocol(format!(
            "the pinned server key {server} is a low-order (weak) key, which authenticates \
             nothing; pin the server's real key (its KEY.pub)"
        )));
    }
    let mut hs = noise_builder(cipher)
        .local_private_key(local.bytes())
        .and_then(|b| b.remote_public_key(&server.0))
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_initiator())
        .map_err(snow_err)?;
    let mut msg = vec![0u8; NOISE_MAX];
    let n = hs.write_message(&[], &mut msg).map_err(snow_err)?;
    writer.write_all(&u16_message(&pre, &msg[..n])).await?;
    writer.flush().await?;

    let mut code = [0u8; 1];
    reader.read_exact(&mut code).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ChannelError::Protocol(
                "the server closed the connection during the handshake; is it a dst-server?".into(),
            )
        } else {
            e.into()
        }
    })?;
    let mut answer = Vec::new();
    read_u16_message(&mut reader, &mut answer).await?;
    if code[0] != 0 {
        let why = String::from_utf8_lossy(&answer).into_owned();
        let refusal = Refusal::from_u8(code[0]).ok_or_else(|| {
            ChannelError::Protocol(format!("unknown handshake refusal {}: {why}", code[0]))
        })?;
        return Err(ChannelError::Refused(refusal, why));
    }
    if weak_ephemeral(&answer) {
        return Err(ChannelError::Protocol(
            "the server's handshake answer carries a low-order (weak) ephemeral key; \
             it is not a dst-server, or something between tampers with the connection"
                .into(),
        ));
    }
    let n = hs.read_message(&answer, &mut msg).map_err(|_| {
        ChannelError::Protocol(
            "the server's handshake answer did not authenticate: it does not hold the pinned server key".into(),
        )
    })?;
    // A refusal that names the client travels encrypted, so that the client's identity,
    // hidden by pattern IK, is not given away in clear.
    if n > 0 {
        let why = String::from_utf8_lossy(&msg[1..n]).into_owned();
        return Err(match Refusal::from_u8(msg[0]) {
            Some(r) => ChannelError::Refused(r, why),
            None => ChannelError::Protocol(format!("unknown handshake refusal {}: {why}", msg[0])),
        });
    }
    let (to_server, to_client) = split(&mut hs);
    Ok(halves(reader, writer, cipher, &to_server, &to_client))
}

/// Runs the server side of the handshake. `authorize` sees the client's static key and
/// returns why it is refused, if it is. Returns the halves and the client's key.
pub async fn accept<R, W>(
    mut reader: R,
    mut writer: W,
    local: &PrivateKey,
    ciphers: &[Cipher],
    authorize: impl FnOnce(&PublicKey) -> Result<(), String>,
) -> Result<(Sender<W>, Receiver<R>, PublicKey), ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    accept_first_flight(&mut reader, &mut writer, ciphers)
        .await?
        .accept(reader, writer, local, authorize)
        .await
}

/// The client's first flight: its preamble and first Noise message, read but not yet
/// processed, so that a server can bound the wait for it apart from the crypto after it.
pub struct FirstFlight {
    pre: [u8; 8],
    cipher: Cipher,
    msg: Vec<u8>,
}

/// Reads the client's first flight; a bad preamble or a cipher not in `ciphers` is
/// refused in clear at once.
pub async fn accept_first_flight<R, W>(
    reader: &mut R,
    writer: &mut W,
    ciphers: &[Cipher],
) -> Result<FirstFlight, ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pre = [0u8; 8];
    reader.read_exact(&mut pre).await?;
    if &pre[..3] != b"DST" || pre[3] != PREAMBLE_VERSION {
        return Err(refuse(
            writer,
            Refusal::Preamble,
            format!("not a dst client, or a channel version other than {PREAMBLE_VERSION}"),
        )
        .await);
    }
    let names = || {
        ciphers
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cipher = match Cipher::from_id(pre[4]).filter(|c| ciphers.contains(c)) {
        Some(c) => c,
        None => {
            let asked = Cipher::from_id(pre[4]).map_or(format!("#{}", pre[4]), |c| c.to_string());
            return Err(refuse(
                writer,
                Refusal::Cipher,
                format!("cipher {asked} is not accepted by this server (it accepts: {}); choose one of those with --cipher", names()),
            )
            .await);
        }
    };
    let mut msg = Vec::new();
    read_u16_message(reader, &mut msg).await?;
    Ok(FirstFlight { pre, cipher, msg })
}

impl FirstFlight {
    /// The rest of [`accept`]: the crypto, the client's key checked by `authorize`, the
    /// answer.
    pub async fn accept<R, W>(
        self,
        reader: R,
        mut writer: W,
        local: &PrivateKey,
        authorize: impl FnOnce(&PublicKey) -> Result<(), String>,
    ) -> Result<(Sender<W>, Receiver<R>, PublicKey), ChannelError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let FirstFlight { pre, cipher, msg } = self;
        let mut hs = noise_builder(cipher)
            .local_private_key(local.bytes())
            .and_then(|b| b.prologue(&pre))
            .and_then(|b| b.build_responder())
            .map_err(snow_err)?;
        // No honest client sends a low-order ephemeral key; its `es` term would be zero.
        if weak_ephemeral(&msg) {
            return Err(ChannelError::Protocol(
                "the client's first message carries a low-order (weak) ephemeral key".into(),
            ));
        }
        // A weak client key, whether or not it is in the authorized keys, ends the handshake
        // here, before `authorize` sees it. With it `ss` is zero, so `read_message` fails
        // (NonzeroDh), but only after it read the key; the key is checked whatever
        // `read_message` returned.
        let weak_client = |hs: &snow::HandshakeState| {
            hs.get_remote_static()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(PublicKey)
                .filter(PublicKey::is_weak)
        };
        let mut payload = vec![0u8; NOISE_MAX];
        let read = hs.read_message(&msg, &mut payload);
        if let Some(key) = weak_client(&hs) {
            return Err(refuse(
                &mut writer,
                Refusal::ClientKey,
                format!(
                    "client key {key} is a low-order (weak) key, which authenticates nothing; \
                     no dst-server admits it (make a key with dst-keygen)"
                ),
            )
            .await);
        }
        if read.is_err() {
            return Err(refuse(
                &mut writer,
                Refusal::ServerKey,
                "the handshake could not be read: the client pinned a server key other than this server's; \
                 fix the client's --server-key (compare it with the server's KEY.pub)"
                    .into(),
            )
            .await);
        }
        let client = match hs
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
        {
            Some(k) => PublicKey(k),
            None => {
                return Err(ChannelError::Protocol(
                    "handshake without a client key".into(),
                ))
            }
        };
        let verdict = authorize(&client);
        let refusal = match &verdict {
            Ok(()) => Vec::new(),
            Err(why) => [&[Refusal::ClientKey as u8], why.as_bytes()].concat(),
        };
        let mut answer = vec![0u8; NOISE_MAX];
        let n = hs.write_message(&refusal, &mut answer).map_err(snow_err)?;
        writer.write_all(&u16_message(&[0], &answer[..n])).await?;
        writer.flush().await?;
        if let Err(why) = verdict {
            return Err(ChannelError::Refused(Refusal::ClientKey, why));
        }
        let (to_server, to_client) = split(&mut hs);
        let (tx, rx) = halves(reader, writer, cipher, &to_client, &to_server);
        Ok((tx, rx, client))
    }
}

/// The transport keys of a finished handshake (client to server, server to client), zeroed
/// when dropped; [`RecordKey::new`] copies them into aws-lc, which clears its copy when the
/// key is dropped. Nothing of this is per record.
fn split(hs: &mut snow::HandshakeState) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let (mut to_server, mut to_client) = (Zeroizing::new([0; 32]), Zeroizing::new([0; 32]));
    let mut raw = hs.dangerously_get_raw_split();
    to_server.copy_from_slice(&raw.0);
    to_client.copy_from_slice(&raw.1);
    zeroize::Zeroize::zeroize(&mut raw.0);
    zeroize::Zeroize::zeroize(&mut raw.1);
    (to_server, to_client)
}

fn halves<R, W>(
    reader: R,
    writer: W,
    cipher: Cipher,
    send_key: &[u8; 32],
    recv_key: &[u8; 32],
) -> (Sender<W>, Receiver<R>) {
    (
        Sender {
            writer,
            key: RecordKey::new(cipher, send_key),
            nonce: 0,
            out: Vec::new(),
            written: 0,
            sealed: 0,
        },
        Receiver {
            reader,
            key: RecordKey::new(cipher, recv_key),
            nonce: 0,
            input: vec![0; INPUT_BUFFER],
            in_pos: 0,
            in_end: 0,
            plain: Vec::new(),
            pos: 0,
            end: 0,
            torn: false,
        },
    )
}

/// The sending half of a channel.
pub struct Sender<W> {
    writer: W,
    key: RecordKey,
    nonce: u64,
    /// Records sealed and not yet written: `out[written..sealed]`.
    out: Vec<u8>,
    written: usize,
    sealed: usize,
}

impl<W: AsyncWrite + Unpin> Sender<W> {
    /// Encrypts `plain` (one or more encoded frames) and writes it in one go.
    pub async fn send(&mut self, plain: &[u8]) -> Result<(), ChannelError> {
        self.send_parts(&[plain]).await
    }

    /// Encrypts the parts, in order, as one stream of records and writes them in one go.
    /// Parts are encrypted where they lie, so a large payload goes from its buffer into the
    /// ciphertext without a copy; each part starts a record.
    pub async fn send_parts(&mut self, parts: &[&[u8]]) -> Result<(), ChannelError> {
        self.seal_parts(parts);
        self.flush().await
    }

    /// Encrypts the parts as [`send_parts`](Self::send_parts) does, after whatever was
    /// sealed before, without writing them: [`flush`](Self::flush) or
    /// [`try_flush`](Self::try_flush) does.
    pub fn seal_parts(&mut self, parts: &[&[u8]]) {
        if self.written == self.sealed {
            (self.written, self.sealed) = (0, 0);
        }
        let size = |p: &&[u8]| p.len() + p.len().div_ceil(RECORD_PLAINTEXT) * (2 + TAG_LEN);
        let total = self.sealed + parts.iter().map(size).sum::<usize>();
        if self.out.len() < total {
            self.out.resize(total, 0);
        }
        for chunk in parts.iter().flat_map(|p| p.chunks(RECORD_PLAINTEXT)) {
            let (at, n) = (self.sealed, chunk.len() + TAG_LEN);
            self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            self.key
                .seal(self.nonce, chunk, &mut self.out[at + 2..at + 2 + n]);
            self.nonce += 1;
            self.sealed += 2 + n;
        }
    }

    /// Writes everything sealed, waiting for the stream to take it.
    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        while self.written < self.sealed {
            match self
                .writer
                .write(&self.out[self.written..self.sealed])
                .await?
            {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                n => self.written += n,
            }
        }
        self.writer.flush().await?;
        Ok(())
    }

    /// Writes as much of what was sealed as the stream takes without waiting; true when
    /// all of it is written. A thread that must not block sends with this and leaves the
    /// rest to a task that awaits [`flush`](Self::flush).
    pub fn try_flush(&mut self) -> Result<bool, ChannelError> {
        // Nothing is woken: whoever finishes the send polls again with its own waker.
        let mut cx = Context::from_waker(Waker::noop());
        let mut writer = Pin::new(&mut self.writer);
        while self.written < self.sealed {
            match writer
                .as_mut()
                .poll_write(&mut cx, &self.out[self.written..self.sealed])
            {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => return Ok(false),
            }
        }
        match writer.poll_flush(&mut cx) {
            Poll::Ready(r) => r.map(|()| true).map_err(Into::into),
            Poll::Pending => Ok(false),
        }
    }

    /// Closes the write side of the byte stream.
    pub async fn close(&mut self) -> io::Result<()> {
        self.writer.close().await
    }
}

/// Frames gathered for one [`Sender::send_parts`]: heads and small payloads copied into a
/// staging buffer, large payloads referred to where they lie.
#[derive(Default)]
pub struct Outgoing {
    staged: Vec<u8>,
    /// (offset in `staged`, item): the payload of that item goes at that offset.
    cuts: Vec<(usize, usize)>,
}

impl Outgoing {
    /// Payloads below this are copied; a copy costs less than a record of their own.
    pub const INLINE: usize = 16 << 10;

    pub fn clear(&mut self) {
        self.staged.clear();
        self.cuts.clear();
    }

    /// Where to encode frames and heads.
    pub fn staged(&mut self) -> &mut Vec<u8> {
        &mut self.staged
    }

    /// The payload of batch item `item` follows what was staged so far.
    pub fn payload(&mut self, item: usize) {
        self.cuts.push((self.staged.len(), item));
    }

    /// The parts to send, with `payload` giving each item's payload.
    pub fn parts<'a>(&'a self, payload: impl Fn(usize) -> &'a [u8]) -> Vec<&'a [u8]> {
        let mut parts = Vec::with_capacity(2 * self.cuts.len() + 1);
        let mut start = 0;
        for &(at, item) in &self.cuts {
            parts.push(&self.staged[start..at]);
            parts.push(payload(item));
            start = at;
        }
        parts.push(&self.staged[start..]);
        parts
    }
}

/// The receiving half of a channel.
pub struct Receiver<R> {
    reader: R,
    key: RecordKey,
    nonce: u64,
    /// Ciphertext as read, whole records and a partial one; records start at `in_pos`.
    /// One read takes in as many records as the socket has, so a large frame costs a few
    /// reads, not two per record.
    input: Vec<u8>,
    in_pos: usize,
    in_end: usize,
    /// Decrypted bytes; frames are decoded from `pos` to `end`.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
    /// A [`recv_owned`](Self::recv_owned) stopped inside a payload (dropped, or failed):
    /// the stream is lost.
    torn: bool,
}

/// A REQUEST or REPLY whose payload is in a buffer of its own, from a [`Pool`].
#[derive(Debug)]
pub struct OwnedFrame {
    pub head: Head,
    pub payload: Vec<u8>,
}

/// Bytes of ciphertext read at once, at most.
const INPUT_BUFFER: usize = 256 << 10;
/// Bytes of the longest frame head: what [`Receiver::recv_owned`] buffers before the payload.
const HEAD_MAX: usize = protocol::FRAME_HEADER
    + if protocol::REQUEST_HEADER > protocol::REPLY_HEADER {
        protocol::REQUEST_HEADER
    } else {
        protocol::REPLY_HEADER
    };

impl<R> Receiver<R> {
    /// Whether everything read from the stream so far was returned as frames: the peer has
    /// sent nothing more yet, as far as this side knows.
    pub fn is_drained(&self) -> bool {
        self.pos == self.end && self.in_pos == self.in_end
    }

    /// The same channel, read through `reader` from here on (the same stream, read another
    /// way); what was read and not yet decoded is kept.
    pub fn with_reader<R2>(self, reader: R2) -> Receiver<R2> {
        let Receiver {
            reader: _,
            key,
            nonce,
            input,
            in_pos,
            in_end,
            plain,
            pos,
            end,
            torn,
        } = self;
        Receiver {
            reader,
            key,
            nonce,
            input,
            in_pos,
            in_end,
            plain,
            pos,
            end,
            torn,
        }
    }
}

impl<R: AsyncRead + Unpin> Receiver<R> {
    /// Returns the next frame, reading and decrypting records as needed. A frame longer
    /// than `limits` allows is refused from its header, before it is buffered.
    /// `Ok(None)` means the peer closed the stream cleanly between frames.
    pub async fn recv(&mut self, limits: &Limits) -> Result<Option<Frame<'_>>, ChannelError> {
        if self.buffer(limits, usize::MAX).await?.is_none() {
            return Ok(None);
        }
        let (frame, used) = protocol::decode_frame(&self.plain[self.pos..self.end], limits)?;
        self.pos += used;
        Ok(Some(frame))
    }

    /// Returns the next frame, a REQUEST or REPLY, with its payload in a buffer from
    /// `pool`: records that lie within the payload are decrypted straight into it, and
    /// only pieces of records shared with other frames are copied. Limits are enforced
    /// from the head, before anything is buffered. `Ok(None)` as for [`recv`](Self::recv).
    /// Dropping the future inside a payload leaves the receiver unusable.
    pub async fn recv_owned(
        &mut self,
        limits: &Limits,
        pool: &Pool,
    ) -> Result<Option<OwnedFrame>, ChannelError> {
        let frame = self.recv_admitted(limits, pool, |_| async {}).await?;
        Ok(frame.map(|(frame, ())| frame))
    }

    /// [`recv_owned`](Self::recv_owned), with `admit` awaited once the frame's head is
    /// decoded and before its payload is buffered: the server waits there for room in its
    /// budget, so a request it has no room for stays in the socket. Dropping the future
    /// while `admit` waits leaves the receiver as it was.
    pub async fn recv_admitted<T, F: std::future::Future<Output = T>>(
        &mut self,
        limits: &Limits,
        pool: &Pool,
        admit: impl FnOnce(&Head) -> F,
    ) -> Result<Option<(OwnedFrame, T)>, ChannelError> {
        let Some(total) = self.buffer(limits, HEAD_MAX).await? else {
            return Ok(None);
        };
        let Some((head, head_len)) =
            protocol::decode_head(&self.plain[self.pos..self.end], limits)?
        else {
            return Err(ChannelError::Protocol(
                "negotiation frame after negotiation".into(),
            ));
        };
        let admitted = admit(&head).await;
        let len = total - head_len;
        let start = self.pos + head_len;
        let here = (self.end - start).min(len);
        if here == len {
            self.pos = start + len;
            let payload = pool.copy_of(&self.plain[start..self.pos]);
            return Ok(Some((OwnedFrame { head, payload }, admitted)));
        }
        let mut payload = pool.take(len);
        payload[..here].copy_from_slice(&self.plain[start..start + here]);
        (self.pos, self.end) = (0, 0);
        self.torn = true;
        let mut filled = here;
        while filled < len {
            let Some((at, n)) = self.next_record().await? else {
                return Err(ChannelError::Protocol("stream ended inside a frame".into()));
            };
            let record = &self.input[at..at + n];
            if filled + n - TAG_LEN <= len {
                filled += open(&self.key, &mut self.nonce, record, &mut payload[filled..])?;
            } else {
                // The record holds the payload's end and the start of what follows.
                if self.plain.len() < NOISE_MAX {
                    self.plain.resize(NOISE_MAX, 0);
                }
                self.end = open(&self.key, &mut self.nonce, record, &mut self.plain)?;
                self.pos = len - filled;
                payload[filled..len].copy_from_slice(&self.plain[..self.pos]);
                filled = len;
            }
        }
        self.torn = false;
        Ok(Some((OwnedFrame { head, payload }, admitted)))
    }

    /// Reads records until `plain` holds the next frame from `pos`, or at least its first
    /// `at_least` bytes; returns the frame's length, or `None` at a clean end of stream
    /// between frames.
    async fn buffer(
        &mut self,
        limits: &Limits,
        at_least: usize,
    ) -> Result<Option<usize>, ChannelError> {
        if self.torn {
            return Err(ChannelError::Protocol(
                "a receive was abandoned inside a frame".into(),
            ));
        }
        if self.pos == self.end {
            (self.pos, self.end) = (0, 0);
        }
        loop {
            let need = match protocol::frame_len(&self.plain[self.pos..self.end], limits) {
                Ok(n) if self.end - self.pos >= n.min(at_least) => return Ok(Some(n)),
                Ok(n) => n.min(at_least),
                Err(DecodeError::Incomplete) => protocol::FRAME_HEADER,
                Err(e) => return Err(e.into()),
            };
            self.make_room(need);
            let at_boundary = self.pos == self.end;
            if !self.read_record().await? {
                return if at_boundary {
                    Ok(None)
                } else {
                    Err(ChannelError::Protocol("stream ended inside a frame".into()))
                };
            }
        }
    }

    /// Makes `plain` able to hold a frame of `need` bytes from `pos` plus one more record.
    fn make_room(&mut self, need: usize) {
        let want = need.max(self.end - self.pos) + NOISE_MAX;
        if self.pos + want > self.plain.len() && self.pos > 0 {
            self.plain.copy_within(self.pos..self.end, 0);
            (self.pos, self.end) = (0, self.end - self.pos);
        }
        if want > self.plain.len() {
            self.plain.resize(want, 0);
        }
    }

    /// Reads and decrypts one record onto `plain`; false at a clean end of stream.
    async fn read_record(&mut self) -> Result<bool, ChannelError> {
        let Some((at, len)) = self.next_record().await? else {
            return Ok(false);
        };
        let record = &self.input[at..at + len];
        self.end += open(
            &self.key,
            &mut self.nonce,
            record,
            &mut self.plain[self.end..],
        )?;
        Ok(true)
    }

    /// Where the next whole record lies in `input`, reading as needed; `None` at a clean
    /// end of stream.
    async fn next_record(&mut self) -> Result<Option<(usize, usize)>, ChannelError> {
        loop {
            let avail = self.in_end - self.in_pos;
            if avail >= 2 {
                let len = u16::from_be_bytes([self.input[self.in_pos], self.input[self.in_pos + 1]])
                    as usize;
                if len <= TAG_LEN {
                    return Err(ChannelError::Protocol(format!("record of {len} bytes")));
                }
                if avail >= 2 + len {
                    let at = self.in_pos + 2;
                    self.in_pos += 2 + len;
                    return Ok(Some((at, len)));
                }
            }
            if self.input.len() - self.in_end < 2 + NOISE_MAX {
                self.input.copy_within(self.in_pos..self.in_end, 0);
                (self.in_pos, self.in_end) = (0, avail);
            }
            let n = self.reader.read(&mut self.input[self.in_end..]).await?;
            if n == 0 {
                return if avail == 0 {
                    Ok(None)
                } else {
                    Err(ChannelError::Protocol(
                        "stream ended inside a record".into(),
                    ))
                };
            }
            self.in_end += n;
        }
    }
}

/// Decrypts the record with the next nonce onto the start of `out`; returns the
/// plaintext's length.
fn open(
    key: &RecordKey,
    nonce: &mut u64,
    record: &[u8],
    out: &mut [u8],
) -> Result<usize, ChannelError> {
    let n = record.len() - TAG_LEN;
    key.open(*nonce, record, &mut out[..n])
        .map_err(|_| ChannelError::Decrypt)?;
    *nonce += 1;
    Ok(n)
}

/// Channels over socket pairs, for tests here and of the modules that use channels.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
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

#[cfg(test)]
mod tests {
    use super::testing::pair;
    use super::*;
    use crate::protocol::{Op, ReplyHeader, RequestHeader};
    use proptest::prelude::*;
    use smol::net::unix::UnixStream;

    fn write(txid: u64, len: usize) -> (RequestHeader, Vec<u8>) {
        let h = RequestHeader {
            op: Op::Write,
            flags: 0,
            txid,
            floor: 1,
            offset: 0,
            length: len as u32,
        };
        (h, (0..len).map(|i| (i as u64 * 31 + txid) as u8).collect())
    }

    #[test]
    fn frames_of_every_size_cross_records_and_reads_intact() {
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        let sizes: Vec<usize> = (0..120)
            .map(|i| (i * 7919 + i * i * 131) % 300_000)
            .collect();
        let limits = Limits {
            max_transfer: 300_000,
        };
        let expect = sizes.clone();
        let sender = std::thread::spawn(move || {
            smol::block_on(async {
                // Batches of one to four frames per send, so records hold pieces of several.
                let mut buf = Vec::new();
                for (i, len) in sizes.iter().enumerate() {
                    let (h, data) = write(i as u64 + 1, *len);
                    crate::protocol::encode_request(&mut buf, &h, &data);
                    if i % 4 == 3 {
                        tx.send(&buf).await.unwrap();
                        buf.clear();
                    }
                }
                tx.send(&buf).await.unwrap();
                tx.close().await.unwrap();
            })
        });
        smol::block_on(async {
            for (i, len) in expect.iter().enumerate() {
                let (h, data) = write(i as u64 + 1, *len);
                match rx.recv(&limits).await.unwrap() {
                    Some(Frame::Request(got, d)) => {
                        assert_eq!(got, h);
                        assert!(d == data.as_slice(), "frame {i} payload");
                    }
                    other => panic!("frame {i}: {other:?}"),
                }
            }
            assert!(rx.recv(&limits).await.unwrap().is_none(), "clean end");
        });
        sender.join().unwrap();
    }

    /// A frame of `len` payload bytes: a WRITE request, or for odd `txid` a READ reply.
    fn owned(txid: u64, len: usize) -> OwnedFrame {
        let (h, payload) = write(txid, len);
        let head = if txid.is_multiple_of(2) {
            Head::Request(h)
        } else {
            Head::Reply(ReplyHeader { txid, status: 0 })
        };
        OwnedFrame { head, payload }
    }

    /// Sends the frames of `sizes` in batches, each frame ending a batch where `ends` says.
    /// A batch is either encoded whole into one buffer, so records cut frames anywhere, or
    /// (every other one) sent as [`Outgoing`] parts, large payloads in records of their own.
    fn send_frames(mut tx: Sender<UnixStream>, sizes: Vec<usize>, ends: Vec<bool>) {
        smol::block_on(async {
            let mut out = Outgoing::default();
            let mut frames = Vec::new();
            let mut batches = 0;
            for (i, len) in sizes.iter().enumerate() {
                frames.push(owned(i as u64 + 1, *len));
                if !ends[i % ends.len()] && i + 1 < sizes.len() {
                    continue;
                }
                batches += 1;
                out.clear();
                for (j, f) in frames.iter().enumerate() {
                    let whole = batches % 2 == 0 || f.payload.len() < Outgoing::INLINE;
                    let payload = if whole { f.payload.as_slice() } else { &[] };
                    let staged = out.staged();
                    match f.head {
                        Head::Request(h) if whole => protocol::encode_request(staged, &h, payload),
                        Head::Request(h) => {
                            protocol::encode_request_head(staged, &h, f.payload.len())
                        }
                        Head::Reply(h) if whole => protocol::encode_reply(staged, &h, payload),
                        Head::Reply(h) => protocol::encode_reply_head(staged, &h, f.payload.len()),
                    }
                    if !whole {
                        out.payload(j);
                    }
                }
                tx.send_parts(&out.parts(|j| &frames[j].payload))
                    .await
                    .unwrap();
                frames.clear();
            }
            tx.close().await.unwrap();
        })
    }

    /// Receives the frames of `sizes` with `recv_owned`, checking each.
    fn receive_owned(rx: &mut Receiver<UnixStream>, sizes: &[usize], pool: &Pool) {
        let limits = Limits {
            max_transfer: 300_000,
        };
        smol::block_on(async {
            for (i, len) in sizes.iter().enumerate() {
                let want = owned(i as u64 + 1, *len);
                let got = rx.recv_owned(&limits, pool).await.unwrap().unwrap();
                assert_eq!(got.head, want.head, "frame {i}");
                assert!(got.payload == want.payload, "frame {i}: payload of {len}");
                pool.put(got.payload);
            }
            assert!(rx.recv_owned(&limits, pool).await.unwrap().is_none());
        });
    }

    #[test]
    fn owned_payloads_cross_records_and_read_intact() {
        let ((tx, _), (_, mut rx)) = pair(Cipher::AesGcm);
        let sizes: Vec<usize> = (0..160)
            .map(|i| match i % 5 {
                0 => (i * 7919 + i * i * 131) % 300_000,
                1 => i * 37,
                2 => RECORD_PLAINTEXT * (i % 4) + i % 3,
                3 => Outgoing::INLINE + i,
                _ => 0,
            })
            .collect();
        let ends: Vec<bool> = (0..13).map(|i| i % 3 == 0 || i == 7).collect();
        let expect = sizes.clone();
        let sender = std::thread::spawn(move || send_frames(tx, sizes, ends));
        let pool = Pool::new(4 << 20);
        receive_owned(&mut rx, &expect, &pool);
        sender.join().unwrap();
    }

    #[test]
    fn owned_and_borrowed_receives_mix_on_one_stream() {
        let ((tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        let sizes = [100_000, 10, 70_000, 65_000, 3, 200_000, 0, 5000];
        let sender = std::thread::spawn(move || send_frames(tx, sizes.to_vec(), vec![false, true]));
        let limits = Limits {
            max_transfer: 300_000,
        };
        let pool = Pool::new(1 << 20);
        smol::block_on(async {
            for (i, len) in sizes.iter().enumerate() {
                let want = owned(i as u64 + 1, *len);
                if i % 2 == 0 {
                    let got = rx.recv_owned(&limits, &pool).await.unwrap().unwrap();
                    assert!(got.head == want.head && got.payload == want.payload, "{i}");
                } else {
                    let got = rx.recv(&limits).await.unwrap().unwrap();
                    let expected = match want.head {
                        Head::Request(h) => Frame::Request(h, &want.payload),
                        Head::Reply(h) => Frame::Reply(h, &want.payload),
                    };
                    assert!(got == expected, "{i}");
                }
            }
        });
        sender.join().unwrap();
    }

    #[test]
    fn owned_receives_enforce_limits_from_the_head() {
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        let limits = Limits { max_transfer: 4096 };
        let pool = Pool::new(1 << 20);
        smol::block_on(async {
            // A frame that declares 2 GiB: refused from its length alone.
            tx.send(&[0x7f, 0xff, 0xff, 0xff, 3]).await.unwrap();
            let err = rx.recv_owned(&limits, &pool).await.unwrap_err();
            assert!(err.to_string().contains("over the limit"), "{err}");
        });
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        smol::block_on(async {
            // Refused from their heads, payloads unsent: a read over the maximum transfer,
            // a write whose frame holds less than its length.
            let (mut h, _) = write(1, 8192);
            h.op = Op::Read;
            let mut head = Vec::new();
            protocol::encode_request_head(&mut head, &h, 0);
            tx.send(&head).await.unwrap();
            let err = rx.recv_owned(&limits, &pool).await.unwrap_err();
            assert!(err.to_string().contains("maximum transfer"), "{err}");
        });
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        smol::block_on(async {
            let (h, _) = write(1, 4096);
            let mut head = Vec::new();
            protocol::encode_request_head(&mut head, &h, 4000);
            tx.send(&head).await.unwrap();
            let err = rx.recv_owned(&limits, &pool).await.unwrap_err();
            assert!(err.to_string().contains("payload bytes"), "{err}");
        });
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        smol::block_on(async {
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
            tx.send(&hello).await.unwrap();
            assert!(rx.recv_owned(&limits, &pool).await.is_err());
        });
    }

    #[test]
    fn a_stream_ending_inside_an_owned_payload_is_an_error() {
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
        let limits = Limits {
            max_transfer: 1 << 20,
        };
        let pool = Pool::new(1 << 20);
        smol::block_on(async {
            let (h, data) = write(1, 200_000);
            let mut frame = Vec::new();
            protocol::encode_request(&mut frame, &h, &data);
            tx.send(&frame[..150_000]).await.unwrap();
            tx.close().await.unwrap();
            let err = rx.recv_owned(&limits, &pool).await.unwrap_err();
            assert!(err.to_string().contains("inside a frame"), "{err}");
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn owned_payloads_read_intact_whatever_the_record_boundaries(
            sizes in proptest::collection::vec(
                prop_oneof![0usize..100, 0usize..20_000, 0usize..300_000], 1..24),
            ends in proptest::collection::vec(any::<bool>(), 1..8),
        ) {
            let ((tx, _), (_, mut rx)) = pair(Cipher::ChaChaPoly);
            let expect = sizes.clone();
            let sender = std::thread::spawn(move || send_frames(tx, sizes, ends));
            receive_owned(&mut rx, &expect, &Pool::new(1 << 20));
            sender.join().unwrap();
        }
    }

    /// Snow's 25519 DH, but posing where told: a static key set with `set` (if
    /// `weak_static`) or an ephemeral one from `generate` (if `weak_ephemeral`) has the
    /// all-zero point as its public half, and its DH results are the zeros that an honest
    /// peer computes with that point. What an attacker without any private key does.
    struct PoseDh {
        inner: Box<dyn snow::types::Dh>,
        weak_static: bool,
        weak_ephemeral: bool,
        weak: bool,
    }

    impl snow::types::Dh for PoseDh {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn pub_len(&self) -> usize {
            32
        }
        fn priv_len(&self) -> usize {
            32
        }
        fn set(&mut self, privkey: &[u8]) {
            self.inner.set(privkey);
            self.weak = self.weak_static;
        }
        fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
            self.weak = self.weak_ephemeral;
            self.inner.generate(rng)
        }
        fn pubkey(&self) -> &[u8] {
            if self.weak {
                &[0; 32]
            } else {
                self.inner.pubkey()
            }
        }
        fn privkey(&self) -> &[u8] {
            self.inner.privkey()
        }
        fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
            if self.weak {
                out[..32].fill(0);
                return Ok(());
            }
            self.inner.dh(pubkey, out)
        }
    }

    struct PoseResolver {
        weak_static: bool,
        weak_ephemeral: bool,
    }

    impl snow::resolvers::CryptoResolver for PoseResolver {
        fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
            None
        }
        fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
            Some(Box::new(PoseDh {
                inner: snow::resolvers::DefaultResolver.resolve_dh(choice)?,
                weak_static: self.weak_static,
                weak_ephemeral: self.weak_ephemeral,
                weak: false,
            }))
        }
        fn resolve_hash(
            &self,
            _choice: &snow::params::HashChoice,
        ) -> Option<Box<dyn snow::types::Hash>> {
            None
        }
        fn resolve_cipher(
            &self,
            _choice: &snow::params::CipherChoice,
        ) -> Option<Box<dyn snow::types::Cipher>> {
            None
        }
    }

    /// A snow builder for a peer that poses with weak keys, as [`PoseDh`] says.
    fn pose_builder(weak_static: bool, weak_ephemeral: bool) -> snow::Builder<'static> {
        use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
        let rest = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
        let pose = PoseResolver {
            weak_static,
            weak_ephemeral,
        };
        snow::Builder::with_resolver(
            Cipher::ChaChaPoly.noise_params(),
            Box::new(FallbackResolver::new(Box::new(pose), Box::new(rest))),
        )
    }

    /// A client's first Noise message to `server`, forged with weak keys.
    fn forged_first_message(
        server: &PublicKey,
        weak_static: bool,
        weak_ephemeral: bool,
    ) -> Vec<u8> {
        let pre = preamble(Cipher::ChaChaPoly);
        let mut hs = pose_builder(weak_static, weak_ephemeral)
            .local_private_key(crate::keys::generate().bytes())
            .and_then(|b| b.remote_public_key(&server.0))
            .and_then(|b| b.prologue(&pre))
            .and_then(|b| b.build_initiator())
            .unwrap();
        let mut msg = vec![0u8; NOISE_MAX];
        let n = hs.write_message(&[], &mut msg).unwrap();
        msg.truncate(n);
        msg
    }

    /// Runs the server's handshake, admitting every key, against a forged first message;
    /// returns the result, whether `authorize` was asked, and the bytes the server sent.
    fn forge_against_server(
        weak_static: bool,
        weak_ephemeral: bool,
    ) -> (Result<PublicKey, ChannelError>, bool, Vec<u8>) {
        let server_key = crate::keys::generate();
        let msg = forged_first_message(&server_key.public(), weak_static, weak_ephemeral);
        let (mut a, b) = UnixStream::pair().unwrap();
        let asked = std::cell::Cell::new(false);
        smol::block_on(async {
            let forger = async {
                a.write_all(&u16_message(&preamble(Cipher::ChaChaPoly), &msg))
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                let _ = a.read_to_end(&mut answer).await;
                answer
            };
            let server = async {
                let result = accept(b.clone(), b, &server_key, &Cipher::ALL, |_| {
                    asked.set(true);
                    Ok(())
                })
                .await;
                result.map(|(_, _, key)| key)
            };
            let (answer, result) = smol::future::zip(forger, server).await;
            (result, asked.get(), answer)
        })
    }

    #[test]
    fn snow_alone_admits_a_weak_client_key() {
        // Why the checks exist: snow 0.10 reads the forged message without complaint.
        let server_key = crate::keys::generate();
        let msg = forged_first_message(&server_key.public(), true, false);
        let pre = preamble(Cipher::ChaChaPoly);
        let mut hs = snow::Builder::new(Cipher::ChaChaPoly.noise_params())
            .local_private_key(server_key.bytes())
            .and_then(|b| b.prologue(&pre))
            .and_then(|b| b.build_responder())
            .unwrap();
        let mut payload = vec![0u8; NOISE_MAX];
        hs.read_message(&msg, &mut payload).unwrap();
        assert_eq!(hs.get_remote_static(), Some(&[0u8; 32][..]));
    }

    #[test]
    fn a_weak_client_key_is_refused_before_authorize_is_asked() {
        let (result, asked, answer) = forge_against_server(true, false);
        assert!(!asked, "authorize must not see a weak key");
        match result {
            Err(ChannelError::Refused(Refusal::ClientKey, why)) => {
                assert!(why.contains("is a low-order (weak) key"), "{why}");
            }
            Err(e) => panic!("expected a client-key refusal, got {e}"),
            Ok(key) => panic!("admitted weak key {key}"),
        }
        // The forger hears why, in clear.
        assert_eq!(answer[0], Refusal::ClientKey as u8);
        let why = String::from_utf8_lossy(&answer[3..]);
        assert!(why.contains("low-order (weak) key"), "{why}");
    }

    #[test]
    fn a_weak_client_ephemeral_ends_the_handshake() {
        for weak_static in [false, true] {
            let (result, asked, _) = forge_against_server(weak_static, true);
            assert!(!asked);
            match result {
                Err(ChannelError::Protocol(why)) => {
                    assert!(why.contains("low-order (weak) ephemeral"), "{why}")
                }
                Err(e) => panic!("expected a protocol error, got {e}"),
                Ok(key) => panic!("admitted {key}"),
            }
        }
        // The forger is honest otherwise: with its own keys it is admitted.
        let (result, asked, _) = forge_against_server(false, false);
        assert!(asked && result.is_ok());
    }

    #[test]
    fn a_weak_server_ephemeral_ends_the_handshake() {
        let (server_key, client_key) = (crate::keys::generate(), crate::keys::generate());
        let server_pub = server_key.public();
        let (a, mut b) = UnixStream::pair().unwrap();
        smol::block_on(async {
            let client = connect(a.clone(), a, &client_key, &server_pub, Cipher::ChaChaPoly);
            // A server that holds the real key but answers with a weak ephemeral one.
            let server = async {
                let mut pre = [0u8; 8];
                b.read_exact(&mut pre).await.unwrap();
                let mut msg = Vec::new();
                read_u16_message(&mut b, &mut msg).await.unwrap();
                let mut hs = pose_builder(false, true)
                    .local_private_key(server_key.bytes())
                    .and_then(|b| b.prologue(&pre))
                    .and_then(|b| b.build_responder())
                    .unwrap();
                let mut payload = vec![0u8; NOISE_MAX];
                hs.read_message(&msg, &mut payload).unwrap();
                let mut answer = vec![0u8; NOISE_MAX];
                let n = hs.write_message(&[], &mut answer).unwrap();
                b.write_all(&u16_message(&[0], &answer[..n])).await.unwrap();
            };
            let (result, ()) = smol::future::zip(client, server).await;
            match result {
                Err(ChannelError::Protocol(why)) => {
                    assert!(why.contains("low-order (weak) ephemeral"), "{why}")
                }
                Err(e) => panic!("expected a protocol error, got {e}"),
                Ok(_) => panic!("the client accepted a weak ephemeral key"),
            }
        });
    }

    #[test]
    fn an_all_zero_diffie_hellman_result_is_an_error() {
        use snow::resolvers::CryptoResolver;
        let mut dh = NonzeroDhResolver
            .resolve_dh(&snow::params::DHChoice::Curve25519)
            .unwrap();
        dh.set(crate::keys::generate().bytes());
        let mut out = [0u8; 32];
        let mut p_plus_1 = [0xffu8; 32];
        (p_plus_1[0], p_plus_1[31]) = (0xee, 0xff);
        for weak in [[0u8; 32], p_plus_1] {
            assert!(PublicKey(weak).is_weak());
            assert!(matches!(dh.dh(&weak, &mut out), Err(snow::Error::Dh)));
        }
        dh.dh(&crate::keys::generate().public().0, &mut out)
            .unwrap();
        assert_ne!(out, [0u8; 32]);
    }

    #[test]
    fn a_flipped_ciphertext_byte_fails_authentication() {
        let ((mut tx, _), (_, mut rx)) = pair(Cipher::AesGcm);
        // Reroute both ends through sockets we hold, to alter the bytes in between.
        let (mut wire_out, client_end) = UnixStream::pair().unwrap();
        let (mut wire_in, server_end) = UnixStream::pair().unwrap();
        tx.writer = client_end;
        rx.reader = server_end;
        let (h, data) = write(1, 1000);
        let mut buf = Vec::new();
        crate::protocol::encode_request(&mut buf, &h, &data);
        let limits = Limits { max_transfer: 4096 };
        smol::block_on(async {
            tx.send(&buf).await.unwrap();
            let mut wire = vec![0u8; buf.len() + 2 + TAG_LEN];
            wire_out.read_exact(&mut wire).await.unwrap();
            wire[100] ^= 1;
            wire_in.write_all(&wire).await.unwrap();
            assert!(matches!(rx.recv(&limits).await, Err(ChannelError::Decrypt)));
        });
    }
}
