//! The system calls the keeper and its workers need that std has no safe form of: a
//! SOCK_SEQPACKET socket pair, messages that carry a descriptor (SCM_RIGHTS), replacing a
//! descriptor in place (dup2), keeping one across exec, waiting for a descriptor's error
//! (the end of a FUSE connection), and the parent-death signal.
//! Every unsafe block of the keeper is here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A connected pair of SOCK_SEQPACKET sockets (message boundaries kept, ordered, reliable),
/// both close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the array with two new descriptors, owned from here on.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above; each descriptor is owned once.
    unsafe { Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Sends one message, with `fd` attached if given.
pub fn send(socket: BorrowedFd, data: &[u8], fd: Option<BorrowedFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let raw: RawFd = fd.as_raw_fd();
        // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the buffer (32 bytes) holds one
        // cmsghdr with one descriptor (CMSG_SPACE(4) is 24 on 64-bit Linux), and
        // CMSG_FIRSTHDR points into it once msg_control and msg_controllen are set.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            assert!(space <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, raw);
        }
    }
    loop {
        // SAFETY: msg points at the live iovec and control buffer above.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == data.len() {
                Ok(())
            } else {
                Err(io::Error::other("short send on a SOCK_SEQPACKET socket"))
            };
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message into `buf`: its length (0 when the peer closed) and the
/// descriptor it carried, if any. Messages longer than `buf` are an error.
pub fn recv(socket: BorrowedFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: msg points at the live iovec and control buffer above; MSG_CMSG_CLOEXEC
        // makes a received descriptor close-on-exec.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fd = None;
    // SAFETY: the kernel filled msg_control and msg_controllen; CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk only within them, and an SCM_RIGHTS message's data is descriptors
    // now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    // One is expected; any further ones are closed here.
                    fd.get_or_insert(owned);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("control message too long"));
    }
    Ok((n, fd))
}

/// Makes descriptor number `target` refer to what `source` refers to (dup2): whoever
/// holds `target` now uses `source`'s open file.
pub fn replace(target: BorrowedFd, source: BorrowedFd) -> io::Result<()> {
    // SAFETY: both are open descriptors; dup2 closes target's old file atomically and
    // leaves the number owned by target's owner, so no descriptor is owned twice.
    if unsafe { libc::dup2(source.as_raw_fd(), target.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Has `cmd`'s child keep descriptor `fd` (close-on-exec here) across its exec.
pub fn pass_across_exec(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; fcntl is one, and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes ownership of descriptor `fd`, which the parent left open for this process,
/// after checking that it is open and a socket. Call once per descriptor.
pub fn inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: stat is plain data; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes the stat buffer; an invalid descriptor is an error.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other(format!("descriptor {fd} is not a socket")));
    }
    // SAFETY: the descriptor is open (fstat above) and nothing else in this process owns
    // it: it was inherited for this use and the caller takes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Close-on-exec again, so that nothing this process starts inherits it.
    // SAFETY: fcntl on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Has the kernel send `signal` to this process when its parent dies; then checks that
/// the parent is still `parent` (it may have died before the call).
pub fn die_with_parent(signal: i32, parent: u32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if std::os::unix::process::parent_id() != parent {
        return Err(io::Error::other("the keeper is gone"));
    }
    Ok(())
}

/// Waits until `fd` reports an error or hangup (true: for a /dev/fuse connection, the
/// kernel ended it, unmounted or aborted) or `wake` is readable (false).
pub fn wait_for_error(fd: BorrowedFd, wake: BorrowedFd) -> io::Result<bool> {
    let mut pollfds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            // No events asked for: errors and hangups are always reported.
            events: 0,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two pollfds, alive for the call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if pollfds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Ok(true);
        }
        if pollfds[1].revents != 0 {
            return Ok(false);
        }
    }
}

/// Ignores `signal` in this process.
pub fn ignore_signal(signal: i32) {
    // SAFETY: setting a signal's disposition to SIG_IGN runs no code of ours.
    unsafe { libc::signal(signal, libc::SIG_IGN) };
}

/// Sends `signal` to process `pid`.
pub fn signal_process(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("no such process"))?;
    // SAFETY: kill with integer arguments.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_carry_a_descriptor() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        send(a.as_fd(), b"one", Some(x.as_fd())).unwrap();
        send(a.as_fd(), b"two", None).unwrap();
        let mut buf = [0u8; 16];
        let (n, fd) = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        // The descriptor received is x's socket: what is sent on it arrives at y.
        send(fd.unwrap().as_fd(), b"through", None).unwrap();
        let (n, none) = recv(y.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], none.is_none()), (&b"through"[..], true));
        let (n, fd) = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fd.is_none()), (&b"two"[..], true));
        drop(a);
        assert_eq!(recv(b.as_fd(), &mut buf).unwrap().0, 0, "closed peer: 0");
    }

    #[test]
    fn a_closed_peer_is_seen_as_an_error_or_hangup() {
        let (a, b) = seqpacket_pair().unwrap();
        let (wake, woken) = seqpacket_pair().unwrap();
        let waiter = std::thread::spawn(move || wait_for_error(b.as_fd(), woken.as_fd()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        drop(a);
        assert!(waiter.join().unwrap().unwrap(), "the hangup is seen");
        drop(wake);
    }

    #[test]
    fn a_wait_for_an_error_ends_when_woken() {
        let (_a, b) = seqpacket_pair().unwrap();
        let (wake, woken) = seqpacket_pair().unwrap();
        let waiter = std::thread::spawn(move || wait_for_error(b.as_fd(), woken.as_fd()));
        send(wake.as_fd(), b"w", None).unwrap();
        assert!(!waiter.join().unwrap().unwrap(), "woken, no error");
    }

    #[test]
    fn replace_redirects_a_descriptor_number() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        // After this, a's number is a second descriptor of x.
        replace(a.as_fd(), x.as_fd()).unwrap();
        send(a.as_fd(), b"via a", None).unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = recv(y.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"via a");
        drop(b);
    }
}
