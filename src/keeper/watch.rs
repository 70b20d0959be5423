//! The keeper's watch on its FUSE connection, for the end of the mount while no worker
//! serves it (between restarts, or while none can connect). A worker that serves sees the
//! unmount itself, as the end of its FUSE loop, and says so by its exit; so the watch is
//! armed only while none serves. Waiting on /dev/fuse wakes the waiter at every request
//! the kernel queues, which would cost the client two context switches per request.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Condvar, Mutex};

use super::sys;

/// Arms and disarms the watch thread; it ends when the mount does or when this is dropped.
pub struct MountWatch {
    state: Arc<(Mutex<State>, Condvar)>,
    wake: UnixDatagram,
}

#[derive(PartialEq)]
enum State {
    Armed,
    Disarmed,
    Dropped,
}

impl MountWatch {
    /// Watches `fuse`, armed, and calls `gone` once the kernel ends the connection.
    pub fn start(fuse: OwnedFd, gone: impl FnOnce() + Send + 'static) -> io::Result<MountWatch> {
        let (wake, woken) = UnixDatagram::pair()?;
        woken.set_nonblocking(true)?;
        let state = Arc::new((Mutex::new(State::Armed), Condvar::new()));
        let shared = state.clone();
        std::thread::Builder::new()
            .name("mount-watch".into())
            .spawn(move || {
                let (lock, turn) = &*shared;
                loop {
                    {
                        let mut s = lock.lock().unwrap();
                        while *s == State::Disarmed {
                            s = turn.wait(s).unwrap();
                        }
                        if *s == State::Dropped {
                            return;
                        }
                    }
                    match sys::wait_for_error(fuse.as_fd(), woken.as_fd()) {
                        // Reported only if still armed; else once armed again.
                        Ok(true) if *lock.lock().unwrap() == State::Armed => return gone(),
                        Ok(true) => {}
                        // Disarmed (or dropped): what woke it is read, and the state says.
                        Ok(false) => while woken.recv(&mut [0u8; 8]).is_ok() {},
                        Err(e) => {
                            log::error!("cannot watch the FUSE connection: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(MountWatch { state, wake })
    }

    /// No worker serves: the keeper must see the unmount itself.
    pub fn arm(&self) {
        self.set(State::Armed);
    }

    /// A worker serves and will see the unmount.
    pub fn disarm(&self) {
        self.set(State::Disarmed);
    }

    fn set(&self, state: State) {
        let (lock, turn) = &*self.state;
        let mut s = lock.lock().unwrap();
        if *s == state {
            return;
        }
        *s = state;
        turn.notify_one();
        drop(s);
        // A full queue already holds a wake-up.
        let _ = self.wake.send(&[1]);
    }
}

impl Drop for MountWatch {
    fn drop(&mut self) {
        self.set(State::Dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A socket pair stands in for /dev/fuse: closing the far end is the connection's end.
    fn watched() -> (MountWatch, OwnedFd, mpsc::Receiver<()>) {
        let (near, far) = sys::seqpacket_pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let watch = MountWatch::start(near, move || tx.send(()).unwrap()).unwrap();
        (watch, far, rx)
    }

    #[test]
    fn an_armed_watch_sees_the_end() {
        let (watch, far, gone) = watched();
        assert!(gone.recv_timeout(Duration::from_millis(20)).is_err());
        drop(far);
        gone.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(watch);
    }

    #[test]
    fn a_disarmed_watch_sees_the_end_once_armed_again() {
        let (watch, far, gone) = watched();
        watch.disarm();
        // Requests arriving while a worker serves do not concern the watch.
        sys::send(far.as_fd(), b"request", None).unwrap();
        drop(far);
        assert!(
            gone.recv_timeout(Duration::from_millis(100)).is_err(),
            "a disarmed watch reported the end"
        );
        watch.arm();
        gone.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
