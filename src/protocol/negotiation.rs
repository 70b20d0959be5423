//! The negotiation that opens a session: the client's HELLO (which export, which access,
//! which session to resume, what it can do) and the server's WELCOME (the export's
//! parameters, or a refusal and why). Both are lists of tagged fields; unknown tags are
//! skipped, so that either side can add fields without breaking the other.

use super::{
    be_u16, begin_frame, end_frame, malformed, DecodeError, KIND_HELLO, KIND_WELCOME,
    MAX_EXPORT_NAME, MAX_NEGOTIATION, MAX_TRANSFER_LIMIT,
};

/// Longest refusal message.
const MAX_MESSAGE: usize = 4000;

/// Access mode of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly = 0,
    ReadWrite = 1,
}

/// Identity of a session, chosen by the server; it survives reconnects.
pub type SessionId = [u8; 16];

/// First frame of a client: what it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub export: String,
    pub access: Access,
    /// Session to resume after a reconnect; `None` starts a new one.
    pub session: Option<SessionId>,
    /// Largest transfer the client wants to use.
    pub max_transfer: u32,
    pub features: u64,
}

/// The server's answer to HELLO: either the export's parameters or a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    Accepted(ExportInfo),
    Refused { status: u32, message: String },
}

/// What a client learns about its export and session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub version: u16,
    pub export: String,
    pub access: Access,
    pub session: SessionId,
    /// True when `session` is the one the client asked to resume.
    pub resumed: bool,
    /// Identity of the export node's current boot (empty if unknown). Acked writes
    /// survive a restart of the server process in the page cache, but not a reboot.
    pub boot_id: String,
    pub size: u64,
    pub block_size: u32,
    pub max_transfer: u32,
    pub features: u64,
}

pub(super) mod tag {
    pub const VERSION: u16 = 1;
    pub const EXPORT: u16 = 2;
    pub const ACCESS: u16 = 3;
    pub const SESSION: u16 = 4;
    pub const FEATURES: u16 = 5;
    pub const MAX_TRANSFER: u16 = 6;
    pub const SIZE: u16 = 7;
    pub const BLOCK_SIZE: u16 = 8;
    pub const RESUMED: u16 = 9;
    pub const BOOT_ID: u16 = 10;
    pub const STATUS: u16 = 16;
    pub const MESSAGE: u16 = 17;
}

pub(super) fn put_field(out: &mut Vec<u8>, tag: u16, value: &[u8]) {
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// Appends a HELLO frame to `out`.
pub fn encode_hello(out: &mut Vec<u8>, h: &Hello) {
    let start = begin_frame(out, KIND_HELLO);
    put_field(out, tag::VERSION, &h.version.to_be_bytes());
    put_field(out, tag::EXPORT, h.export.as_bytes());
    put_field(out, tag::ACCESS, &[h.access as u8]);
    if let Some(s) = &h.session {
        put_field(out, tag::SESSION, s);
    }
    put_field(out, tag::MAX_TRANSFER, &h.max_transfer.to_be_bytes());
    put_field(out, tag::FEATURES, &h.features.to_be_bytes());
    end_frame(out, start);
}

/// Appends a WELCOME frame to `out`.
pub fn encode_welcome(out: &mut Vec<u8>, w: &Welcome) {
    let start = begin_frame(out, KIND_WELCOME);
    match w {
        Welcome::Accepted(i) => {
            put_field(out, tag::STATUS, &0u32.to_be_bytes());
            put_field(out, tag::VERSION, &i.version.to_be_bytes());
            put_field(out, tag::EXPORT, i.export.as_bytes());
            put_field(out, tag::ACCESS, &[i.access as u8]);
            put_field(out, tag::SESSION, &i.session);
            put_field(out, tag::RESUMED, &[i.resumed as u8]);
            put_field(out, tag::BOOT_ID, i.boot_id.as_bytes());
            put_field(out, tag::SIZE, &i.size.to_be_bytes());
            put_field(out, tag::BLOCK_SIZE, &i.block_size.to_be_bytes());
            put_field(out, tag::MAX_TRANSFER, &i.max_transfer.to_be_bytes());
            put_field(out, tag::FEATURES, &i.features.to_be_bytes());
        }
        Welcome::Refused { status, message } => {
            put_field(out, tag::STATUS, &status.to_be_bytes());
            // Messages are ours and short; cut rather than fail if one is not.
            let mut end = message.len().min(MAX_MESSAGE);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            put_field(out, tag::MESSAGE, &message.as_bytes()[..end]);
        }
    }
    end_frame(out, start);
}

/// Iterates over the (tag, value) fields of a HELLO or WELCOME, rejecting duplicates.
fn fields(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    if b.len() > MAX_NEGOTIATION {
        return malformed("negotiation frame too long");
    }
    let mut out: Vec<(u16, &[u8])> = Vec::new();
    while !b.is_empty() {
        if b.len() < 4 {
            return malformed("truncated field header");
        }
        let (tag, len) = (be_u16(b), be_u16(&b[2..]) as usize);
        if b.len() < 4 + len {
            return malformed(format!("field {tag} truncated"));
        }
        if out.iter().any(|(t, _)| *t == tag) {
            return malformed(format!("field {tag} repeated"));
        }
        out.push((tag, &b[4..4 + len]));
        b = &b[4 + len..];
    }
    Ok(out)
}

/// Typed access to negotiation fields.
struct Fields<'a>(Vec<(u16, &'a [u8])>);

