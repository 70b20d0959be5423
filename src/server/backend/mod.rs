//! The export's I/O as a stack, in the manner of nbdkit's plugins and filters or qemu's
//! block drivers: a [`Backend`] does size, read, write (with FUA), flush, trim and zero on
//! something; [`file::FileBackend`] does them on a regular file or block device, and a
//! filter (the checksum table, [`super::checksums::Checksums`]) wraps any backend and does
//! its own work around the one below. [`super::export::Export`] holds one backend and
//! does not know which.

pub mod file;

use std::io;

use crate::pool::Pool;

/// One layer of an export's I/O. Offsets and lengths are already checked against the
/// export's size. Calls are blocking and may come from many threads at once.
pub trait Backend: Send + Sync {
    /// Bytes the storage has now; more than the export serves once it has grown.
    fn disk_size(&self) -> io::Result<u64>;

    /// Reads `len` bytes at `offset` into a buffer from `pool`.
    fn read(&self, offset: u64, len: usize, pool: &Pool) -> io::Result<Vec<u8>>;

    /// Writes `data` at `offset`; with `fua`, durable before it returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// Puts every completed write on stable storage.
    fn flush(&self) -> io::Result<()>;

    /// Discards `len` bytes at `offset`, which then read as zeros; returns whether it did
    /// (a discard is a hint, which storage may ignore, and then the data stays).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<bool>;

    /// Makes `len` bytes at `offset` read as zeros.
    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// The ranges from `from` to `to` that may hold data (nbdkit's extents); the rest
    /// reads as zeros. `None` when the storage cannot tell.
    fn extents(&self, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        let _ = (from, to);
        None
    }

    /// What identifies the storage across restarts (the same file, not a copy or a new
    /// one at the same path); 0 when nothing does.
    fn identity(&self) -> io::Result<u64> {
        Ok(0)
    }

    /// Takes the larger size `size` found by [`disk_size`](Self::disk_size) before the
    /// export serves it: a filter makes itself ready for it.
    fn grow(&self, size: u64) -> io::Result<()> {
        let _ = size;
        Ok(())
    }

    /// Makes everything durable and closes cleanly, at shutdown.
    fn close(&self) -> io::Result<()> {
        self.flush()
    }

    /// Blocks found corrupt since the server started, for a layer that checks.
    fn corrupt_blocks(&self) -> Option<u64> {
        None
    }
}
