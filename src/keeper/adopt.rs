//! A worker's fuser session on a FUSE connection the kernel initialised long ago.
//!
//! fuser always performs the FUSE_INIT handshake before it serves, and the kernel sends
//! INIT only once per mount. So the session is first made on one end of a socket pair
//! whose other end holds a synthesized INIT with what the kernel offered at mount time
//! ([`super::resume`]): fuser reads it, calls the filesystem's `init` (which makes the same
//! choices as at mount time) and writes its reply into the socket. Then the descriptor
//! number fuser holds is made to refer to the real /dev/fuse connection (dup2), and the
//! kernel is asked to resend what the previous worker had read but not answered.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use fuser::{Config, Filesystem, Session};

use super::resume::{self, KernelInit};
use super::sys;

/// The request id of the synthesized INIT; the kernel's own are never 0.
const INIT_UNIQUE: u64 = 0;

/// A session of `fs` that serves `fuse`, an initialised /dev/fuse connection.
pub fn adopt<FS: Filesystem>(
    fs: FS,
    fuse: OwnedFd,
    kernel: &KernelInit,
    config: Config,
) -> io::Result<Session<FS>> {
    let session = handshake(fs, kernel, config)?;
    sys::replace(session.as_fd(), fuse.as_fd())?;
    Ok(session)
}

/// A session of `fs` made on a socket pair from a synthesized INIT, not yet on /dev/fuse.
fn handshake<FS: Filesystem>(
    fs: FS,
    kernel: &KernelInit,
    config: Config,
) -> io::Result<Session<FS>> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let mut ours = File::from(ours);
    ours.write_all(&resume::init_request(kernel, INIT_UNIQUE))?;
    let session = Session::from_fd(fs, theirs, config.acl, config)?;
    let mut reply = vec![0u8; 4096];
    let n = ours.read(&mut reply)?;
    match resume::reply_header(&reply[..n]) {
        Some((INIT_UNIQUE, 0)) => Ok(session),
        Some((_, error)) => Err(io::Error::other(format!(
            "the filesystem refused the FUSE connection's parameters (error {error})"
        ))),
        None => Err(io::Error::other(
            "fuser answered INIT with a malformed reply",
        )),
    }
}

/// Asks the kernel to queue again every request that was read from the connection and
/// not answered (FUSE_NOTIFY_RESEND): they come back with FUSE_UNIQUE_RESEND in their id.
pub fn request_resend(fuse: BorrowedFd) -> io::Result<()> {
    File::from(fuse.try_clone_to_owned()?).write_all(&resume::resend_notice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::KernelConfig;
    use std::sync::{Arc, Mutex};

    /// Records what its init saw.
    struct Probe(Arc<Mutex<Option<(u32, u32, u64)>>>);

    impl Filesystem for Probe {
        fn init(&mut self, _req: &fuser::Request, c: &mut KernelConfig) -> io::Result<()> {
            let v = c.kernel_abi();
            *self.0.lock().unwrap() = Some((v.0, v.1, c.capabilities().bits()));
            Ok(())
        }
    }

    #[test]
    fn fuser_takes_the_synthesized_init_and_the_descriptor_is_replaced() {
        let kernel = KernelInit {
            major: 7,
            minor: 40,
            max_readahead: 1 << 17,
            flags: resume::FUSE_HAS_RESEND | 1,
        };
        let seen = Arc::new(Mutex::new(None));
        // A socket pair stands in for /dev/fuse: what the session writes arrives at `peer`.
        let (fake_fuse, peer) = sys::seqpacket_pair().unwrap();
        let session = adopt(Probe(seen.clone()), fake_fuse, &kernel, Config::default()).unwrap();
        assert_eq!(*seen.lock().unwrap(), Some((7, 40, kernel.flags)));
        request_resend(session.as_fd()).unwrap();
        let mut got = [0u8; 64];
        let n = File::from(peer).read(&mut got).unwrap();
        assert_eq!(&got[..n], &resume::resend_notice());
    }
}
