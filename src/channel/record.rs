//! The record layer without I/O: an [`Encoder`] seals frames into records and holds them
//! until they are written; a [`Decoder`] is fed ciphertext and gives back frames, or
//! payloads opened straight into pooled buffers. The async halves in `stream` only move
//! bytes between these and a socket, so every path here is tested and fuzzed in memory.
//!
//! A record is `len:u16 ciphertext`, `len` between the tag's 16 bytes and 65535. Each side's
//! first record is its verdict on the other ([`handshake::verdict`](super::handshake)), the
//! rest one stream of frames.

use std::fmt;
use std::sync::Arc;

use super::handshake;
use super::{ChannelError, NOISE_MAX, RECORD_PLAINTEXT};
use crate::cipher::{RecordKey, Unauthentic, TAG_LEN};
use crate::pool::Pool;
use crate::protocol::{self, DecodeError, Frame, Head, Limits};

/// Bytes of ciphertext a decoder takes in at once, at most: as many records as the socket
/// has, so a large frame costs a few reads, not two per record.
pub const INPUT_BUFFER: usize = 256 << 10;
/// Bytes of the longest frame head: what [`Decoder::buffer`] gathers before a payload that
/// goes to a buffer of its own.
pub const HEAD_MAX: usize = protocol::FRAME_HEADER
    + if protocol::REQUEST_HEADER > protocol::REPLY_HEADER {
        protocol::REQUEST_HEADER
    } else {
        protocol::REPLY_HEADER
    };

/// Seals plaintext into records, each with the next nonce, and keeps them until written.
pub struct Encoder {
    /// Shared with the payloads sealed apart, which open with it to be sent again.
    key: Arc<RecordKey>,
    nonce: u64,
    /// Records sealed and not yet written: `out[written..sealed]`.
    out: Vec<u8>,
    written: usize,
    sealed: usize,
}

impl Encoder {
    pub fn new(key: RecordKey) -> Encoder {
        Encoder {
            key: Arc::new(key),
            nonce: 0,
            out: Vec::new(),
            written: 0,
            sealed: 0,
        }
    }

    /// Encrypts the parts, in order, after whatever was sealed before. Parts are encrypted
    /// where they lie, so a large payload goes from its buffer into the ciphertext without
    /// a copy; each part starts a record.
    pub fn seal_parts(&mut self, parts: &[&[u8]]) {
        if self.written == self.sealed {
            (self.written, self.sealed) = (0, 0);
        }
        let total = self.sealed + parts.iter().map(|p| sealed_len(p.len())).sum::<usize>();
        if self.out.len() < total {
            self.out.resize(total, 0);
        }
        for part in parts {
            let at = self.sealed;
            self.sealed += sealed_len(part.len());
            self.nonce = seal_records(&self.key, self.nonce, part, &mut self.out[at..]);
        }
    }

    /// Seals `payload` as [`seal_parts`](Self::seal_parts) would seal it as the next part,
    /// but into `buf` instead of the stream's buffer: the caller writes the records right
    /// after [`pending`](Self::pending), and may keep them in place of a plain copy.
    pub fn seal_apart(&mut self, payload: &[u8], mut buf: Vec<u8>) -> Sealed {
        buf.resize(sealed_len(payload.len()), 0);
        let nonce = self.nonce;
        self.nonce = seal_records(&self.key, nonce, payload, &mut buf);
        Sealed {
            records: buf,
            key: self.key.clone(),
            nonce,
            len: payload.len(),
        }
    }

    /// Sealed records not yet written.
    pub fn pending(&self) -> &[u8] {
        &self.out[self.written..self.sealed]
    }

    /// The first `n` bytes of [`pending`](Self::pending) are written.
    pub fn consume(&mut self, n: usize) {
        self.written = (self.written + n).min(self.sealed);
    }
}

/// Bytes of the records that carry `len` bytes of plaintext.
fn sealed_len(len: usize) -> usize {
    len + len.div_ceil(RECORD_PLAINTEXT) * (2 + TAG_LEN)
}

/// Seals `plain` into records at the start of `out`, the first with `nonce`; returns the
/// nonce after the last.
fn seal_records(key: &RecordKey, mut nonce: u64, plain: &[u8], out: &mut [u8]) -> u64 {
    let mut at = 0;
    for chunk in plain.chunks(RECORD_PLAINTEXT) {
        let n = chunk.len() + TAG_LEN;
        out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        key.seal(nonce, chunk, &mut out[at + 2..at + 2 + n]);
        nonce += 1;
        at += 2 + n;
    }
    nonce
}

/// A payload sealed apart from the stream ([`Encoder::seal_apart`]): its records as they
/// went on the wire, and the key and first nonce that open them again. A sender keeps this
/// in place of a plain copy, and opens it only to send it again.
pub struct Sealed {
    records: Vec<u8>,
    key: Arc<RecordKey>,
    nonce: u64,
    len: usize,
}

