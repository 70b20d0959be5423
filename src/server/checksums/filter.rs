//! The checksum filter: opening a table over the backend below it, and the paths every
//! request takes through it. A read verifies every block it touches; a change (write,
//! trim, zeroing) makes its regions' dirty bits durable, lets the backend below change
//! the data, then stores the new checksums. All reads of the image, the filter's own
//! too, go through the backend below.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use super::build::{build, BuildReport};
use super::durability::checkpoint_loop;
use super::layout::{Layout, HEADER_LEN};
use super::map::Mapped;
use super::stripes::Stripes;
use super::tracker::Clear;
use super::{
    block_range, block_span, block_sum, eio, partial_blocks, verify, ChecksumError, ChecksumStats,
    Verdict, BLOCK_SIZE, FIRST_CORRUPT, UNVERIFIED, ZERO,
};
use crate::pool::Pool;
use crate::server::backend::Backend;

/// Bytes of buffers the filter keeps for its own reads (partial blocks, scans).
const OWN_POOL: usize = 16 << 20;

/// What the filter and its checkpoint thread share.
pub(super) struct Inner {
    pub(super) name: String,
    /// The table file's path.
    pub(super) path: PathBuf,
    pub(super) below: Box<dyn Backend>,
    /// Read-locked by every read, change, checkpoint and scan; write-locked to grow.
    pub(super) mapped: RwLock<Mapped>,
    stripes: Stripes,
    /// Entries changed since the last checkpoint's msync.
    pub(super) entries_changed: AtomicBool,
    stats: Mutex<ChecksumStats>,
    /// Whether the table was not closed cleanly (so recovery ran at open).
    pub(super) was_unclean: bool,
    /// The table file; holds its lock.
    pub(super) file: File,
    /// Buffers for the filter's own reads of the image.
    pub(super) pool: Pool,
}

/// An open checksum table over the backend that holds the image: a [`Backend`] itself.
pub struct Checksums {
    pub(super) inner: Arc<Inner>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    created: Option<BuildReport>,
    recovered: u64,
}

impl std::fmt::Debug for Checksums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checksums")
            .field("path", &self.inner.path)
            .field("layout", &self.layout())
            .finish()
    }
}

