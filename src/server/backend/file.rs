//! The backend at the bottom of every export: a regular file or a block device, read and
//! written with `pread`/`pwrite`, FUA writes through a second descriptor opened
//! `O_DSYNC`, trim and zeroing with `fallocate`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_64;

use super::Backend;
use crate::pool::Pool;

/// A regular file or block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// The same file opened O_DSYNC, so a FUA write is durable without a full fdatasync.
    dsync: Option<File>,
    /// Buffered writes to one file serialize on its inode lock in the kernel, where a
    /// waiting thread spins on the CPU; waiting here sleeps instead.
    write_lock: Mutex<()>,
    block_size: u32,
}

/// Why a path cannot be a backend.
#[derive(Debug)]
pub enum OpenError {
    /// Neither a regular file nor a block device.
    NotFileOrDevice,
    Io(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::NotFileOrDevice => f.write_str("neither a regular file nor a block device"),
            OpenError::Io(e) => e.fmt(f),
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

impl FileBackend {
    /// Creates a sparse image of `size` bytes at `path`, readable by the server's user
    /// only (it holds a client's data; the umask can only narrow this).
    pub fn create(path: &Path, size: u64) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?
            .set_len(size)
    }

    /// Opens the file or block device at `path`, for writing unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<FileBackend, OpenError> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags)
                .open(path)
        };
        let file = open(0)?;
        let ft = file.metadata()?.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(OpenError::NotFileOrDevice);
        }
        let block_size = if ft.is_block_device() {
            logical_block_size(&file)?
        } else {
            4096
        };
        let dsync = if read_only {
            None
        } else {
            Some(open(libc::O_DSYNC)?)
        };
        Ok(FileBackend {
            file,
            dsync,
            write_lock: Mutex::new(()),
            block_size,
        })
    }

    /// The block size to advertise: the device's logical block size, or 4 KiB.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let mut r = self.fallocate(libc::FALLOC_FL_ZERO_RANGE | keep, offset, len);
        if r.as_ref().is_err_and(unsupported) {
            r = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len);
        }
        if r.as_ref().is_err_and(unsupported) {
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeroes.len() as u64) as usize;
                self.file.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            r = Ok(());
        }
        r
    }
}

impl Backend for FileBackend {
    fn disk_size(&self) -> io::Result<u64> {
        (&self.file).seek(SeekFrom::End(0))
    }

    fn read(&self, offset: u64, len: usize, pool: &Pool) -> io::Result<Vec<u8>> {
        let mut buf = pool.take(len);
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) => {
                pool.put(buf);
                Err(e)
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let f = match &self.dsync {
            Some(dsync) if fua => dsync,
            _ => &self.file,
        };
        let _serial = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all_at(data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<bool> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(punch, offset, len) {
            // A discard is a hint: where holes cannot be punched, the data may stay.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
            Ok(()) => {
                if fua {
                    self.flush()?;
                }
                Ok(true)
            }
        }
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.zero_range(offset, len)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn extents(&self, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut ranges = Vec::new();
        let mut pos = from;
        while pos < to {
            // SAFETY: lseek on a descriptor we own; I/O uses pread and pwrite, so the
            // offset it moves is used by no one. (`Seek` has no SEEK_DATA.)
            let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
            if data < 0 {
                return match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENXIO) => Some(ranges),
                    _ => None,
                };
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return None;
            }
            ranges.push((data as u64, (hole as u64).min(to)));
            pos = hole as u64;
        }
        Some(ranges)
    }

    /// A hash of the inode number, the inode's generation and its birth time, since file
    /// systems reuse a deleted file's inode number at once (the generation, where the
    /// file system has one, changes then); 0 for a block device, whose node is made anew
    /// at every boot.
    fn identity(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        if !meta.file_type().is_file() {
            return Ok(0);
        }
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let mut generation: libc::c_long = 0;
        // SAFETY: FS_IOC_GETVERSION writes one long through the pointer; where the file
        // system does not support it, it fails and the generation stays 0.
        unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::FS_IOC_GETVERSION,
                &mut generation,
            )
        };
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&meta.ino().to_le_bytes());
        bytes[8..16].copy_from_slice(&(generation as u64).to_le_bytes());
        bytes[16..].copy_from_slice(&born.to_le_bytes());
        Ok(xxh3_64(&bytes).max(1))
    }
}

fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer we pass.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as u32)
}
