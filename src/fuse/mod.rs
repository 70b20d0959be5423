//! The FUSE filesystem of `dst-mount`: a root directory holding one regular file named after
//! the export (its size is the export's) and a hidden, read-only `.stats` file with the
//! engine's live counters.
//!
//! Requests that need the export node are started on the FUSE thread that read them, which
//! also sends them (no thread to wake on the way out), and are answered by the engine's
//! reply thread as their acks arrive (none on the way back; large reads are answered on an
//! executor thread, so that their copy does not hold up the replies behind them). The loops
//! never wait for an ack, so the kernel can keep many requests in flight and the engine's
//! window, not these loops, bounds them. Reads and writes map to transactions, fsync,
//! fdatasync and the flush of a writable handle's close to FLUSH, and fallocate's
//! PUNCH_HOLE and ZERO_RANGE to TRIM and WRITE_ZEROES, which is how `mkfs` discards and
//! `fstrim` on a loop device on top reach the export. The file's size is the export's: it
//! grows when the export does ([`invalidate_size`] tells the kernel), and truncating it to
//! another size and creating or removing names are refused.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, FileAttr, FileType, INodeNo, InitFlags, KernelConfig, MountOption, SessionACL,
};

use crate::client::engine::Engine;

mod filesystem;
mod requests;
mod tasks;

use tasks::TaskGuard;
pub use tasks::Tasks;

/// The hidden file with the engine's counters.
pub const STATS_NAME: &str = ".stats";

const ROOT_INO: u64 = 1;
const DATA_INO: u64 = 2;
const STATS_INO: u64 = 3;

/// Largest write the kernel is asked to send at once: 1 MiB, the kernel's usual ceiling
/// (fuse `max_pages_limit` of 256 pages) and the default transfer size of the protocol.
pub const MAX_WRITE: u32 = 1 << 20;
/// Background requests (readahead, asynchronous direct I/O from a loop device) the kernel may
/// have outstanding; above the congestion threshold it throttles writers.
pub const MAX_BACKGROUND: u16 = 128;
pub const CONGESTION_THRESHOLD: u16 = 96;

/// Threads reading requests from the FUSE connection, all on the one descriptor the keeper
/// holds: while one sends a request it started to the export node, the next is read.
/// (Not cloned descriptors: a clone dies with the worker, and the kernel fails the
/// requests read through it instead of resending them to the next worker.)
const FUSE_THREADS: usize = 2;

/// Attributes change only when the export grows, and then the kernel is told, so they may be
/// cached; `.stats` has size 0 and is read with direct I/O, so caching does not hide updates.
const TTL: Duration = Duration::from_secs(60);

/// Handles of the data file carry this bit when opened for writing, so that close knows
/// whether there is anything to flush.
const FH_WRITABLE: u64 = 1;

/// What the filesystem shows; fixed for the life of a mount (the size is the engine's).
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// The data file's name: the export's.
    pub name: String,
    pub block_size: u32,
    pub read_only: bool,
    /// Owner of every file: whoever mounted.
    pub uid: u32,
    pub gid: u32,
    /// Who serves the mount, for `.stats`.
    pub worker: WorkerInfo,
}

/// The keeper and worker serving a mount, as `.stats` shows them.
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    pub keeper_pid: u32,
    pub worker_pid: u32,
    /// Workers started after the first.
    pub restarts: u32,
    /// How the previous worker ended ("none" for the first).
    pub last_exit: String,
}

/// What the filesystem asks of the kernel in FUSE_INIT. The keeper's answer at mount time
/// and every worker's (to a synthesized INIT) must agree, so both call this.
pub fn configure_kernel(config: &mut KernelConfig) {
    if let Err(max) = config.set_max_write(MAX_WRITE) {
        log::debug!("kernel limits writes to {max} bytes");
        let _ = config.set_max_write(max);
    }
    let _ = config.set_max_background(MAX_BACKGROUND);
    let _ = config.set_congestion_threshold(CONGESTION_THRESHOLD);
    // A loop device with direct I/O submits asynchronous requests; without ASYNC_DIO the
    // kernel would turn each into a synchronous one and serialise the device.
    if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
        log::warn!("kernel lacks FUSE_ASYNC_DIO: direct I/O runs one request at a time");
    }
}

