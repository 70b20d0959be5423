//! dst: a network block device in userspace.
//!
//! An export node runs `dst-server`; a client mounts an export as one large file. The
//! layers, data flowing down and acks flowing up:
//!
//! ```text
//! fuse  ->  client  ->  channel (Noise, framing)  ->  TCP  ->  channel  ->  server  ->  export I/O
//! ```
//!
//! [`protocol`] holds the frames and their strict decoding, [`channel`] the handshake and
//! encrypted framing ([`cipher`] its ciphers and record keys), [`server`] the export node, [`client`] the client side, and
//! [`keys`] the key files both sides use. On the client, [`fuse`] shows an export as one
//! file, [`keeper`] owns a mount and restarts or upgrades the [`worker`] that serves it,
//! [`mount`] holds what both share, and [`mount_options`] parses what
//! mount(8), fstab and `dst-mount` are given. [`process`] keeps key material out of core
//! dumps in every binary; [`logging`] and [`service`] are how they talk to an operator's
//! tools (log lines, with journald priorities under systemd; sd_notify).

pub mod blocking;
pub mod channel;
pub mod cipher;
pub mod client;
pub mod fuse;
pub mod keeper;
pub mod keys;
pub mod logging;
pub mod mount;
pub mod mount_options;
pub mod pool;
pub mod process;
pub mod prometheus;
pub mod protocol;
pub mod server;
pub mod service;
pub mod socket;
pub mod status;
pub mod units;
pub mod worker;
