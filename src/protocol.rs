//! The dst wire protocol: the frames exchanged inside the encrypted channel, their
//! encoding, and their strict decoding. No I/O lives here.
//!
//! After the Noise handshake the channel carries a plaintext byte stream of frames:
//!
//! ```text
//! frame   = len:u32 kind:u8 body            (len counts kind + body, big endian)
//! HELLO   = fields                          client -> server, once
//! WELCOME = fields                          server -> client, once
//! REQUEST = op:u8 flags:u8 0:u16 txid:u64 floor:u64 offset:u64 length:u32 [data]
//! REPLY   = txid:u64 status:u32 [data]
//! RESIZE  = size:u64                        server -> client, with the RESIZE feature
//! fields  = (tag:u16 len:u16 value)*        unknown tags are skipped, so peers can add fields
//! ```
//!
//! `floor` is the lowest transaction id the client still waits for; the server may forget
//! replies below it. RESIZE tells a client that announced [`features::RESIZE`] in its HELLO
//! the export's new (larger) size. Every length is checked against a limit before anything
//! is allocated.

use std::fmt;

/// Version of the frame layout and semantics; bumped only for incompatible changes.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes before a frame's body: the length and the kind.
pub const FRAME_HEADER: usize = 5;
/// Fixed part of a REQUEST body (after the frame header).
pub const REQUEST_HEADER: usize = 1 + 1 + 2 + 8 + 8 + 8 + 4;
/// Fixed part of a REPLY body (after the frame header).
pub const REPLY_HEADER: usize = 8 + 4;
/// Largest HELLO or WELCOME body; they carry names and numbers, never data.
pub const MAX_NEGOTIATION: usize = 4096;
/// Largest transfer a server ever agrees to, whatever it is configured with.
pub const MAX_TRANSFER_LIMIT: u32 = 32 << 20;
/// Longest export name.
pub const MAX_EXPORT_NAME: usize = 255;

const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_REQUEST: u8 = 3;
const KIND_REPLY: u8 = 4;
const KIND_RESIZE: u8 = 5;
/// Body of a RESIZE frame: the size.
const RESIZE_BODY: usize = 8;

/// Feature flags, announced by the client in HELLO and advertised by the server in WELCOME;
/// one is used only when both sides have it.
pub mod features {
    pub const FLUSH: u64 = 1 << 0;
    pub const FUA: u64 = 1 << 1;
    pub const TRIM: u64 = 1 << 2;
    pub const WRITE_ZEROES: u64 = 1 << 3;
    /// The client takes RESIZE frames: the export grew while it was connected.
    pub const RESIZE: u64 = 1 << 4;
    /// All features this build understands.
    pub const ALL: u64 = FLUSH | FUA | TRIM | WRITE_ZEROES | RESIZE;
}

/// Request flag: the write must be on stable storage before it is acked.
pub const FLAG_FUA: u8 = 1;

/// Errors of decoding: the peer sent something this side will not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// More bytes are needed; not an error of the peer (yet).
    Incomplete,
    /// The frame is malformed; the connection must be closed.
    Malformed(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Incomplete => write!(f, "incomplete frame"),
            DecodeError::Malformed(why) => write!(f, "malformed frame: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Text that came from a peer, made safe for a log or a terminal: control characters
/// (newlines, escape sequences) are shown escaped, everything else as it is.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn malformed<T>(why: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError::Malformed(why.into()))
}

/// What a request asks the export node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Trim = 4,
    WriteZeroes = 5,
    Ping = 6,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::Ping,
            _ => return None,
        })
    }

    /// Whether the request changes the export (and so needs a read-write session).
    pub fn modifies(self) -> bool {
        matches!(self, Op::Write | Op::Trim | Op::WriteZeroes)
    }

    /// Whether `offset` and `length` address a range of the export.
    pub fn has_range(self) -> bool {
        matches!(self, Op::Read | Op::Write | Op::Trim | Op::WriteZeroes)
    }
}

/// Fixed part of a request; the payload of a WRITE travels beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u8,
    pub txid: u64,
    pub floor: u64,
    pub offset: u64,
    pub length: u32,
}

/// Fixed part of a reply; the data of a successful READ travels beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub txid: u64,
    /// 0 for success, else a Linux errno value.
    pub status: u32,
}

mod negotiation;
use negotiation::{decode_hello, decode_welcome};
pub use negotiation::{
    encode_hello, encode_welcome, Access, ExportInfo, Hello, SessionId, Welcome,
};
#[cfg(test)]
use negotiation::{put_field, tag};

