//! The control socket between the keeper and a worker: the messages each sends and their
//! encoding (a tag byte, then fixed fields little-endian, then text), and sending and
//! receiving them, the /dev/fuse descriptor riding along with [`ToWorker::Adopt`]; and
//! how a worker finds its end ([`worker_control`]).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::resume::KernelInit;
use super::sys;

/// Set in a worker's environment: the number of its control socket's descriptor.
pub const WORKER_ENV: &str = "DST_WORKER_CONTROL";

/// The control socket, if this process is a worker. Call once, before any thread starts
/// (it removes the variable).
pub fn worker_control() -> Result<Option<Control>, String> {
    let Some(value) = std::env::var_os(WORKER_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(WORKER_ENV);
    let fd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{WORKER_ENV} must be a descriptor number; unset it"))?;
    let socket = sys::inherited_socket(fd)
        .map_err(|e| format!("{WORKER_ENV}={fd}: {e}; unset {WORKER_ENV}"))?;
    // A worker never outlives its keeper: without the keeper the connection is gone.
    sys::die_with_parent(libc::SIGKILL, std::os::unix::process::parent_id())
        .map_err(|e| format!("cannot tie the worker to its keeper: {e}"))?;
    // The keeper decides when the worker ends: Ctrl-C, a hangup or `systemctl stop`
    // reach it, and it stops the worker after unmounting, once writes are acked.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        sys::ignore_signal(signal);
    }
    Ok(Some(Control::from_fd(socket)))
}

/// What a worker tells the keeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToKeeper {
    /// The engine is connected: what the mount needs to know of the export.
    Connected {
        read_only: bool,
        size: u64,
        export: String,
    },
    /// The worker serves the FUSE connection it was handed.
    Serving,
    /// It could not start; the message is for the user.
    Failed(String),
}

/// What the keeper tells a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Serve the FUSE connection sent with this message.
    Adopt(Adopt),
    /// Finish what is in progress, take nothing new, and exit (an upgrade).
    Drain,
    /// The mount was unmounted: finish and exit.
    Stop,
}

/// The FUSE connection's parameters and the history shown in `.stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopt {
    pub kernel: KernelInit,
    pub keeper_pid: u32,
    pub restarts: u32,
    pub last_exit: String,
    /// The mount point, canonical: a worker must not look it up itself, since that could
    /// wait on the very mount it is about to serve.
    pub mountpoint: PathBuf,
}

/// Largest message: text is cut to fit.
pub const MAX_MESSAGE: usize = 4096;
const MAX_TEXT: usize = 1024;

fn text(s: &str) -> &[u8] {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

impl ToKeeper {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ToKeeper::Connected {
                read_only,
                size,
                export,
            } => {
                let mut b = vec![b'C', u8::from(*read_only)];
                b.extend_from_slice(&size.to_le_bytes());
                b.extend_from_slice(text(export));
                b
            }
            ToKeeper::Serving => vec![b'S'],
            ToKeeper::Failed(why) => [&[b'F'][..], text(why)].concat(),
        }
    }

    pub fn decode(b: &[u8]) -> Option<ToKeeper> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match b.split_first()? {
            (b'C', rest) if rest.len() >= 9 => Some(ToKeeper::Connected {
                read_only: rest[0] != 0,
                size: u64::from_le_bytes(rest[1..9].try_into().ok()?),
                export: text(&rest[9..]),
            }),
            (b'S', []) => Some(ToKeeper::Serving),
            (b'F', rest) => Some(ToKeeper::Failed(text(rest))),
            _ => None,
        }
    }
}

impl ToWorker {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ToWorker::Adopt(a) => {
                let mut b = vec![b'A'];
                for v in [a.kernel.major, a.kernel.minor, a.kernel.max_readahead] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&a.kernel.flags.to_le_bytes());
                b.extend_from_slice(&a.keeper_pid.to_le_bytes());
                b.extend_from_slice(&a.restarts.to_le_bytes());
                let last_exit = text(&a.last_exit);
                b.extend_from_slice(&(last_exit.len() as u16).to_le_bytes());
                b.extend_from_slice(last_exit);
                b.extend_from_slice(a.mountpoint.as_os_str().as_bytes());
                b
            }
            ToWorker::Drain => vec![b'D'],
            ToWorker::Stop => vec![b'X'],
        }
    }

    pub fn decode(b: &[u8]) -> Option<ToWorker> {
        let u32_at = |at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
        match b.first()? {
            b'A' if b.len() >= 31 => {
                let len = usize::from(u16::from_le_bytes(b[29..31].try_into().ok()?));
                let last_exit = b.get(31..31 + len)?;
                Some(ToWorker::Adopt(Adopt {
                    kernel: KernelInit {
                        major: u32_at(1)?,
                        minor: u32_at(5)?,
                        max_readahead: u32_at(9)?,
                        flags: u64::from_le_bytes(b[13..21].try_into().ok()?),
                    },
                    keeper_pid: u32_at(21)?,
                    restarts: u32_at(25)?,
                    last_exit: String::from_utf8_lossy(last_exit).into_owned(),
                    mountpoint: OsStr::from_bytes(&b[31 + len..]).into(),
                }))
            }
            b'D' if b.len() == 1 => Some(ToWorker::Drain),
            b'X' if b.len() == 1 => Some(ToWorker::Stop),
            _ => None,
        }
    }
}

