//! A connection's request reader, passed between its two reader threads. The one holding
//! it reads; to run a request itself, it lends the reader out first, so requests that
//! arrive meanwhile, and the client's leaving, are still read however long the disk takes.
//! The other thread takes a lent reader only once the socket has something to read: it
//! waits on an epoll set where the socket is armed (one-shot) while the reader is lent. A
//! lone request, such as the write and then the flush of an fsync, thus wakes no second
//! thread; lending and taking back cost an `epoll_ctl` each.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

enum Hand<T> {
    /// Nobody holds it; `lent` while the socket is armed for the other thread.
    Free {
        value: T,
        lent: bool,
    },
    Held,
    Ended,
}

pub struct Baton<T> {
    hand: Mutex<Hand<T>>,
    /// Waited on by a thread without the reader: the socket (while lent) and `ended`.
    epoll: OwnedFd,
    /// The socket, for readiness only: reading it is the reader's.
    socket: OwnedFd,
    /// Readable once the turns are over.
    ended: OwnedFd,
}

const SOCKET: u64 = 0;
const ENDED: u64 = 1;
/// The socket's registration while lent. Disarmed it stays one-shot, so that a hung-up
/// socket (reported whatever is asked) wakes a waiter once, not in a loop.
const ARMED: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
const DISARMED: u32 = libc::EPOLLONESHOT as u32;

impl<T> Baton<T> {
    /// A baton over `value`, free, which reads from `socket` (a descriptor of its own for
    /// watching readiness).
    pub fn new(value: T, socket: OwnedFd) -> io::Result<Baton<T>> {
        // SAFETY: plain system calls; each returned descriptor is owned at once.
        let epoll = unsafe { owned(libc::epoll_create1(libc::EPOLL_CLOEXEC))? };
        let ended = unsafe { owned(libc::eventfd(0, libc::EFD_CLOEXEC))? };
        let baton = Baton {
            hand: Mutex::new(Hand::Free { value, lent: false }),
            epoll,
            socket,
            ended,
        };
        baton.control(
            libc::EPOLL_CTL_ADD,
            baton.ended.as_raw_fd(),
            libc::EPOLLIN as u32,
            ENDED,
        )?;
        baton.control(
            libc::EPOLL_CTL_ADD,
            baton.socket.as_raw_fd(),
            DISARMED,
            SOCKET,
        )?;
        Ok(baton)
    }

    /// Takes the value: at once if it is free, else once it is lent and the socket has
    /// something to read. `None` once [`end`](Self::end) was called, or if waiting fails.
    pub fn take(&self) -> Option<T> {
        loop {
            {
                let mut hand = self.hand.lock().unwrap();
                match std::mem::replace(&mut *hand, Hand::Held) {
                    Hand::Free { value, lent } => {
                        if lent {
                            self.arm(DISARMED);
                        }
                        return Some(value);
                    }
                    Hand::Held => {}
                    Hand::Ended => {
                        *hand = Hand::Ended;
                        return None;
                    }
                }
            }
            if let Err(e) = self.wait() {
                log::error!("a connection's reader cannot wait for its turn: {e}");
                return None;
            }
        }
    }

    /// Puts the value down while this thread runs a request: the other thread takes it if
    /// the socket has something to read meanwhile; else [`take`](Self::take) gets it back.
    /// Dropped if ended meanwhile.
    pub fn lend(&self, value: T) {
        let mut hand = self.hand.lock().unwrap();
        if !matches!(*hand, Hand::Ended) {
            *hand = Hand::Free { value, lent: true };
            self.arm(ARMED);
        }
    }

    /// Ends the turns: every [`take`](Self::take), waiting or to come, returns `None`.
    pub fn end(&self) {
        *self.hand.lock().unwrap() = Hand::Ended;
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a live buffer to our eventfd.
        unsafe { libc::write(self.ended.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Arms or disarms the socket; under the hand's lock, so it matches the hand.
    fn arm(&self, events: u32) {
        if let Err(e) = self.control(libc::EPOLL_CTL_MOD, self.socket.as_raw_fd(), events, SOCKET) {
            // Not armed: a lent reader is taken back when its request is done.
            log::warn!("cannot watch a connection's socket while its request runs: {e}");
        }
    }

    fn control(&self, op: libc::c_int, fd: i32, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are open for the call; the event is a valid local.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sleeps until the socket is armed and readable, or the turns end.
    fn wait(&self) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        loop {
            // SAFETY: the buffer holds as many events as the call is told.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 2, -1) };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Owns the descriptor a system call returned, or its error.
///
/// # Safety
/// `fd`, if not negative, must be a new descriptor that nothing else owns.
unsafe fn owned(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from_raw_fd(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    /// A baton watching one end of a socket pair; the other end makes it readable.
    fn baton(value: u32) -> (Arc<Baton<u32>>, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        (Arc::new(Baton::new(value, ours.into()).unwrap()), peer)
    }

    fn spare(baton: &Arc<Baton<u32>>) -> std::thread::JoinHandle<Option<u32>> {
        let b = baton.clone();
        let waiter = std::thread::spawn(move || b.take());
        std::thread::sleep(Duration::from_millis(50));
        waiter
    }

    #[test]
    fn a_lent_value_goes_to_the_waiting_thread_when_the_socket_has_data() {
        let (baton, mut peer) = baton(1);
        let first = baton.take().unwrap();
        let waiter = spare(&baton);
        baton.lend(first + 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "taken with nothing to read");
        peer.write_all(b"x").unwrap();
        assert_eq!(waiter.join().unwrap(), Some(2));
    }

    #[test]
    fn a_lent_value_comes_back_to_its_lender_when_nothing_arrived() {
        let (baton, mut peer) = baton(1);
        let first = baton.take().unwrap();
        let waiter = spare(&baton);
        baton.lend(first + 1);
        assert_eq!(baton.take(), Some(2));
        // Taken back, it is disarmed: data for the holder leaves the other asleep.
        peer.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "woken while the value was held");
        baton.end();
        assert_eq!(waiter.join().unwrap(), None);
    }

    #[test]
    fn a_value_lent_onto_waiting_data_is_taken_at_once() {
        let (baton, mut peer) = baton(1);
        let first = baton.take().unwrap();
        peer.write_all(b"x").unwrap();
        let waiter = spare(&baton);
        baton.lend(first + 1);
        assert_eq!(waiter.join().unwrap(), Some(2));
    }

    #[test]
    fn an_end_wakes_every_waiter_and_refuses_later_takes() {
        let (baton, _peer) = baton(7);
        let held = baton.take().unwrap();
        let waiters: Vec<_> = (0..2).map(|_| spare(&baton)).collect();
        baton.end();
        for w in waiters {
            assert_eq!(w.join().unwrap(), None);
        }
        baton.lend(held);
        assert_eq!(baton.take(), None);
    }
}
