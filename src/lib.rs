//! dst: a network block device in userspace.
//!
//! An export node runs `dst-server`; a client mounts an export as one large file. The
//! layers, data flowing down and acks flowing up:
//!
//! ```text
//! client  ->  channel (Noise, framing)  ->  TCP  ->  channel  ->  server  ->  export I/O
//! ```
//!
//! [`protocol`] holds the frames and their strict decoding, [`channel`] the handshake and
//! encrypted framing, [`server`] the export node, [`client`] the client side, and
//! [`keys`] the key files both sides use.

pub mod channel;
pub mod client;
pub mod keys;
pub mod protocol;
pub mod server;
pub mod units;
