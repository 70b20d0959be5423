//! The client side: connecting to an export node, negotiating an export, and exchanging
//! requests and replies on one connection. The [`engine`] builds the transaction model on
//! top: many requests in flight, resends, reconnects and pings.

pub mod core;
mod durability;
pub mod engine;
mod link;
pub mod stats;
pub mod table;

use std::fmt;
use std::io;

use smol::net::TcpStream;

use crate::channel::{self, ChannelError, Hangup, Receiver, Sender};
use crate::cipher::Cipher;
use crate::keys::{PrivateKey, PublicKey};
use crate::protocol::{
    self, features, Access, ExportInfo, Frame, Hello, Limits, Op, ReplyHeader, RequestHeader,
    SessionId, Welcome, FLAG_FUA, MAX_NEGOTIATION, PROTOCOL_VERSION,
};
use crate::socket::Congestion;

/// Where to connect and what to open.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the export node.
    pub server: String,
    pub export: String,
    pub key: PrivateKey,
    /// The pinned key of the export node.
    pub server_key: PublicKey,
    pub cipher: Cipher,
    pub access: Access,
    /// Largest transfer to ask for; the server may agree to less.
    pub max_transfer: u32,
    /// TCP congestion control of the connection.
    pub congestion: Congestion,
}

/// Failures of a client connection.
#[derive(Debug)]
pub enum ClientError {
    /// Could not reach the server, or the channel failed.
    Channel(ChannelError),
    /// The server refused to open the export, and said why.
    Refused { status: u32, message: String },
    /// The server answered a request with an error status (an errno value).
    Status(u32),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Channel(e) => write!(f, "{e}"),
            // The server's words: escaped before they reach a log or a terminal.
            ClientError::Refused { message, .. } => {
                write!(
                    f,
                    "server refused the export: {}",
                    protocol::printable(message)
                )
            }
            ClientError::Status(errno) => write!(
                f,
                "server error: {}",
                io::Error::from_raw_os_error(*errno as i32)
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<ChannelError> for ClientError {
    fn from(e: ChannelError) -> Self {
        ClientError::Channel(e)
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Channel(ChannelError::Io(e))
    }
}

impl ClientError {
    /// The errno this failure maps to for a local caller.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Status(e) | ClientError::Refused { status: e, .. } => *e as i32,
            ClientError::Channel(_) => libc::EIO,
        }
    }
}

/// A [`Connection`] taken apart, for a caller that sends and receives from different tasks.
pub struct Parts {
    pub sender: Sender<TcpStream>,
    pub receiver: Receiver<TcpStream>,
    /// Shuts the connection down from outside a blocked send or receive.
    pub hangup: Hangup,
    pub info: ExportInfo,
    pub limits: Limits,
}

/// One negotiated connection to an export.
pub struct Connection {
    tx: Sender<TcpStream>,
    rx: Receiver<TcpStream>,
    info: ExportInfo,
    limits: Limits,
    next_txid: u64,
    buf: Vec<u8>,
}

impl Connection {
    /// Connects, authenticates both ends and opens the export; `session` resumes one.
    pub async fn connect(
        cfg: &ClientConfig,
        session: Option<SessionId>,
    ) -> Result<Connection, ClientError> {
        Self::connect_with(cfg, session, features::ALL).await
    }

