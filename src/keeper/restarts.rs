//! What a worker's exit means and when the next one starts: the exit codes a worker ends
//! with, their reading by the keeper, and the backoff between restarts after crashes.
//! Pure: statuses and durations in, decisions out.

use std::time::Duration;

/// The FUSE connection ended (unmounted) or the keeper said stop: nothing to restart.
pub const EXIT_MOUNT_GONE: i32 = 0;
/// The worker could not start (connect, adopt); its message went to the keeper.
pub const EXIT_FAILED: i32 = 1;
/// The FUSE session ended with an error while the mount may still be there.
pub const EXIT_SESSION_ERROR: i32 = 2;
/// Drained for an upgrade: everything in progress answered, the rest left to the next.
pub const EXIT_DRAINED: i32 = 3;

/// How a worker ended, as the keeper acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    MountGone,
    Drained,
    /// Anything else: a crash, a kill, a failed start. The text says which.
    Died(String),
}

/// Reads a worker's exit: its code, or the signal that killed it.
pub fn classify(code: Option<i32>, signal: Option<i32>) -> Exit {
    match (code, signal) {
        (Some(EXIT_MOUNT_GONE), _) => Exit::MountGone,
        (Some(EXIT_DRAINED), _) => Exit::Drained,
        _ => Exit::Died(describe(code, signal)),
    }
}

/// An exit for people and `.stats`: "exit status 1", "killed by signal 9 (SIGKILL)".
pub fn describe(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(EXIT_MOUNT_GONE), _) => "unmounted".into(),
        (Some(EXIT_DRAINED), _) => "drained for an upgrade".into(),
        (Some(EXIT_FAILED), _) => "could not start (exit status 1)".into(),
        (Some(EXIT_SESSION_ERROR), _) => "FUSE session error (exit status 2)".into(),
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match signal_name(s) {
            Some(name) => format!("killed by signal {s} ({name})"),
            None => format!("killed by signal {s}"),
        },
        (None, None) => "ended for an unknown reason".into(),
    }
}

fn signal_name(s: i32) -> Option<&'static str> {
    Some(match s {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

/// What the keeper does once the worker serving its mount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The mount is gone: the keeper exits.
    Exit,
    /// The kernel cannot resend what the worker left unanswered, so no other worker can
    /// take over: the mount ends.
    EndMount,
    /// A new worker, after this wait.
    Restart(Duration),
}

/// The wait before restarting a worker that died: none the first time, then 50 ms
/// doubling to 5 s while workers keep dying; a worker that served for 30 s starts over.
#[derive(Debug, Default)]
pub struct Backoff {
    crashes: u32,
}

const STEP: Duration = Duration::from_millis(50);
const MAX: Duration = Duration::from_secs(5);
/// A worker that served this long was healthy: its death starts the backoff over.
pub const SETTLED: Duration = Duration::from_secs(30);

impl Backoff {
    /// What follows `exit` of a worker that had served for `served`, on a kernel that
    /// can resend unanswered requests or not.
    pub fn next(&mut self, exit: &Exit, can_resend: bool, served: Duration) -> Next {
        match exit {
            Exit::MountGone => Next::Exit,
            _ if !can_resend => Next::EndMount,
            Exit::Drained => Next::Restart(Duration::ZERO),
            Exit::Died(_) => Next::Restart(self.after_death(served)),
        }
    }

    /// The wait after a worker died that had served for `served`.
    pub fn after_death(&mut self, served: Duration) -> Duration {
        if served >= SETTLED {
            self.crashes = 0;
        }
        self.crashes = self.crashes.saturating_add(1);
        match self.crashes {
            1 => Duration::ZERO,
            n => STEP.saturating_mul(1 << (n - 2).min(16)).min(MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_read_and_described() {
        assert_eq!(classify(Some(0), None), Exit::MountGone);
        assert_eq!(classify(Some(3), None), Exit::Drained);
        assert_eq!(
            classify(None, Some(9)),
            Exit::Died("killed by signal 9 (SIGKILL)".into())
        );
        assert_eq!(
            classify(Some(101), None),
            Exit::Died("exit status 101".into())
        );
        assert_eq!(describe(None, Some(64)), "killed by signal 64");
        assert_eq!(describe(Some(1), None), "could not start (exit status 1)");
    }

    #[test]
    fn an_unmount_ends_the_keeper_and_without_resend_a_death_ends_the_mount() {
        let mut b = Backoff::default();
        let died = Exit::Died("killed by signal 9 (SIGKILL)".into());
        let t = Duration::from_secs(1);
        assert_eq!(b.next(&Exit::MountGone, true, t), Next::Exit);
        assert_eq!(b.next(&Exit::MountGone, false, t), Next::Exit);
        assert_eq!(b.next(&died, false, t), Next::EndMount);
        assert_eq!(b.next(&Exit::Drained, false, t), Next::EndMount);
        assert_eq!(b.next(&died, true, t), Next::Restart(Duration::ZERO));
        assert_eq!(b.next(&died, true, t), Next::Restart(STEP));
        // An upgrade is no crash: at once, and the backoff is left as it was.
        assert_eq!(
            b.next(&Exit::Drained, true, t),
            Next::Restart(Duration::ZERO)
        );
        assert_eq!(b.next(&died, true, t), Next::Restart(STEP * 2));
    }

    #[test]
    fn backoff_grows_while_workers_keep_dying_and_resets_after_a_healthy_one() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        let waits: Vec<_> = (0..10).map(|_| b.after_death(quick)).collect();
        assert_eq!(waits[0], Duration::ZERO);
        assert_eq!(waits[1], STEP);
        assert_eq!(waits[2], STEP * 2);
        assert_eq!(waits[3], STEP * 4);
        assert_eq!(waits[9], MAX);
        assert_eq!(b.after_death(SETTLED), Duration::ZERO);
        assert_eq!(b.after_death(quick), STEP);
    }
}