/// A decoded frame. Payloads borrow from the buffer they were decoded from.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    Welcome(Welcome),
    Request(RequestHeader, &'a [u8]),
    Reply(ReplyHeader, &'a [u8]),
    /// The export's new size.
    Resize(u64),
}

/// The fixed part of a REQUEST or REPLY frame, decoded before its payload is in, so that a
/// receiver can place the payload where it is wanted (see [`decode_head`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    Request(RequestHeader),
    Reply(ReplyHeader),
    /// A RESIZE frame, which has no payload: the export's new size.
    Resize(u64),
}

// ---------------------------------------------------------------------------------------
// Encoding

fn begin_frame(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    start
}

fn end_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a REQUEST frame to `out`. `data` is the payload of a WRITE, else empty.
pub fn encode_request(out: &mut Vec<u8>, h: &RequestHeader, data: &[u8]) {
    encode_request_head(out, h, data.len());
    out.extend_from_slice(data);
}

/// Appends the head of a REQUEST frame whose `payload` bytes the caller sends right after,
/// from wherever they lie.
pub fn encode_request_head(out: &mut Vec<u8>, h: &RequestHeader, payload: usize) {
    out.extend_from_slice(&((1 + REQUEST_HEADER + payload) as u32).to_be_bytes());
    out.push(KIND_REQUEST);
    encode_request_header_body(out, h);
}

fn encode_request_header_body(out: &mut Vec<u8>, h: &RequestHeader) {
    out.push(h.op as u8);
    out.push(h.flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&h.txid.to_be_bytes());
    out.extend_from_slice(&h.floor.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(&h.length.to_be_bytes());
}

/// Appends a REPLY frame to `out`. `data` is the data of a successful READ, else empty.
pub fn encode_reply(out: &mut Vec<u8>, h: &ReplyHeader, data: &[u8]) {
    encode_reply_head(out, h, data.len());
    out.extend_from_slice(data);
}

/// Appends the head of a REPLY frame whose `payload` bytes the caller sends right after.
pub fn encode_reply_head(out: &mut Vec<u8>, h: &ReplyHeader, payload: usize) {
    out.extend_from_slice(&((1 + REPLY_HEADER + payload) as u32).to_be_bytes());
    out.push(KIND_REPLY);
    out.extend_from_slice(&h.txid.to_be_bytes());
    out.extend_from_slice(&h.status.to_be_bytes());
}

/// Appends a RESIZE frame to `out`.
pub fn encode_resize(out: &mut Vec<u8>, size: u64) {
    let start = begin_frame(out, KIND_RESIZE);
    out.extend_from_slice(&size.to_be_bytes());
    end_frame(out, start);
}

// ---------------------------------------------------------------------------------------
// Decoding

/// Limits a decoder enforces: what was negotiated, or the pre-negotiation defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest READ/WRITE/TRIM length and WRITE/READ payload.
    pub max_transfer: u32,
}

impl Limits {
    /// Largest frame (length field value) these limits allow.
    pub fn max_frame(&self) -> usize {
        1 + REQUEST_HEADER.max(REPLY_HEADER) + (self.max_transfer as usize).max(MAX_NEGOTIATION)
    }
}

/// Length of the first frame in `buf`, header included, once its header is there.
/// Fails if the declared length is over the limits, so a caller can refuse to buffer it.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Incomplete);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    if len == 0 {
        return malformed("empty frame");
    }
    if len > limits.max_frame() {
        return malformed(format!(
            "frame of {len} bytes is over the limit of {}",
            limits.max_frame()
        ));
    }
    Ok(4 + len)
}

/// Decodes the first frame in `buf`. Returns the frame and the bytes it used.
pub fn decode_frame<'a>(buf: &'a [u8], limits: &Limits) -> Result<(Frame<'a>, usize), DecodeError> {
    let total = frame_len(buf, limits)?;
    if buf.len() < total {
        return Err(DecodeError::Incomplete);
    }
    let kind = buf[4];
    let body = &buf[FRAME_HEADER..total];
    let frame = match kind {
        KIND_HELLO => Frame::Hello(decode_hello(body)?),
        KIND_WELCOME => Frame::Welcome(decode_welcome(body)?),
        KIND_REQUEST => {
            let (h, data) = decode_request(body, limits)?;
            Frame::Request(h, data)
        }
        KIND_REPLY => {
            let (h, data) = decode_reply(body, limits)?;
            Frame::Reply(h, data)
        }
        KIND_RESIZE => Frame::Resize(resize_size(body)?),
        k => return malformed(format!("unknown frame kind {k}")),
    };
    Ok((frame, total))
}

