//! The FUSE filesystem of `dst-mount`: a root directory holding one regular file named after
//! the export (its size is the export's) and a hidden, read-only `.stats` file with the
//! engine's live counters.
//!
//! Requests that need the export node are started on the FUSE thread, which also sends one
//! alone in flight (no thread to wake on the way out), and are answered by the engine's
//! reply thread as their acks arrive (none on the way back; large reads are answered on an
//! executor thread, so that their copy does not hold up the replies behind them). The loop
//! never waits for an ack, so the kernel can keep many requests in flight and the engine's
//! window, not this loop, bounds them. Reads and writes map to transactions, fsync,
//! fdatasync and the flush of a writable handle's close to FLUSH, and fallocate's
//! PUNCH_HOLE and ZERO_RANGE to TRIM and WRITE_ZEROES, which is how `mkfs` discards and
//! `fstrim` on a loop device on top reach the export. The file's size is the export's: it
//! grows when the export does ([`invalidate_size`] tells the kernel), and truncating it to
//! another size and creating or removing names are refused.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use event_listener::Event;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::client::engine::Engine;

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

/// Counts the tasks answering requests, so that shutdown can stop taking new ones and wait
/// for the last reply.
#[derive(Default)]
pub struct Tasks {
    running: AtomicUsize,
    stopping: AtomicBool,
    idle: Event,
}

/// One running task; dropping it ends it.
pub struct TaskGuard(Arc<Tasks>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify(usize::MAX);
        }
    }
}

impl Tasks {
    /// Registers a task, unless shutdown has begun.
    fn enter(self: &Arc<Self>) -> Option<TaskGuard> {
        // Counted before `stopping` is checked, and `stop` sets `stopping` before it reads the
        // count; with SeqCst on all four, either `stop` sees this task or it sees `stopping`.
        self.running.fetch_add(1, Ordering::SeqCst);
        let guard = TaskGuard(self.clone());
        if self.stopping.load(Ordering::SeqCst) {
            return None;
        }
        Some(guard)
    }

    /// Refuses new tasks (their requests fail with EIO) and waits for the running ones.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        loop {
            let listener = self.idle.listen();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            listener.await;
        }
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
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

/// Bytes of a read at `offset` of `len` that lie inside a file of `size`.
fn clip_read(offset: u64, len: u32, size: u64) -> u32 {
    size.saturating_sub(offset).min(u64::from(len)) as u32
}

/// Bytes of a write that fit: a write that starts at or past the end fails with ENOSPC, one
/// that crosses the end is cut short, as on a block device.
fn clip_write(offset: u64, len: usize, size: u64) -> Result<usize, i32> {
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
fn is_sync_write(flags: i32) -> bool {
    // O_SYNC includes the O_DSYNC bit on Linux; both are tested for clarity.
    flags & (libc::O_DSYNC | libc::O_SYNC) != 0
}

/// The `.stats` contents: the engine's `name value` lines, then this layer's.
fn stats_text(engine: &str, in_progress: usize) -> String {
    let mut text = engine.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("fuse_in_progress {in_progress}\n"));
    text
}