impl<'a> Fields<'a> {
    fn raw(&self, tag: u16) -> Option<&'a [u8]> {
        self.0.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }
    fn fixed<const N: usize>(&self, tag: u16, name: &str) -> Result<Option<[u8; N]>, DecodeError> {
        match self.raw(tag) {
            None => Ok(None),
            Some(v) => match v.try_into() {
                Ok(a) => Ok(Some(a)),
                Err(_) => malformed(format!("field {name} has {} bytes, expected {N}", v.len())),
            },
        }
    }
    fn required<const N: usize>(&self, tag: u16, name: &str) -> Result<[u8; N], DecodeError> {
        match self.fixed(tag, name)? {
            Some(a) => Ok(a),
            None => malformed(format!("field {name} missing")),
        }
    }
    fn string(&self, tag: u16, name: &str, max: usize) -> Result<String, DecodeError> {
        let v = self.raw(tag).unwrap_or_default();
        if v.len() > max {
            return malformed(format!("field {name} longer than {max} bytes"));
        }
        match std::str::from_utf8(v) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => malformed(format!("field {name} is not UTF-8")),
        }
    }
    fn access(&self) -> Result<Access, DecodeError> {
        match self.required::<1>(tag::ACCESS, "access")?[0] {
            0 => Ok(Access::ReadOnly),
            1 => Ok(Access::ReadWrite),
            v => malformed(format!("unknown access mode {v}")),
        }
    }
}

pub(super) fn decode_hello(b: &[u8]) -> Result<Hello, DecodeError> {
    let f = Fields(fields(b)?);
    let export = f.string(tag::EXPORT, "export", MAX_EXPORT_NAME)?;
    if f.raw(tag::EXPORT).is_none() {
        return malformed("field export missing");
    }
    Ok(Hello {
        version: u16::from_be_bytes(f.required(tag::VERSION, "version")?),
        export,
        access: f.access()?,
        session: f.fixed(tag::SESSION, "session")?,
        max_transfer: u32::from_be_bytes(f.required(tag::MAX_TRANSFER, "max_transfer")?),
        features: u64::from_be_bytes(f.fixed(tag::FEATURES, "features")?.unwrap_or_default()),
    })
}

pub(super) fn decode_welcome(b: &[u8]) -> Result<Welcome, DecodeError> {
    let f = Fields(fields(b)?);
    let status = u32::from_be_bytes(f.required(tag::STATUS, "status")?);
    if status != 0 {
        return Ok(Welcome::Refused {
            status,
            message: f.string(tag::MESSAGE, "message", MAX_MESSAGE)?,
        });
    }
    let info = ExportInfo {
        version: u16::from_be_bytes(f.required(tag::VERSION, "version")?),
        export: f.string(tag::EXPORT, "export", MAX_EXPORT_NAME)?,
        access: f.access()?,
        session: f.required(tag::SESSION, "session")?,
        resumed: f
            .fixed::<1>(tag::RESUMED, "resumed")?
            .is_some_and(|v| v[0] != 0),
        boot_id: f.string(tag::BOOT_ID, "boot_id", 64)?,
        size: u64::from_be_bytes(f.required(tag::SIZE, "size")?),
        block_size: u32::from_be_bytes(f.required(tag::BLOCK_SIZE, "block_size")?),
        max_transfer: u32::from_be_bytes(f.required(tag::MAX_TRANSFER, "max_transfer")?),
        features: u64::from_be_bytes(f.fixed(tag::FEATURES, "features")?.unwrap_or_default()),
    };
    if !info.block_size.is_power_of_two() || !(512..=65536).contains(&info.block_size) {
        return malformed(format!(
            "block size {} is not a power of two in 512..=65536",
            info.block_size
        ));
    }
    if info.max_transfer < info.block_size || info.max_transfer > MAX_TRANSFER_LIMIT {
        return malformed(format!(
            "maximum transfer {} out of range",
            info.max_transfer
        ));
    }
    Ok(Welcome::Accepted(info))
}