/// Makes the kernel forget the data file's attributes, so that it asks for the grown size.
/// Only attributes (a negative offset): the data cached stays valid. A file the kernel
/// holds nothing of (ENOENT) has nothing to forget.
pub fn invalidate_size(notifier: &fuser::Notifier) -> std::io::Result<()> {
    match notifier.inval_inode(INodeNo(DATA_INO), -1, 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Checks that the export name can be the data file's name beside `.stats`.
pub fn check_file_name(export: &str) -> Result<(), String> {
    match export {
        "" | "." | ".." => Err(format!("export name '{export}' cannot be a file name")),
        STATS_NAME => Err(format!(
            "export name '{export}' is taken by the statistics file; rename the export"
        )),
        _ if export.contains('/') => Err(format!("export name '{export}' contains '/'")),
        _ => Ok(()),
    }
}

/// The filesystem handed to fuser.
pub struct DstFs {
    engine: Engine,
    cfg: FsConfig,
    /// Mount time: the times of every file.
    time: SystemTime,
    tasks: Arc<Tasks>,
    /// `.stats` contents per open handle: taken at open, so that a reader sees one
    /// consistent snapshot however it splits its reads.
    stats: Mutex<HashMap<u64, Arc<String>>>,
    next_fh: AtomicU64,
}

impl DstFs {
    pub fn new(engine: Engine, cfg: FsConfig) -> DstFs {
        DstFs {
            engine,
            cfg,
            time: SystemTime::now(),
            tasks: Arc::default(),
            stats: Mutex::default(),
            // `.stats` handles count up from 2 in steps of 2, clear of the data file's 0 and 1.
            next_fh: AtomicU64::new(2),
        }
    }

    /// The task counter, for shutdown.
    pub fn tasks(&self) -> Arc<Tasks> {
        self.tasks.clone()
    }

    /// The engine for a task answering a request, with the task registered for shutdown;
    /// `None` once shutdown has begun (the request then fails with EIO).
    fn task(&self) -> Option<(Engine, TaskGuard)> {
        let guard = self.tasks.enter()?;
        Some((self.engine.clone(), guard))
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            DATA_INO => (
                FileType::RegularFile,
                if self.cfg.read_only { 0o400 } else { 0o600 },
                self.engine.size(),
                1,
            ),
            STATS_INO => (FileType::RegularFile, 0o444, 0, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: self.cfg.block_size,
            flags: 0,
        })
    }

    fn lookup_name(&self, name: &OsStr) -> Option<u64> {
        if name == OsStr::new(&self.cfg.name) {
            Some(DATA_INO)
        } else if name == OsStr::new(STATS_NAME) {
            Some(STATS_INO)
        } else {
            None
        }
    }
}

/// The fuser session settings: source shown in /proc/mounts and `df`, type `fuse.dst`, the
/// kernel checking permissions against the modes shown (0600 data file, 0444 `.stats`), and,
/// when root mounts, access for other users (to read `.stats`; the data file stays the owner's).
/// Never auto_unmount: a mount that outlives dst-mount would fail I/O, but unmounting it
/// behind a loop device's back is worse, and unmount is explicit (umount, SIGTERM).
pub fn mount_config(source: &str, read_only: bool, root: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(source.to_string()),
        // As a kernel option too, so that a direct mount by root shows the type fuse.dst.
        MountOption::CUSTOM("subtype=dst".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.n_threads = Some(FUSE_THREADS);
    config.acl = if root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_that_cannot_be_files_are_refused() {
        assert!(check_file_name("disk").is_ok());
        assert!(check_file_name("a.img").is_ok());
        for bad in ["", ".", "..", ".stats", "a/b"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_config_shows_source_type_and_access() {
        let c = mount_config("node1:7700/disk", true, true);
        assert!(c
            .mount_options
            .contains(&MountOption::FSName("node1:7700/disk".into())));
        assert!(c.mount_options.contains(&MountOption::RO));
        assert!(c.mount_options.contains(&MountOption::DefaultPermissions));
        assert!(!c.mount_options.contains(&MountOption::AutoUnmount));
        assert_eq!(c.acl, SessionACL::All);
        let c = mount_config("n/d", false, false);
        assert!(c.mount_options.contains(&MountOption::RW));
        assert_eq!(c.acl, SessionACL::Owner);
    }
}
