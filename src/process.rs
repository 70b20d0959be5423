//! Process-wide protection of key material: no core dumps.
//!
//! A core dump of `dst-server`, `dst-mount` or `dst-keygen` would hold the private key (and
//! session keys) in a file that anyone who can read the dump directory can read. Each binary
//! calls [`protect_process`] first thing in `main`.
//!
//! Side effects worth knowing: a non-dumpable process's `/proc/PID` entries belong to root,
//! so other processes of the same (non-root) user can no longer read `/proc/PID/fd` or attach
//! a debugger or `perf`; root (CAP_SYS_PTRACE) still can, and the process itself still reads
//! its own `/proc/self`. Children that `exec` (such as `fusermount3`) are dumpable again, but
//! inherit the core size limit of 0.

use std::io;

/// Marks this process as not dumpable (`prctl(PR_SET_DUMPABLE, 0)`) and sets its core size
/// limit to 0 (`setrlimit(RLIMIT_CORE, 0)`), so that neither a crash nor a signal writes its
/// memory to a core file, and other processes of the same user cannot read that memory via
/// ptrace or `/proc/PID/mem`. Both are tried; the first failure is returned.
pub fn protect_process() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    let dumpable = if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one properly sized rlimit struct that lives across the call.
    let core = if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    dumpable.and(core)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Making the test process non-dumpable is harmless: it only keeps debuggers of other
    /// users (and core dumps) away.
    #[test]
    fn protect_process_disables_core_dumps() {
        protect_process().unwrap();
        // SAFETY: PR_GET_DUMPABLE takes no pointer and returns the flag.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
        let mut lim = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit writes one properly sized rlimit struct of ours.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) }, 0);
        assert_eq!((lim.rlim_cur, lim.rlim_max), (0, 0));
        // Idempotent: lowering a limit already at 0 again succeeds.
        protect_process().unwrap();
    }
}
