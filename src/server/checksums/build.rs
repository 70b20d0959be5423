//! Whole-image work on a checksum table: building a new one (cheaply for a new table,
//! from the data for `--repair-table`), finding an image's holes, and the scrub that
//! verifies every block. The image is read through the backend below the filter.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::filter::{lock_for_rebuild, Checksums};
use super::layout::{Layout, CLEAN_AT};
use super::map::Mapped;
use super::{
    block_span, entry_for, verify, ChecksumError, Verdict, BLOCK_SIZE, FIRST_CORRUPT, SCAN_BLOCKS,
    ZERO,
};
use crate::pool::Pool;
use crate::server::backend::Backend;

/// Summary of a scrub.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub blocks: u64,
    /// Blocks that matched their checksum.
    pub ok: u64,
    /// Blocks known to be zero that read as zeros.
    pub zero: u64,
    /// Blocks that had no usable checksum; the scrub recorded their current contents.
    pub unverified: u64,
    pub corrupt: u64,
    pub first_corrupt: Vec<u64>,
    /// Whether the table had not been closed cleanly (so it was recovered first).
    pub was_unclean: bool,
}

/// Summary of building a table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildReport {
    pub blocks: u64,
    pub zero: u64,
    /// Blocks left unverified (a fresh table over data written before).
    pub unverified: u64,
}

impl Checksums {
    /// Verifies every block of the image. Blocks without a usable checksum (unverified)
    /// get one from their current contents; corrupt blocks are left as they are, so
    /// reads keep failing until the block is rewritten or the table repaired.
    /// `progress` is told the bytes done so far.
    pub fn scrub(&self, progress: &mut dyn FnMut(u64)) -> io::Result<ScrubReport> {
        let t = &*self.inner;
        // Adopted checksums must describe durable data, not a crashed writer's page cache.
        t.below.flush()?;
        let m = t.state();
        let layout = m.layout;
        let mut r = ScrubReport {
            blocks: layout.blocks,
            was_unclean: t.was_unclean,
            ..Default::default()
        };
        let mut b = 0;
        while b < layout.blocks {
            let n = SCAN_BLOCKS.min(layout.blocks - b);
            t.scan(layout.image_size, b, n, |block, data| {
                match verify(m.entry(block), data) {
                    Verdict::Ok => r.ok += 1,
                    Verdict::Zero => r.zero += 1,
                    Verdict::Unverified => {
                        r.unverified += 1;
                        m.set_entry(block, entry_for(data));
                    }
                    Verdict::Corrupt => {
                        r.corrupt += 1;
                        if r.first_corrupt.len() < FIRST_CORRUPT {
                            r.first_corrupt.push(block);
                        }
                    }
                }
            })?;
            b += n;
            progress((b * BLOCK_SIZE).min(layout.image_size));
        }
        m.flush()?;
        Ok(r)
    }
}

/// Calls `zero(b)` for every block of `blocks` that lies wholly in a hole of the image
/// of `size` bytes in `image`; returns how many.
pub(super) fn mark_holes(
    image: &dyn Backend,
    size: u64,
    blocks: std::ops::Range<u64>,
    mut zero: impl FnMut(u64),
) -> u64 {
    let from = blocks.start * BLOCK_SIZE;
    let data = image
        .extents(from, size)
        .unwrap_or_else(|| vec![(from, size)]);
    // Blocks before `next` are decided; those wholly inside a hole are zero.
    let (mut next, mut marked) = (blocks.start, 0);
    let mut zero_until = |to: u64, next: &mut u64| {
        for b in *next..to {
            zero(b);
            marked += 1;
        }
        *next = (*next).max(to);
    };
    for (s, e) in data {
        zero_until(s / BLOCK_SIZE, &mut next);
        next = next.max(e.div_ceil(BLOCK_SIZE));
    }
    zero_until(blocks.end, &mut next);
    marked
}

/// Builds the table of the image of `size` bytes in `image` at `path`, atomically (a
/// temporary file renamed into place). With `from_data`, every block gets the checksum of
/// its current contents; without, holes are known zero and the rest unverified (cheap,
/// for a new table).
pub(super) fn build(
    image: &dyn Backend,
    size: u64,
    path: &Path,
    from_data: bool,
    progress: &mut dyn FnMut(u64),
) -> io::Result<BuildReport> {
    // What we record must be what is on disk, not a crashed writer's page cache.
    image.flush()?;
    let layout = Layout {
        image_id: image.identity()?,
        ..Layout::for_image(size)
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // Checksums tell something about the contents (they confirm a guessed block): readable
    // by the server's user only, like the images it creates.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let result = (|| {
        file.set_len(layout.file_len())?;
        file.write_all_at(&layout.encode(), 0)?;
        file.write_all_at(&1u32.to_le_bytes(), CLEAN_AT as u64)?;
        let table = Mapped::new(&file, layout)?;
        let mut r = BuildReport {
            blocks: layout.blocks,
            ..Default::default()
        };
        if from_data {
            let pool = Pool::new((SCAN_BLOCKS * BLOCK_SIZE) as usize);
            let mut b = 0;
            while b < layout.blocks {
                let n = SCAN_BLOCKS.min(layout.blocks - b);
                let start = b * BLOCK_SIZE;
                let end = block_span(b + n - 1, size).1;
                let buf = image.read(start, (end - start) as usize, &pool)?;
                for i in 0..n {
                    let (s, e) = block_span(b + i, size);
                    let v = entry_for(&buf[(s - start) as usize..(e - start) as usize]);
                    r.zero += (v == ZERO) as u64;
                    table.set_entry(b + i, v);
                }
                pool.put(buf);
                b += n;
                progress(end);
            }
        } else {
            r.zero = mark_holes(image, size, 0..layout.blocks, |b| table.set_entry(b, ZERO));
            r.unverified = layout.blocks - r.zero;
        }
        table.flush()?;
        file.sync_all()?;
        Ok(r)
    })();
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    Ok(r)
}

/// `--repair-table`: replaces the table at `table` (see [`super::table_path`]) of the
/// image in `image` with one built from the image's current contents, for an image
/// known to be good. Refuses while a server or scrub holds the table.
pub fn rebuild(
    image: &dyn Backend,
    table: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<BuildReport, ChecksumError> {
    let ctx = ChecksumError::io(table);
    let size = image.disk_size().map_err(&ctx)?;
    // Hold the old table's lock while replacing it, so no server is using it.
    let _old = lock_for_rebuild(table)?;
    build(image, size, table, true, progress).map_err(ctx)
}