impl Checksums {
    /// Opens the table at `table` (see [`super::table_path`]) of the image in `below`
    /// (creating it if missing), locks it against other servers and scrubs, recovers it
    /// after an unclean shutdown, and grows it if the image grew meanwhile. With
    /// `checkpoint`, a background thread makes checksums durable at that interval.
    pub fn open(
        name: &str,
        below: Box<dyn Backend>,
        table: &Path,
        checkpoint: Option<Duration>,
    ) -> Result<Checksums, ChecksumError> {
        let path = table.to_path_buf();
        let ctx = ChecksumError::io(table);
        let size = below.disk_size().map_err(&ctx)?;
        let created = if path.exists() {
            None
        } else {
            let r = build(&*below, size, &path, false, &mut |_| {}).map_err(&ctx)?;
            log::info!(
                "export '{name}': created checksum table {} ({} blocks of 4 KiB)",
                path.display(),
                r.blocks
            );
            Some(r)
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(&ctx)?;
        lock(&file, table)?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0).map_err(&ctx)?;
        let layout = Layout::decode(&header).map_err(|why| ChecksumError::Damaged {
            table: path.clone(),
            why,
        })?;
        let id = below.identity().map_err(&ctx)?;
        if layout.image_id != 0 && id != 0 && layout.image_id != id {
            return Err(ChecksumError::OtherImage { table: path });
        }
        if layout.image_size > size {
            return Err(ChecksumError::Shrunk {
                table: path,
                described: layout.image_size,
                found: size,
            });
        }
        let len = file.metadata().map_err(&ctx)?.len();
        if len < layout.file_len() {
            return Err(ChecksumError::Truncated {
                table: path,
                len,
                want: layout.file_len(),
            });
        }
        let mapped = Mapped::new(&file, layout).map_err(&ctx)?;
        let bits = &mapped.tracker.bits;
        let was_unclean = !bits.is_clean() || (0..layout.regions()).any(|r| bits.is_set(r));
        let inner = Inner {
            name: name.into(),
            path: path.clone(),
            below,
            mapped: RwLock::new(mapped),
            stripes: Stripes::new(),
            entries_changed: AtomicBool::new(false),
            stats: Mutex::new(ChecksumStats::default()),
            was_unclean,
            file,
            pool: Pool::new(OWN_POOL),
        };
        let recovered = if was_unclean {
            inner.recover().map_err(&ctx)?
        } else {
            0
        };
        if size > layout.image_size {
            log::info!(
                "export '{name}': the image grew from {} to {size} bytes while the server was \
                 stopped; growing its checksum table",
                layout.image_size
            );
            inner.grow(size).map_err(&ctx)?;
        }
        let layout = inner.state().layout;
        let inner = Arc::new(inner);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let checkpointer = match checkpoint {
            Some(every) => Some(
                std::thread::Builder::new()
                    .name(format!("dst-sum-{name}"))
                    .spawn({
                        let (weak, stop) = (Arc::downgrade(&inner), stop.clone());
                        move || checkpoint_loop(weak, stop, every)
                    })
                    .map_err(&ctx)?,
            ),
            None => None,
        };
        log::info!(
            "export '{name}': checksums on: table {}, {} blocks of 4 KiB, dirty regions of {} MiB",
            path.display(),
            layout.blocks,
            layout.region_bytes() >> 20
        );
        Ok(Checksums {
            inner,
            stop,
            checkpointer,
            created,
            recovered,
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn layout(&self) -> Layout {
        self.inner.state().layout
    }

    /// What building the table found, when `open` created it.
    pub fn created(&self) -> Option<&BuildReport> {
        self.created.as_ref()
    }

    /// Blocks that recovery marked unverified when the table was opened.
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    pub fn stats(&self) -> ChecksumStats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Checksums {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
    }
}

impl Backend for Checksums {
    fn disk_size(&self) -> io::Result<u64> {
        self.inner.below.disk_size()
    }

    fn read(&self, offset: u64, len: usize, pool: &Pool) -> io::Result<Vec<u8>> {
        self.inner.read(offset, len, pool)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let below = &self.inner.below;
        self.inner
            .change(offset, data.len() as u64, Some(data), || {
                below.write(offset, data, fua).map(|()| true)
            })
            .map(drop)
    }

    fn flush(&self) -> io::Result<()> {
        // Checksums are made durable by their own checkpoints, not here.
        self.inner.below.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<bool> {
        let below = &self.inner.below;
        self.inner
            .change(offset, len, None, || below.trim(offset, len, fua))
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let below = &self.inner.below;
        self.inner
            .change(offset, len, None, || {
                below.zero(offset, len, fua).map(|()| true)
            })
            .map(drop)
    }

    fn extents(&self, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        self.inner.below.extents(from, to)
    }

    fn identity(&self) -> io::Result<u64> {
        self.inner.below.identity()
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        self.inner.below.grow(size)?;
        self.inner.grow(size).map(drop)
    }

    /// Makes every finished change durable, data and checksums, and marks the table
    /// clean if nothing is being changed.
    fn close(&self) -> io::Result<()> {
        let t = &*self.inner;
        let clean = t.checkpoint(Clear::All)?;
        let s = self.stats();
        if s.corrupt_blocks > 0 {
            log::warn!(
                "export '{}': {} blocks failed checksum verification since the server started \
                 ({} requests failed with EIO; first blocks: {:?}); a scrub checks the whole image",
                t.name,
                s.corrupt_blocks,
                s.failed_requests,
                s.first_corrupt
            );
        } else {
            log::info!(
                "export '{}': no checksum mismatches since the server started",
                t.name
            );
        }
        if clean {
            log::info!("export '{}': checksum table closed cleanly", t.name);
        }
        Ok(())
    }

    fn corrupt_blocks(&self) -> Option<u64> {
        Some(self.stats().corrupt_blocks)
    }
}

/// Takes the table's exclusive lock without waiting.
fn lock(file: &File, table: &Path) -> Result<(), ChecksumError> {
    file.try_lock().map_err(|e| match e {
        TryLockError::WouldBlock => ChecksumError::InUse {
            table: table.to_path_buf(),
        },
        TryLockError::Error(e) => ChecksumError::io(table)(e),
    })
}

/// Opens the table at `table` for replacing it, holding its lock so no server is using
/// it meanwhile; `None` if there is none.
pub(super) fn lock_for_rebuild(table: &Path) -> Result<Option<File>, ChecksumError> {
    match OpenOptions::new().read(true).write(true).open(table) {
        Ok(f) => lock(&f, table).map(|()| Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ChecksumError::io(table)(e)),
    }
}

impl Inner {
    pub(super) fn state(&self) -> RwLockReadGuard<'_, Mapped> {
        self.mapped.read().unwrap_or_else(|e| e.into_inner())
    }

    fn report_corrupt(&self, block: u64, size: u64, during: &str) {
        let (s, e) = block_span(block, size);
        log::error!(
            "export '{}': block {block} (bytes {s}..{e} of the image) does not match its checksum \
             ({during} failed with EIO): the data was changed outside dst or the disk returned bad \
             data. Rewrite or restore the block; a scrub checks the whole image",
            self.name
        );
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.corrupt_blocks += 1;
        if st.first_corrupt.len() < FIRST_CORRUPT {
            st.first_corrupt.push(block);
        }
    }

    fn failed_request(&self) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed_requests += 1;
    }

    /// Reads `len` bytes at `offset` into a buffer from `pool`, verifying every block
    /// they touch; a mismatch fails the whole read with EIO.
    fn read(&self, offset: u64, len: usize, pool: &Pool) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, last) = block_range(offset, len as u64);
        let m = self.state();
        let size = m.layout.image_size;
        let _locks = self.stripes.read(first, last);
        let start = first * BLOCK_SIZE;
        let end = block_span(last, size).1;
        let buf = self.below.read(start, (end - start) as usize, pool)?;
        let mut bad = false;
        for b in first..=last {
            let (s, e) = block_span(b, size);
            let data = &buf[(s - start) as usize..(e - start) as usize];
            if verify(m.entry(b), data) == Verdict::Corrupt {
                self.report_corrupt(b, size, "read");
                bad = true;
            }
        }
        if bad {
            pool.put(buf);
            self.failed_request();
            return Err(eio());
        }
        if start == offset && buf.len() == len {
            Ok(buf)
        } else {
            let at = (offset - start) as usize;
            let out = pool.copy_of(&buf[at..at + len]);
            pool.put(buf);
            Ok(out)
        }
    }

