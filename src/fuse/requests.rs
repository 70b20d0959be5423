//! What a kernel request becomes, decided without I/O: the part of a read or write that
//! lies inside the export, whether a write must be durable (FUA), what an fallocate mode
//! maps to (TRIM, WRITE_ZEROES, nothing, or a refusal), and the `.stats` text.

use super::WorkerInfo;

/// Bytes of a read at `offset` of `len` that lie inside a file of `size`.
pub(super) fn clip_read(offset: u64, len: u32, size: u64) -> u32 {
    size.saturating_sub(offset).min(u64::from(len)) as u32
}

/// Bytes of a write that fit: a write that starts at or past the end fails with ENOSPC, one
/// that crosses the end is cut short, as on a block device.
pub(super) fn clip_write(offset: u64, len: usize, size: u64) -> Result<usize, i32> {
    if len == 0 {
        return Ok(0);
    }
    match size.checked_sub(offset) {
        Some(room) if room > 0 => Ok(room.min(len as u64) as usize),
        _ => Err(libc::ENOSPC),
    }
}

/// A write from a descriptor opened O_SYNC or O_DSYNC (or written with RWF_DSYNC/RWF_SYNC,
/// which the kernel folds into these flags) must be durable when it completes: a FUA write.
pub(super) fn is_sync_write(flags: i32) -> bool {
    // O_SYNC includes the O_DSYNC bit on Linux; both are tested for clarity.
    flags & (libc::O_DSYNC | libc::O_SYNC) != 0
}

/// The `.stats` contents: the engine's `name value` lines, then this layer's.
pub(super) fn stats_text(engine: &str, in_progress: usize, worker: &WorkerInfo) -> String {
    let mut text = engine.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "fuse_in_progress {in_progress}\nkeeper_pid {}\nworker_pid {}\n\
         worker_restarts {}\nworker_last_exit {}\n",
        worker.keeper_pid,
        worker.worker_pid,
        worker.restarts,
        worker.last_exit.replace('\n', " ")
    ));
    text
}

/// What an fallocate request becomes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Allocate {
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// Space is always there: the export has its size.
    Nothing,
    Refuse(i32),
}

pub(super) fn fallocate_action(mode: i32, offset: u64, len: u64, size: u64) -> Allocate {
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let mode = mode & !libc::FALLOC_FL_KEEP_SIZE;
    let Some(end) = offset.checked_add(len) else {
        return Allocate::Refuse(libc::EINVAL);
    };
    // The file cannot grow; with KEEP_SIZE the part past the end is simply not there.
    if end > size && !keep_size && mode != libc::FALLOC_FL_PUNCH_HOLE {
        return Allocate::Refuse(libc::EFBIG);
    }
    let len = end.min(size).saturating_sub(offset);
    match mode {
        0 => Allocate::Nothing,
        _ if len == 0 => Allocate::Nothing,
        libc::FALLOC_FL_PUNCH_HOLE => Allocate::Trim { offset, len },
        libc::FALLOC_FL_ZERO_RANGE => Allocate::Zero { offset, len },
        _ => Allocate::Refuse(libc::EOPNOTSUPP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
    const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;

    #[test]
    fn reads_stop_at_the_end() {
        assert_eq!(clip_read(0, 4096, 10_000), 4096);
        assert_eq!(clip_read(8192, 4096, 10_000), 10_000 - 8192);
        assert_eq!(clip_read(10_000, 4096, 10_000), 0);
        assert_eq!(clip_read(u64::MAX, 4096, 10_000), 0);
    }

    #[test]
    fn writes_are_cut_at_the_end_or_refused_past_it() {
        assert_eq!(clip_write(0, 4096, 10_000), Ok(4096));
        assert_eq!(clip_write(9_000, 4096, 10_000), Ok(1_000));
        assert_eq!(clip_write(10_000, 1, 10_000), Err(libc::ENOSPC));
        assert_eq!(clip_write(u64::MAX, 1, 10_000), Err(libc::ENOSPC));
        assert_eq!(clip_write(10_000, 0, 10_000), Ok(0));
    }

    #[test]
    fn sync_opens_make_fua_writes() {
        assert!(!is_sync_write(libc::O_WRONLY | libc::O_DIRECT));
        assert!(is_sync_write(libc::O_RDWR | libc::O_DSYNC));
        assert!(is_sync_write(libc::O_WRONLY | libc::O_SYNC));
    }

    #[test]
    fn fallocate_modes_map_to_transactions() {
        let size = 1 << 20;
        assert_eq!(
            fallocate_action(PUNCH, 4096, 8192, size),
            Allocate::Trim {
                offset: 4096,
                len: 8192
            }
        );
        // Past the end: only the part inside the file.
        assert_eq!(
            fallocate_action(PUNCH, size - 4096, 1 << 30, size),
            Allocate::Trim {
                offset: size - 4096,
                len: 4096
            }
        );
        assert_eq!(
            fallocate_action(ZERO | KEEP, 0, 4096, size),
            Allocate::Zero {
                offset: 0,
                len: 4096
            }
        );
        assert_eq!(
            fallocate_action(ZERO, 0, 4096, size),
            Allocate::Zero {
                offset: 0,
                len: 4096
            }
        );
        // Zeroing that would grow the file cannot be done.
        assert_eq!(
            fallocate_action(ZERO, size - 1, 2, size),
            Allocate::Refuse(libc::EFBIG)
        );
        // Plain allocation: the space is there; growing is refused.
        assert_eq!(fallocate_action(0, 0, size, size), Allocate::Nothing);
        assert_eq!(fallocate_action(KEEP, 0, 2 * size, size), Allocate::Nothing);
        assert_eq!(
            fallocate_action(0, 0, size + 1, size),
            Allocate::Refuse(libc::EFBIG)
        );
        assert_eq!(fallocate_action(PUNCH, size, 4096, size), Allocate::Nothing);
        assert_eq!(
            fallocate_action(libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096, size),
            Allocate::Refuse(libc::EOPNOTSUPP)
        );
        assert_eq!(
            fallocate_action(PUNCH, u64::MAX, 2, size),
            Allocate::Refuse(libc::EINVAL)
        );
    }

    #[test]
    fn stats_text_appends_this_layers_lines() {
        let w = WorkerInfo {
            keeper_pid: 10,
            worker_pid: 11,
            restarts: 2,
            last_exit: "killed by signal 9 (SIGKILL)".into(),
        };
        let tail = "keeper_pid 10\nworker_pid 11\nworker_restarts 2\n\
                    worker_last_exit killed by signal 9 (SIGKILL)\n";
        assert_eq!(
            stats_text("a 1\nb 2\n", 3, &w),
            format!("a 1\nb 2\nfuse_in_progress 3\n{tail}")
        );
        assert_eq!(
            stats_text("a 1", 0, &w),
            format!("a 1\nfuse_in_progress 0\n{tail}")
        );
    }
}