/// What an fallocate request becomes.
#[derive(Debug, PartialEq, Eq)]
enum Allocate {
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

fn fallocate_action(mode: i32, offset: u64, len: u64, size: u64) -> Allocate {
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
    config.acl = if root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config
}

impl Filesystem for DstFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            log::info!("kernel limits writes to {max} bytes");
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(CONGESTION_THRESHOLD);
        // A loop device with direct I/O submits asynchronous requests; without ASYNC_DIO the
        // kernel would turn each into a synchronous one and serialise the device.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            log::warn!("kernel lacks FUSE_ASYNC_DIO: direct I/O runs one request at a time");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, self.lookup_name(name)) {
            (ROOT_INO, Some(ino)) => {
                let attr = self.attr(ino).expect("known inode");
                reply.entry(&TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // The size is the export's; owner and mode are fixed. Setting what already is (a
        // `truncate -s` to the same size, `touch`) succeeds, so tools that do that work.
        let changes_size = size.is_some_and(|s| s != attr.size);
        let changes_mode = mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm));
        let changes_owner =
            uid.is_some_and(|u| u != attr.uid) || gid.is_some_and(|g| g != attr.gid);
        if changes_size || changes_mode || changes_owner {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr)
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EPERM)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match ino.0 {
            DATA_INO => {
                if writing && self.cfg.read_only {
                    return reply.error(Errno::EROFS);
                }
                // No FOPEN_DIRECT_IO: O_DIRECT opens (losetup --direct-io) then go through
                // the kernel's direct I/O path, and buffered users get the page cache.
                let fh = if writing { FH_WRITABLE } else { 0 };
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            STATS_INO => {
                if writing {
                    return reply.error(Errno::EACCES);
                }
                let fh = self.next_fh.fetch_add(2, Ordering::Relaxed);
                // The engine's counters, and the requests the kernel has handed us that are
                // still being answered.
                let text = Arc::new(stats_text(
                    &self.engine.stats().to_string(),
                    self.tasks.running(),
                ));
                self.stats.lock().unwrap().insert(fh, text);
                // Direct I/O: reads reach us although the size says 0.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino.0 {
            DATA_INO => {
                let len = clip_read(offset, size, self.engine.size());
                if len == 0 {
                    return reply.data(&[]);
                }
                let Some((engine, guard)) = self.task() else {
                    return reply.error(Errno::EIO);
                };
                let pool = engine.clone();
                engine.start_read(offset, len, move |outcome| {
                    match outcome {
                        Ok(data) => {
                            reply.data(&data);
                            pool.recycle(data);
                        }
                        Err(errno) => reply.error(Errno::from_i32(errno)),
                    }
                    drop(guard);
                });
            }
            STATS_INO => {
                let text = self.stats.lock().unwrap().get(&fh.0).cloned();
                match text {
                    Some(text) => {
                        let start = (offset as usize).min(text.len());
                        let end = start.saturating_add(size as usize).min(text.len());
                        reply.data(&text.as_bytes()[start..end])
                    }
                    None => reply.error(Errno::EBADF),
                }
            }
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != DATA_INO {
            return reply.error(Errno::EBADF);
        }
        if self.cfg.read_only {
            return reply.error(Errno::EROFS);
        }
        let len = match clip_write(offset, data.len(), self.engine.size()) {
            Ok(0) => return reply.written(0),
            Ok(len) => len,
            Err(errno) => return reply.error(Errno::from_i32(errno)),
        };
        let fua = is_sync_write(flags.0);
        let Some((engine, guard)) = self.task() else {
            return reply.error(Errno::EIO);
        };
        // The kernel's buffer is reused for the next request once we return: the one copy
        // of the data, into a buffer the engine keeps until the write is acked.
        let data = engine.buffer(&data[..len]);
        engine.start_write(offset, data, fua, move |result| {
            match result {
                Ok(()) => reply.written(len as u32),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }
            drop(guard);
        });
    }

    /// Called at every close of a descriptor. For a descriptor that could write, flushes, so
    /// that what was written through it is durable once close returns (a loop device detached
    /// with `losetup -d` ends this way). Read-only descriptors have nothing to flush.
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if ino.0 != DATA_INO || fh.0 & FH_WRITABLE == 0 || self.cfg.read_only {
            return reply.ok();
        }
        self.flush_engine(reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == STATS_INO {
            self.stats.lock().unwrap().remove(&fh.0);
        }
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fsync and fdatasync alike: the export node's FLUSH is an fdatasync, and the file's
        // metadata (size, times) never changes.
        if ino.0 != DATA_INO || self.cfg.read_only {
            return reply.ok();
        }
        self.flush_engine(reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino.0 {
            ROOT_INO => reply.opened(FileHandle(0), FopenFlags::empty()),
            _ => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DATA_INO, FileType::RegularFile, self.cfg.name.as_str()),
            (STATS_INO, FileType::RegularFile, STATS_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            // The offset stored with an entry is where the next readdir resumes.
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    /// Answered locally: the export's size is known, and it is always fully allocated as far
    /// as this mount can tell (there are no free blocks to hand out and no files to create).
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = self.cfg.block_size.max(512);
        let blocks = self.engine.size().div_ceil(u64::from(bsize));
        reply.statfs(blocks, 0, 0, 2, 0, bsize, 255, bsize)
    }

    // Extended attributes are not supported; ENOSYS makes the kernel stop asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    // What follows is not supported. ENOSYS makes the kernel stop asking (SEEK_DATA and
    // SEEK_HOLE then treat the file as all data; cp falls back from copy_file_range to reads
    // and writes), without fuser's default warning in the log.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY)
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != DATA_INO {
            return reply.error(Errno::EBADF);
        }
        let action = fallocate_action(mode, offset, length, self.engine.size());
        if self.cfg.read_only && action != Allocate::Nothing {
            return reply.error(Errno::EROFS);
        }
        let (offset, len, zero) = match action {
            Allocate::Nothing => return reply.ok(),
            Allocate::Refuse(errno) => return reply.error(Errno::from_i32(errno)),
            Allocate::Trim { offset, len } => (offset, len, false),
            Allocate::Zero { offset, len } => (offset, len, true),
        };
        let Some((engine, guard)) = self.task() else {
            return reply.error(Errno::EIO);
        };
        spawn(guard, async move {
            let result = if zero {
                engine.write_zeroes(offset, len, false).await
            } else {
                engine.trim(offset, len).await
            };
            reply_empty(reply, result);
        });
    }
}

impl DstFs {
    fn flush_engine(&self, reply: ReplyEmpty) {
        let Some((engine, guard)) = self.task() else {
            return reply.error(Errno::EIO);
        };
        engine.start_flush(move |result| {
            reply_empty(reply, result);
            drop(guard);
        });
    }
}

/// Runs a request's task on smol's global executor; the guard ends with the task.
fn spawn(guard: TaskGuard, task: impl Future<Output = ()> + Send + 'static) {
    smol::spawn(async move {
        task.await;
        drop(guard);
    })
    .detach();
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), i32>) {
    match result {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(Errno::from_i32(errno)),
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
        assert_eq!(
            stats_text("a 1\nb 2\n", 3),
            "a 1\nb 2\nfuse_in_progress 3\n"
        );
        assert_eq!(stats_text("a 1", 0), "a 1\nfuse_in_progress 0\n");
    }

    #[test]
    fn export_names_that_cannot_be_files_are_refused() {
        assert!(check_file_name("disk").is_ok());
        assert!(check_file_name("a.img").is_ok());
        for bad in ["", ".", "..", ".stats", "a/b"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stop_waits_for_running_tasks_and_refuses_new_ones() {
        let tasks = Arc::new(Tasks::default());
        let a = tasks.enter().unwrap();
        let b = tasks.enter().unwrap();
        assert_eq!(tasks.running(), 2);
        let stopper = {
            let tasks = tasks.clone();
            std::thread::spawn(move || smol::block_on(tasks.stop()))
        };
        drop(a);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!stopper.is_finished(), "stop returned with a task running");
        assert!(tasks.enter().is_none(), "a task started during shutdown");
        drop(b);
        stopper.join().unwrap();
        assert_eq!(tasks.running(), 0);
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