/// Decodes the head of the first frame in `buf` without its payload: for a REQUEST or
/// REPLY, its fixed part, checked as [`decode_frame`] checks it (the payload's length
/// included), and the bytes the head takes; the payload is the rest of the frame. A
/// RESIZE is all head. `None` for a HELLO or WELCOME, which have no payload to place.
pub fn decode_head(buf: &[u8], limits: &Limits) -> Result<Option<(Head, usize)>, DecodeError> {
    let total = frame_len(buf, limits)?;
    if buf.len() < FRAME_HEADER {
        return Err(DecodeError::Incomplete);
    }
    let fixed = match buf[4] {
        KIND_REQUEST => REQUEST_HEADER,
        KIND_REPLY => REPLY_HEADER,
        KIND_RESIZE => RESIZE_BODY,
        KIND_HELLO | KIND_WELCOME => return Ok(None),
        k => return malformed(format!("unknown frame kind {k}")),
    };
    // A frame too short for its fixed part is refused below, not waited on.
    let head = total.min(FRAME_HEADER + fixed);
    if buf.len() < head {
        return Err(DecodeError::Incomplete);
    }
    let (b, payload) = (&buf[FRAME_HEADER..head], total - head);
    Ok(Some(match buf[4] {
        KIND_REQUEST => (Head::Request(request_head(b, payload, limits)?), head),
        KIND_RESIZE if payload == 0 => (Head::Resize(resize_size(b)?), head),
        KIND_RESIZE => return malformed("resize notice longer than its size"),
        _ => (Head::Reply(reply_head(b, payload, limits)?), head),
    }))
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn decode_request<'a>(
    b: &'a [u8],
    limits: &Limits,
) -> Result<(RequestHeader, &'a [u8]), DecodeError> {
    let (head, data) = b.split_at(b.len().min(REQUEST_HEADER));
    Ok((request_head(head, data.len(), limits)?, data))
}

/// Checks the fixed part of a REQUEST body, `payload` bytes following it.
fn request_head(b: &[u8], payload: usize, limits: &Limits) -> Result<RequestHeader, DecodeError> {
    if b.len() < REQUEST_HEADER {
        return malformed("short request");
    }
    let op = match Op::from_u8(b[0]) {
        Some(op) => op,
        None => return malformed(format!("unknown request op {}", b[0])),
    };
    let flags = b[1];
    if flags & !FLAG_FUA != 0 {
        return malformed(format!("unknown request flags {flags:#x}"));
    }
    if be_u16(&b[2..]) != 0 {
        return malformed("reserved request bits set");
    }
    let h = RequestHeader {
        op,
        flags,
        txid: be_u64(&b[4..]),
        floor: be_u64(&b[12..]),
        offset: be_u64(&b[20..]),
        length: be_u32(&b[28..]),
    };
    if h.floor > h.txid {
        return malformed("request floor above its own transaction id");
    }
    if matches!(op, Op::Read | Op::Write) && h.length > limits.max_transfer {
        return malformed(format!(
            "request length {} over the negotiated maximum transfer {}",
            h.length, limits.max_transfer
        ));
    }
    let want = if op == Op::Write {
        h.length as usize
    } else {
        0
    };
    if payload != want {
        return malformed(format!(
            "{op:?} request carries {payload} payload bytes, expected {want}"
        ));
    }
    if !op.has_range() && (h.offset != 0 || h.length != 0) {
        return malformed(format!("{op:?} request with a range"));
    }
    Ok(h)
}

fn decode_reply<'a>(b: &'a [u8], limits: &Limits) -> Result<(ReplyHeader, &'a [u8]), DecodeError> {
    let (head, data) = b.split_at(b.len().min(REPLY_HEADER));
    Ok((reply_head(head, data.len(), limits)?, data))
}

/// Checks the fixed part of a REPLY body, `payload` bytes following it.
fn reply_head(b: &[u8], payload: usize, limits: &Limits) -> Result<ReplyHeader, DecodeError> {
    if b.len() < REPLY_HEADER {
        return malformed("short reply");
    }
    let h = ReplyHeader {
        txid: be_u64(b),
        status: be_u32(&b[8..]),
    };
    if payload > limits.max_transfer as usize {
        return malformed("reply data over the negotiated maximum transfer");
    }
    if h.status != 0 && payload != 0 {
        return malformed("error reply with data");
    }
    Ok(h)
}

/// Checks the body of a RESIZE frame: exactly one size.
fn resize_size(b: &[u8]) -> Result<u64, DecodeError> {
    if b.len() != RESIZE_BODY {
        return malformed(format!(
            "resize notice of {} bytes, expected {RESIZE_BODY}",
            b.len()
        ));
    }
    Ok(be_u64(b))
}

#[cfg(test)]
mod tests;
