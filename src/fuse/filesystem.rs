//! The FUSE operations of [`DstFs`]: each kernel request is answered at once (attributes,
//! lookups, `.stats`) or started as a transaction whose completion replies.

use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::requests::{
    clip_read, clip_write, fallocate_action, is_sync_write, stats_text, Allocate,
};
use super::tasks::TaskGuard;
use super::{DstFs, DATA_INO, FH_WRITABLE, ROOT_INO, STATS_INO, STATS_NAME, TTL};

impl Filesystem for DstFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        super::configure_kernel(config);
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
                    &self.cfg.worker,
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
        // The kernel's buffer is reused for the next request once we return, so the engine
        // keeps the data until the ack: sealed straight from this buffer as it is sent, or
        // copied when it cannot be sent at once.
        engine.start_write(offset, &data[..len], fua, move |result| {
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
