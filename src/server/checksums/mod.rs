//! Integrity at rest: a per-block xxh3 checksum table beside an export, verified on every
//! read and kept up to date by every write, trim and zeroing; its crash consistency
//! against the data; recovery after an unclean shutdown; scrub and rebuild.
//!
//! The table (the sidecar `PATH.dst-sum`, or the file an export names with
//! `:checksums=TABLE`, which a block device must) is a filter, [`Checksums`], that wraps
//! the export's backend ([`super::backend`]): every read and change of the image goes
//! through it and on to the backend below, so the order "dirty bit durable, then data,
//! then checksum" is kept in one place. Its parts, by job: [`layout`] (where things are
//! in the file, and how it grows), `tracker` (the pure crash-consistency state machine),
//! `stripes` (block-range locks), `map` (the mapped file: every unsafe block), `filter`
//! (open, the read and change path), `durability` (checkpoints, recovery, growth),
//! `build` (new tables, scrub, rebuild) and [`ChecksumError`] (what can go wrong, typed;
//! the caller turns it into advice).
//!
//! # Table format
//!
//! One checksum per 4 KiB block of the image ([`BLOCK_SIZE`]; the last block may be
//! short), whatever the export's advertised block size. The file is little-endian:
//!
//! - bytes 0..64 of page 0: magic `DSTSUM\0\0`, version, block size, image size, block
//!   count, log2 of the blocks per region, entries offset, a hash identifying the image
//!   file (inode, generation, birth time; 0 for a block device), and an xxh3 of those;
//! - byte 64: the clean flag (1 when the table was closed cleanly);
//! - bytes 1024..2048: the dirty-region bitmap, one bit per region of at least 16 MiB
//!   (at most [`MAX_REGIONS`] regions);
//! - from byte 4096: one `u64` per block: [`UNVERIFIED`] (0), [`ZERO`] (1), or the
//!   block's xxh3-64 (values below 2 are moved up by 2, so they never look reserved).
//!
//! A table that reads as zeros claims nothing ("unverified"), so a lost or sparse page
//! of the table can never make good data look corrupt.
//!
//! # Crash consistency
//!
//! The guarantee: **a block is reported corrupt only if its contents differ from the
//! last contents dst gave it** (by a write, trim, zeroing, scrub or `--repair-table`),
//! after any crash, `kill -9` or power loss, provided the disk honours `fdatasync` and
//! `msync`. The price is coverage, not correctness: after an unclean shutdown, blocks of
//! the regions written shortly before it (since the checkpoint before last, about two
//! checkpoint intervals) whose data and checksum disagree are marked unverified and
//! served unchecked until they are rewritten whole, trimmed, zeroed or scrubbed.
//!
//! How: the data and its checksum become durable independently, so a region's dirty bit
//! is made durable (`msync` of page 0) *before* the first change to the region, and
//! cleared only after a checkpoint has made every earlier change to it durable
//! (`fdatasync` of the image, then `msync` of the entries). Regions stay dirty while they
//! are written, so hot regions cost nothing after the first write; a region is cleared
//! once it has been idle for a whole checkpoint interval. A client FLUSH stays a plain
//! `fdatasync`: checksums ride on the background checkpoint, never on the FLUSH path.
//! Epochs (in `tracker`) make sure a checkpoint only clears what its `fdatasync` covered.
//! On open, a table with dirty bits (or without the clean flag) is recovered: every block
//! of the dirty regions is checked and those that disagree become unverified; then data
//! and table are synced and the bits cleared. A clean shutdown checkpoints everything
//! and sets the clean flag.
//!
//! # Growth
//!
//! When the image grows (online, or while the server was stopped), the table grows with
//! it ([`Layout::grow_to`]): regions may get coarser, so the growth first checkpoints
//! with every reader and writer held off, leaving no dirty bit to carry over. New
//! entries read as zeros (unverified) until the new header is durable; then holes are
//! marked known zero, and the old short last block gets the checksum of its whole
//! contents. The order of the durable steps is in `durability`.

mod build;
mod durability;
mod error;
mod filter;
pub mod layout;
mod map;
mod stripes;
mod tracker;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

pub use build::{rebuild, BuildReport, ScrubReport};
pub use error::ChecksumError;
pub use filter::Checksums;
pub use layout::{Growth, Layout};

/// Bytes covered by one checksum.
pub const BLOCK_SIZE: u64 = 4096;
/// Entry: nothing is known about the block; it is served without verification.
pub const UNVERIFIED: u64 = 0;
/// Entry: the block is known to read as zeros (trimmed, zeroed, or never written).
pub const ZERO: u64 = 1;
/// Appended to the image's path to name its table.
pub const SUFFIX: &str = ".dst-sum";
/// Regions in the dirty bitmap, at most; one bit each, 1 KiB.
pub const MAX_REGIONS: u64 = 8192;
/// How often, by default, checksums are made durable and idle regions marked clean.
pub const DEFAULT_CHECKPOINT: Duration = Duration::from_secs(5);

/// Blocks read at once by recovery, scrub and rebuild.
const SCAN_BLOCKS: u64 = 1024;
/// Corrupt block numbers remembered for the summary.
const FIRST_CORRUPT: usize = 8;