impl Sealed {
    /// The records, as written after the stream's pending bytes.
    pub fn records(&self) -> &[u8] {
        &self.records
    }

    /// Bytes of plaintext.
    pub fn plain_len(&self) -> usize {
        self.len
    }

    /// The plaintext again, into `out` (resized to it).
    pub fn open(&self, out: &mut Vec<u8>) -> Result<(), Unauthentic> {
        out.resize(self.len, 0);
        let (mut at, mut to, mut nonce) = (0, 0, self.nonce);
        while at < self.records.len() {
            let n = u16::from_be_bytes([self.records[at], self.records[at + 1]]) as usize;
            let record = &self.records[at + 2..at + 2 + n];
            self.key
                .open(nonce, record, &mut out[to..to + n - TAG_LEN])?;
            (at, to, nonce) = (at + 2 + n, to + n - TAG_LEN, nonce + 1);
        }
        Ok(())
    }

    /// The buffer of the records, for its pool.
    pub fn into_buffer(self) -> Vec<u8> {
        self.records
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("len", &self.len)
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

/// Frames gathered for one [`Encoder::seal_parts`]: heads and small payloads copied into a
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

/// A REQUEST or REPLY whose payload is in a buffer of its own, from a [`Pool`].
#[derive(Debug)]
pub struct OwnedFrame {
    pub head: Head,
    pub payload: Vec<u8>,
}

/// An [`OwnedFrame`] whose payload is being opened into its buffer.
pub struct Filling {
    head: Head,
    payload: Vec<u8>,
    filled: usize,
}

impl Filling {
    pub fn into_frame(self) -> OwnedFrame {
        OwnedFrame {
            head: self.head,
            payload: self.payload,
        }
    }
}

/// Opens records fed to it and decodes the frames in them.
pub struct Decoder {
    key: RecordKey,
    nonce: u64,
    /// Ciphertext as fed, whole records and a partial one; records start at `in_pos`.
    input: Vec<u8>,
    in_pos: usize,
    in_end: usize,
    /// Opened bytes; frames are decoded from `pos` to `end`.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
    /// The peer's first record, its verdict, is still to come.
    verdict: bool,
    /// A payload is being opened into a [`Filling`]: until it is whole, the stream has no
    /// frame boundary here, and if the filling is abandoned the stream is lost.
    torn: bool,
}

impl Decoder {
    pub fn new(key: RecordKey) -> Decoder {
        Decoder {
            key,
            nonce: 0,
            input: vec![0; INPUT_BUFFER],
            in_pos: 0,
            in_end: 0,
            plain: Vec::new(),
            pos: 0,
            end: 0,
            verdict: true,
            torn: false,
        }
    }

    /// Where to put ciphertext: room for at least a whole record, at most [`INPUT_BUFFER`].
    /// Then [`filled`](Self::filled) says how much went there.
    pub fn space(&mut self) -> &mut [u8] {
        if self.input.len() - self.in_end < 2 + NOISE_MAX {
            self.input.copy_within(self.in_pos..self.in_end, 0);
            (self.in_pos, self.in_end) = (0, self.in_end - self.in_pos);
        }
        &mut self.input[self.in_end..]
    }

    /// `n` bytes were put at the start of [`space`](Self::space).
    pub fn filled(&mut self, n: usize) {
        self.in_end = (self.in_end + n).min(self.input.len());
    }

    /// Copies as much of `bytes` as there is room for; returns how much.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let space = self.space();
        let n = bytes.len().min(space.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.filled(n);
        n
    }

    /// Whether everything fed so far was returned as frames: the peer has sent nothing
    /// more yet, as far as this side knows.
    pub fn is_drained(&self) -> bool {
        self.pos == self.end && self.in_pos == self.in_end
    }

    /// The stream ended: `Ok` where that is a clean end, between frames.
    pub fn end_of_stream(&self) -> Result<(), ChannelError> {
        if self.in_pos != self.in_end {
            Err(ChannelError::Protocol(
                "stream ended inside a record".into(),
            ))
        } else if self.verdict {
            Err(ChannelError::Protocol(
                "the peer closed the connection during the handshake".into(),
            ))
        } else if self.torn || self.pos != self.end {
            Err(ChannelError::Protocol("stream ended inside a frame".into()))
        } else {
            Ok(())
        }
    }

    /// Opens the peer's first record, its verdict on this side; `Ok(None)` while it has
    /// not come whole, `Ok(Some(()))` once it has (and from then on).
    pub fn verdict(&mut self) -> Result<Option<()>, ChannelError> {
        if !self.verdict {
            return Ok(Some(()));
        }
        let Some((at, n)) = self.next_record()? else {
            return Ok(None);
        };
        let mut plain = vec![0u8; n - TAG_LEN];
        open(
            &self.key,
            &mut self.nonce,
            &self.input[at..at + n],
            &mut plain,
        )?;
        self.verdict = false;
        handshake::verdict(&plain).map(Some)
    }

    /// Opens records until the next frame is buffered, or at least its first `at_least`
    /// bytes; returns the frame's length, or `None` while more input is needed. A frame
    /// longer than `limits` allows is refused from its header.
    pub fn buffer(
        &mut self,
        limits: &Limits,
        at_least: usize,
    ) -> Result<Option<usize>, ChannelError> {
        if self.torn {
            return Err(ChannelError::Protocol(
                "a receive was abandoned inside a frame".into(),
            ));
        }
        if self.verdict()?.is_none() {
            return Ok(None);
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
            let Some((at, n)) = self.next_record()? else {
                return Ok(None);
            };
            let record = &self.input[at..at + n];
            self.end += open(
                &self.key,
                &mut self.nonce,
                record,
                &mut self.plain[self.end..],
            )?;
        }
    }

    /// The frame that [`buffer`](Self::buffer) buffered whole, consumed.
    pub fn frame(&mut self, limits: &Limits) -> Result<Frame<'_>, ChannelError> {
        let (frame, used) = protocol::decode_frame(&self.plain[self.pos..self.end], limits)?;
        self.pos += used;
        Ok(frame)
    }

    /// The head of the REQUEST or REPLY that [`buffer`](Self::buffer) buffered at least
    /// [`HEAD_MAX`] bytes of, and its length; nothing is consumed.
    pub fn head(&self, limits: &Limits) -> Result<(Head, usize), ChannelError> {
        match protocol::decode_head(&self.plain[self.pos..self.end], limits)? {
            Some(head) => Ok(head),
            None => Err(ChannelError::Protocol(
                "negotiation frame after negotiation".into(),
            )),
        }
    }

    /// Consumes the head of [`head`](Self::head) and starts the payload of the frame of
    /// `total` bytes in a buffer from `pool`, with what is already opened copied into it;
    /// [`fill`](Self::fill) opens the rest straight into it.
    pub fn start_payload(
        &mut self,
        head: Head,
        head_len: usize,
        total: usize,
        pool: &Pool,
    ) -> Filling {
        let len = total - head_len;
        let start = self.pos + head_len;
        let here = (self.end - start).min(len);
        if here == len {
            self.pos = start + len;
            let payload = pool.copy_of(&self.plain[start..self.pos]);
            return Filling {
                head,
                payload,
                filled: len,
            };
        }
        let mut payload = pool.take(len);
        payload[..here].copy_from_slice(&self.plain[start..start + here]);
        (self.pos, self.end) = (0, 0);
        self.torn = true;
        Filling {
            head,
            payload,
            filled: here,
        }
    }

    /// Opens the records fed so far into `f`'s payload; true once it is whole. Records
    /// that lie within the payload are opened straight into it; only the one that also
    /// holds what follows is opened aside and its head copied.
    pub fn fill(&mut self, f: &mut Filling) -> Result<bool, ChannelError> {
        let len = f.payload.len();
        while f.filled < len {
            let Some((at, n)) = self.next_record()? else {
                return Ok(false);
            };
            let record = &self.input[at..at + n];
            if f.filled + n - TAG_LEN <= len {
                f.filled += open(
                    &self.key,
                    &mut self.nonce,
                    record,
                    &mut f.payload[f.filled..],
                )?;
            } else {
                if self.plain.len() < NOISE_MAX {
                    self.plain.resize(NOISE_MAX, 0);
                }
                self.end = open(&self.key, &mut self.nonce, record, &mut self.plain)?;
                self.pos = len - f.filled;
                f.payload[f.filled..len].copy_from_slice(&self.plain[..self.pos]);
                f.filled = len;
            }
        }
        self.torn = false;
        Ok(true)
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

    /// Where the next whole record's ciphertext lies in `input`, taken; `None` while it
    /// has not come whole.
    fn next_record(&mut self) -> Result<Option<(usize, usize)>, ChannelError> {
        let avail = self.in_end - self.in_pos;
        if avail < 2 {
            return Ok(None);
        }
        let len =
            u16::from_be_bytes([self.input[self.in_pos], self.input[self.in_pos + 1]]) as usize;
        if len <= TAG_LEN {
            return Err(ChannelError::Protocol(format!("record of {len} bytes")));
        }
        if avail < 2 + len {
            return Ok(None);
        }
        let at = self.in_pos + 2;
        self.in_pos += 2 + len;
        Ok(Some((at, len)))
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

#[cfg(test)]
mod tests;