/// One end of a control socket.
pub struct Control(OwnedFd);

impl Control {
    /// A connected pair: the keeper's end and the worker's.
    pub fn pair() -> io::Result<(Control, OwnedFd)> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        Ok((Control(ours), theirs))
    }

    pub fn from_fd(fd: OwnedFd) -> Control {
        Control(fd)
    }

    pub fn try_clone(&self) -> io::Result<Control> {
        Ok(Control(self.0.try_clone()?))
    }

    pub fn tell_keeper(&self, msg: &ToKeeper) -> io::Result<()> {
        sys::send(self.0.as_fd(), &msg.encode(), None)
    }

    pub fn tell_worker(&self, msg: &ToWorker, fuse: Option<BorrowedFd>) -> io::Result<()> {
        sys::send(self.0.as_fd(), &msg.encode(), fuse)
    }

    /// The next message from the worker; None once it closed its end.
    pub fn from_worker(&self) -> io::Result<Option<ToKeeper>> {
        let (bytes, _) = self.receive()?;
        bytes
            .map(|b| ToKeeper::decode(&b).ok_or_else(|| bad(&b)))
            .transpose()
    }

    /// The next message from the keeper and the descriptor it carried; None once the
    /// keeper closed its end.
    pub fn from_keeper(&self) -> io::Result<Option<(ToWorker, Option<OwnedFd>)>> {
        let (bytes, fd) = self.receive()?;
        match bytes {
            None => Ok(None),
            Some(b) => Ok(Some((ToWorker::decode(&b).ok_or_else(|| bad(&b))?, fd))),
        }
    }

    fn receive(&self) -> io::Result<(Option<Vec<u8>>, Option<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fd) = sys::recv(self.0.as_fd(), &mut buf)?;
        if n == 0 {
            return Ok((None, fd));
        }
        buf.truncate(n);
        Ok((Some(buf), fd))
    }
}

fn bad(b: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unknown control message ({} bytes)", b.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            ToKeeper::Connected {
                read_only: true,
                size: 1 << 40,
                export: "disk".into(),
            },
            ToKeeper::Serving,
            ToKeeper::Failed("cannot mount: refused".into()),
        ] {
            assert_eq!(ToKeeper::decode(&m.encode()), Some(m));
        }
        for m in [
            ToWorker::Adopt(Adopt {
                kernel: KernelInit {
                    major: 7,
                    minor: 45,
                    max_readahead: 1 << 17,
                    flags: u64::MAX - 5,
                },
                keeper_pid: 42,
                restarts: 3,
                last_exit: "killed by signal 9 (SIGKILL)".into(),
                mountpoint: "/mnt/r".into(),
            }),
            ToWorker::Drain,
            ToWorker::Stop,
        ] {
            assert_eq!(ToWorker::decode(&m.encode()), Some(m));
        }
    }

    #[test]
    fn garbage_and_long_text_are_handled() {
        assert_eq!(ToKeeper::decode(b""), None);
        assert_eq!(ToKeeper::decode(b"C\x01"), None);
        assert_eq!(ToWorker::decode(b"A\x07"), None);
        assert_eq!(ToWorker::decode(b"Dx"), None);
        let long = "é".repeat(MAX_MESSAGE);
        let b = ToKeeper::Failed(long).encode();
        assert!(b.len() <= MAX_MESSAGE);
        assert!(
            matches!(ToKeeper::decode(&b), Some(ToKeeper::Failed(t)) if t.chars().all(|c| c == 'é'))
        );
    }

    #[test]
    fn a_descriptor_rides_with_adopt() {
        let (keeper, worker) = Control::pair().unwrap();
        let worker = Control::from_fd(worker);
        let (x, _y) = sys::seqpacket_pair().unwrap();
        keeper
            .tell_worker(&ToWorker::Drain, Some(x.as_fd()))
            .unwrap();
        let (m, fd) = worker.from_keeper().unwrap().unwrap();
        assert_eq!((m, fd.is_some()), (ToWorker::Drain, true));
        worker.tell_keeper(&ToKeeper::Serving).unwrap();
        assert_eq!(keeper.from_worker().unwrap(), Some(ToKeeper::Serving));
        drop(worker);
        assert_eq!(keeper.from_worker().unwrap(), None);
    }
}