/// The checksum of one block's contents; never a reserved value.
pub fn block_sum(data: &[u8]) -> u64 {
    let h = xxh3_64(data);
    if h <= ZERO {
        h + 2
    } else {
        h
    }
}

/// The entry that describes `data` best: [`ZERO`] for zeros, else its checksum.
fn entry_for(data: &[u8]) -> u64 {
    if is_zero(data) {
        ZERO
    } else {
        block_sum(data)
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed chunks vectorises; an early exit per byte would not.
    data.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// What an entry says about a block's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Zero,
    Unverified,
    Corrupt,
}

/// Checks one block's contents against its entry.
pub fn verify(entry: u64, data: &[u8]) -> Verdict {
    match entry {
        UNVERIFIED => Verdict::Unverified,
        ZERO if is_zero(data) => Verdict::Zero,
        ZERO => Verdict::Corrupt,
        sum if block_sum(data) == sum => Verdict::Ok,
        _ => Verdict::Corrupt,
    }
}

/// The default place of the table of the image at `image`: beside it, `IMAGE.dst-sum`.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(SUFFIX);
    PathBuf::from(s)
}

/// Where the table of the image at `image` lives: `table` when the
/// export names one (`:checksums=TABLE`), else beside the image. A block device has no
/// place beside it (that would be a file in `/dev`, a tmpfs lost at every boot), so it
/// must name one. A table that is the image itself, or not a regular file, is refused.
pub fn table_path(image: &Path, table: Option<&Path>) -> Result<PathBuf, ChecksumError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Some(table) = table else {
        let is_device = std::fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
        if is_device {
            return Err(ChecksumError::DeviceNeedsTable {
                device: image.to_path_buf(),
            });
        }
        return Ok(sidecar_path(image));
    };
    if let Ok(t) = std::fs::metadata(table) {
        let table = table.to_path_buf();
        if !t.file_type().is_file() {
            return Err(ChecksumError::NotAFile { table });
        }
        let same = std::fs::metadata(image).is_ok_and(|i| (i.dev(), i.ino()) == (t.dev(), t.ino()));
        if same {
            return Err(ChecksumError::IsTheImage { table });
        }
    }
    Ok(table.to_path_buf())
}

/// Blocks of `offset..offset+len` (`len` > 0): first and last.
fn block_range(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE)
}

/// Byte range of block `b` in an image of `size` bytes.
fn block_span(b: u64, size: u64) -> (u64, u64) {
    let start = b * BLOCK_SIZE;
    (start, (start + BLOCK_SIZE).min(size))
}

/// The blocks (at most two) that `offset..offset+len` covers only in part: changing them
/// needs the rest of the block from the image.
fn partial_blocks(offset: u64, len: u64, size: u64) -> Vec<u64> {
    let (first, last) = block_range(offset, len);
    let end = offset + len;
    let mut v = Vec::with_capacity(2);
    for b in [first, last] {
        let (s, e) = block_span(b, size);
        if (offset > s || end < e) && !v.contains(&b) {
            v.push(b);
        }
    }
    v
}

/// Counters of verification failures since the server started.
#[derive(Debug, Default, Clone)]
pub struct ChecksumStats {
    /// Blocks found not to match their checksum.
    pub corrupt_blocks: u64,
    /// Requests failed with EIO for it.
    pub failed_requests: u64,
    /// The first few block numbers found corrupt.
    pub first_corrupt: Vec<u64>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn checksums_never_take_reserved_values_and_verify() {
        let data = vec![7u8; 4096];
        let sum = block_sum(&data);
        assert!(sum > ZERO);
        assert_eq!(verify(sum, &data), Verdict::Ok);
        let mut bad = data.clone();
        bad[100] ^= 1;
        assert_eq!(verify(sum, &bad), Verdict::Corrupt);
        assert_eq!(verify(UNVERIFIED, &bad), Verdict::Unverified);
        assert_eq!(verify(ZERO, &[0; 4096]), Verdict::Zero);
        let mut almost = vec![0u8; 4096];
        almost[4095] = 1;
        assert_eq!(verify(ZERO, &almost), Verdict::Corrupt);
        assert_eq!(entry_for(&[0; 100]), ZERO);
        assert_eq!(entry_for(&almost), block_sum(&almost));
    }

    #[test]
    fn block_geometry() {
        assert_eq!(block_range(0, 4096), (0, 0));
        assert_eq!(block_range(4095, 2), (0, 1));
        assert_eq!(block_span(2, 10_000), (8192, 10_000));
        let size = 1 << 20;
        assert!(partial_blocks(0, 8192, size).is_empty());
        assert_eq!(partial_blocks(100, 8192, size), vec![0, 2]);
        assert_eq!(partial_blocks(4096, 10, size), vec![1]);
        assert_eq!(partial_blocks(4096 + 10, 10, size), vec![1]);
        // A short last block written whole is not partial.
        assert!(partial_blocks(8192, 10_000 - 8192, 10_000).is_empty());
        assert_eq!(partial_blocks(8192, 100, 10_000), vec![2]);
    }
}