    /// Changes `len` bytes at `offset` with `op`: to `data`, or to zeros when `None`.
    /// `op` returns whether it changed anything, and so does this.
    fn change(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        op: impl FnOnce() -> io::Result<bool>,
    ) -> io::Result<bool> {
        if len == 0 {
            return op();
        }
        let m = self.state();
        let size = m.layout.image_size;
        let (first, last) = block_range(offset, len);
        let _locks = self.stripes.write(first, last);
        // Blocks changed in part get their new checksum from the old contents merged
        // with the change. The old contents are verified first, so a write never
        // launders corruption into a fresh checksum.
        let mut edges: Vec<(u64, u64)> = Vec::new();
        for b in partial_blocks(offset, len, size) {
            let (s, e) = block_span(b, size);
            let mut block = self.below.read(s, (e - s) as usize, &self.pool)?;
            let new = match verify(m.entry(b), &block) {
                Verdict::Corrupt => {
                    self.pool.put(block);
                    self.report_corrupt(b, size, "partial-block change");
                    self.failed_request();
                    return Err(eio());
                }
                // Half-known contents stay unknown.
                Verdict::Unverified => UNVERIFIED,
                Verdict::Ok | Verdict::Zero => {
                    let (from, to) = (offset.max(s), (offset + len).min(e));
                    let dst = &mut block[(from - s) as usize..(to - s) as usize];
                    match data {
                        Some(d) => dst
                            .copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize]),
                        None => dst.fill(0),
                    }
                    block_sum(&block)
                }
            };
            self.pool.put(block);
            edges.push((b, new));
        }
        let (r0, r1) = (m.layout.region_of(first), m.layout.region_of(last));
        let _change = m.tracker.begin(r0, r1)?;
        let result = op();
        self.entries_changed.store(true, Ordering::Release);
        match result {
            // Some of it may have happened: claim nothing about any of it.
            Err(e) => {
                for b in first..=last {
                    m.set_entry(b, UNVERIFIED);
                }
                Err(e)
            }
            Ok(false) => Ok(false),
            Ok(true) => {
                for b in first..=last {
                    let value = match (edges.iter().find(|(eb, _)| *eb == b), data) {
                        (Some(&(_, v)), _) => v,
                        (None, Some(d)) => {
                            let (s, e) = block_span(b, size);
                            block_sum(&d[(s - offset) as usize..(e - offset) as usize])
                        }
                        (None, None) => ZERO,
                    };
                    m.set_entry(b, value);
                }
                Ok(true)
            }
        }
    }

    /// Calls `each(block, contents)` for `n` blocks from `first`, of an image of `size`
    /// bytes.
    pub(super) fn scan(
        &self,
        size: u64,
        first: u64,
        n: u64,
        mut each: impl FnMut(u64, &[u8]),
    ) -> io::Result<()> {
        let start = first * BLOCK_SIZE;
        let end = block_span(first + n - 1, size).1;
        let buf = self.below.read(start, (end - start) as usize, &self.pool)?;
        for b in first..first + n {
            let (s, e) = block_span(b, size);
            each(b, &buf[(s - start) as usize..(e - start) as usize]);
        }
        self.pool.put(buf);
        Ok(())
    }
}