    /// As [`connect`](Self::connect), announcing only `features`: how an older client
    /// connects.
    pub async fn connect_with(
        cfg: &ClientConfig,
        session: Option<SessionId>,
        features: u64,
    ) -> Result<Connection, ClientError> {
        let stream = crate::socket::dial(&cfg.server).await?;
        stream.set_nodelay(true)?;
        cfg.congestion.apply(&stream)?;
        let (mut tx, mut rx) = channel::connect(
            stream.clone(),
            stream,
            &cfg.key,
            &cfg.server_key,
            cfg.cipher,
        )
        .await?;
        let mut buf = Vec::new();
        protocol::encode_hello(
            &mut buf,
            &Hello {
                version: PROTOCOL_VERSION,
                export: cfg.export.clone(),
                access: cfg.access,
                session,
                max_transfer: cfg.max_transfer,
                features,
            },
        );
        tx.send(&buf).await?;
        let negotiation = Limits {
            max_transfer: MAX_NEGOTIATION as u32,
        };
        let info = match rx.recv(&negotiation).await? {
            Some(Frame::Welcome(Welcome::Accepted(info))) => info,
            Some(Frame::Welcome(Welcome::Refused { status, message })) => {
                return Err(ClientError::Refused { status, message })
            }
            Some(_) => {
                return Err(ChannelError::Protocol(
                    "server sent something other than WELCOME".into(),
                )
                .into())
            }
            None => {
                return Err(ChannelError::Protocol(
                    "server closed the connection during negotiation".into(),
                )
                .into())
            }
        };
        let limits = Limits {
            max_transfer: info.max_transfer,
        };
        Ok(Connection {
            tx,
            rx,
            info,
            limits,
            next_txid: 1,
            buf,
        })
    }

    /// The halves of the channel, a hangup for its connection, what was negotiated, and
    /// the limits to decode with.
    pub fn into_parts(self) -> Parts {
        Parts {
            hangup: self.tx.hangup(),
            sender: self.tx,
            receiver: self.rx,
            info: self.info,
            limits: self.limits,
        }
    }

    /// What was negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// A fresh transaction id.
    pub fn next_txid(&mut self) -> u64 {
        let id = self.next_txid;
        self.next_txid += 1;
        id
    }

    /// Sends one request as is.
    pub async fn send(&mut self, h: &RequestHeader, data: &[u8]) -> Result<(), ClientError> {
        self.buf.clear();
        protocol::encode_request(&mut self.buf, h, data);
        self.tx.send(&self.buf).await?;
        Ok(())
    }

    /// Receives the next reply, whichever transaction it answers. A RESIZE on the way
    /// updates [`info`](Self::info)'s size.
    pub async fn recv(&mut self) -> Result<(ReplyHeader, Vec<u8>), ClientError> {
        loop {
            match self.rx.recv(&self.limits).await? {
                Some(Frame::Reply(h, data)) => return Ok((h, data.to_vec())),
                Some(Frame::Resize(size)) => self.info.size = size,
                Some(_) => {
                    let why = "server sent a frame other than REPLY or RESIZE";
                    return Err(ChannelError::Protocol(why.into()).into());
                }
                None => return Err(ChannelError::Io(io::ErrorKind::UnexpectedEof.into()).into()),
            }
        }
    }

    /// Runs one transaction to its reply; the data of a read is returned.
    pub async fn call(
        &mut self,
        op: Op,
        fua: bool,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let txid = self.next_txid();
        let h = RequestHeader {
            op,
            flags: if fua { FLAG_FUA } else { 0 },
            txid,
            floor: txid,
            offset,
            length,
        };
        self.send(&h, data).await?;
        let (reply, data) = self.recv().await?;
        if reply.txid != txid {
            return Err(ChannelError::Protocol(format!(
                "reply to {} while waiting for {txid}",
                reply.txid
            ))
            .into());
        }
        match reply.status {
            0 => Ok(data),
            e => Err(ClientError::Status(e)),
        }
    }

    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, ClientError> {
        self.call(Op::Read, false, offset, length, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.call(Op::Write, fua, offset, data.len() as u32, data)
            .await
            .map(drop)
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.call(Op::Flush, false, 0, 0, &[]).await.map(drop)
    }

    pub async fn trim(&mut self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.call(Op::Trim, false, offset, length, &[])
            .await
            .map(drop)
    }

    pub async fn write_zeroes(&mut self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.call(Op::WriteZeroes, false, offset, length, &[])
            .await
            .map(drop)
    }

    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.call(Op::Ping, false, 0, 0, &[]).await.map(drop)
    }
}
