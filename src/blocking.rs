//! Socket reads for a dedicated thread: the thread sleeps in the kernel until data comes
//! and goes on from there, instead of an async reactor waking it through an eventfd and
//! re-arming the socket after every read. On the hot path of every reply that saves a
//! thread wakeup and several system calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use smol::io::AsyncRead;

/// Reads a socket, blocking the calling thread; its [`AsyncRead`] is ready at once, so use
/// it only on a thread of its own (`smol::block_on`), never on an executor.
pub struct ThreadReader {
    fd: OwnedFd,
}

impl ThreadReader {
    /// Reads the socket behind `socket` through a descriptor of its own; the socket stays
    /// non-blocking for its other users, and shutting it down ends a blocked read.
    pub fn new(socket: &impl AsRawFd) -> io::Result<ThreadReader> {
        // SAFETY: dup of a descriptor the caller keeps open for the call; the new one is ours.
        let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by fcntl and is owned by nobody else.
        Ok(ThreadReader {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Another descriptor of the socket, to wait on until it has something to read; the
    /// reading stays this reader's.
    pub fn readiness(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                        let err = io::Error::last_os_error();
                        if err.kind() != io::ErrorKind::Interrupted {
                            return Err(err);
                        }
                    }
                }
                _ => return Err(err),
            }
        }
    }
}

impl AsyncRead for ThreadReader {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.read(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::io::AsyncReadExt;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};

    #[test]
    fn reads_what_comes_and_ends_when_the_socket_is_shut() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut reader = ThreadReader::new(&ours).unwrap();
        let thread = std::thread::spawn(move || {
            smol::block_on(async {
                let mut got = [0u8; 5];
                reader.read_exact(&mut got).await.unwrap();
                let mut rest = Vec::new();
                reader.read_to_end(&mut rest).await.unwrap();
                (got, rest)
            })
        });
        // The reader waits on an empty, non-blocking socket rather than failing.
        std::thread::sleep(std::time::Duration::from_millis(50));
        peer.write_all(b"hello").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        ours.shutdown(Shutdown::Both).unwrap();
        let (got, rest) = thread.join().unwrap();
        assert_eq!((&got, rest.len()), (b"hello", 0));
    }
}
