//! Integrity at rest: a per-block xxh3 checksum table beside an export, verified on every
//! read and kept up to date by every write, trim and zeroing; its crash consistency
//! against the data; recovery after an unclean shutdown; scrub and rebuild.
//!
//! This module owns the table (the sidecar `PATH.dst-sum`, or the file an export names
//! with `:checksums=TABLE`, which a block device must) and everything about it. The export
//! ([`super::export`]) does the I/O on the image and hands each change here as a closure,
//! so the order "dirty bit durable, then data, then checksum" is kept in one place.
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
//! Epochs ([`Tracker`]) make sure a checkpoint only clears what its `fdatasync` covered.
//! On open, a table with dirty bits (or without the clean flag) is recovered: every block
//! of the dirty regions is checked and those that disagree become unverified; then data
//! and table are synced and the bits cleared. A clean shutdown checkpoints everything
//! and sets the clean flag.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use memmap2::MmapRaw;
use xxhash_rust::xxh3::xxh3_64;

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

const PAGE: u64 = 4096;
const MAGIC: [u8; 8] = *b"DSTSUM\0\0";
const VERSION: u32 = 1;
/// The header fields that never change; their checksum follows.
const HEADER_FIELDS: usize = 56;
const CLEAN_AT: usize = 64;
const BITMAP_AT: usize = 1024;
const ENTRIES_AT: u64 = PAGE;
/// Regions are at least 16 MiB, so a sequential writer marks one every 16 MiB at most.
const MIN_REGION_BLOCKS: u64 = 4096;
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

/// Where the table of export `name` (the image at `image`) lives: `table` when the
/// export names one (`:checksums=TABLE`), else beside the image. A block device has no
/// place beside it (that would be a file in `/dev`, a tmpfs lost at every boot), so it
/// must name one. A table that is the image itself, or not a regular file, is refused.
pub fn table_path(name: &str, image: &Path, table: Option<&Path>) -> Result<PathBuf, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Some(table) = table else {
        let is_device = std::fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
        if is_device {
            return Err(format!(
                "export '{name}': {} is a block device, so its checksum table cannot be kept \
                 beside it ({} would be in /dev, which is emptied at every boot); give the \
                 table a place on a file system with :checksums=TABLE, e.g. \
                 --export {name}={}:checksums=/var/lib/dst/{name}{SUFFIX}",
                image.display(),
                sidecar_path(image).display(),
                image.display()
            ));
        }
        return Ok(sidecar_path(image));
    };
    if let Ok(t) = std::fs::metadata(table) {
        if !t.file_type().is_file() {
            return Err(format!(
                "export '{name}': checksum table {} is not a regular file; name a file for \
                 the table, e.g. :checksums=/var/lib/dst/{name}{SUFFIX}",
                table.display()
            ));
        }
        let same = std::fs::metadata(image).is_ok_and(|i| (i.dev(), i.ino()) == (t.dev(), t.ino()));
        if same {
            return Err(format!(
                "export '{name}': the checksum table {} is the image itself; name another file \
                 for the table",
                table.display()
            ));
        }
    }
    Ok(table.to_path_buf())
}

/// The `--export` argument that names this image and table, for the commands that
/// messages suggest.
pub fn export_arg(name: &str, image: &Path, table: &Path) -> String {
    if table == sidecar_path(image) {
        format!("{name}={}", image.display())
    } else {
        format!("{name}={}:checksums={}", image.display(), table.display())
    }
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

/// Where things are in a table, from the image size; pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub image_size: u64,
    pub blocks: u64,
    pub region_shift: u32,
    /// Identifies the image file (see `image_id`), so a table is never applied to a
    /// replaced image; 0 when unknown (block devices, whose nodes are made at boot).
    pub image_id: u64,
}

impl Layout {
    pub fn for_image(image_size: u64) -> Layout {
        let blocks = image_size.div_ceil(BLOCK_SIZE);
        let per_region = blocks
            .div_ceil(MAX_REGIONS)
            .max(MIN_REGION_BLOCKS)
            .next_power_of_two();
        Layout {
            image_size,
            blocks,
            region_shift: per_region.trailing_zeros(),
            image_id: 0,
        }
    }

    pub fn regions(&self) -> u64 {
        self.blocks.div_ceil(1 << self.region_shift).max(1)
    }

    pub fn region_bytes(&self) -> u64 {
        BLOCK_SIZE << self.region_shift
    }

    fn region_of(&self, block: u64) -> u64 {
        block >> self.region_shift
    }

    /// What growing the image to `size` bytes takes, or `None` if it is not larger. The
    /// regions may become coarser (so they stay at most [`MAX_REGIONS`]), never finer; the
    /// dirty bits are not carried over, so a table grows only with all of them clear.
    pub fn grow_to(&self, size: u64) -> Option<Growth> {
        if size <= self.image_size {
            return None;
        }
        let fresh = Layout::for_image(size);
        let layout = Layout {
            region_shift: fresh.region_shift.max(self.region_shift),
            image_id: self.image_id,
            ..fresh
        };
        Some(Growth {
            layout,
            short_tail: (!self.image_size.is_multiple_of(BLOCK_SIZE)).then(|| self.blocks - 1),
            new_blocks: self.blocks..layout.blocks,
        })
    }

    #[cfg(test)]
    fn with_id(self, image_id: u64) -> Layout {
        Layout { image_id, ..self }
    }

    /// Length of the table file.
    pub fn file_len(&self) -> u64 {
        (ENTRIES_AT + self.blocks * 8).next_multiple_of(PAGE)
    }

    pub fn encode(&self) -> [u8; HEADER_FIELDS + 8] {
        let mut h = [0u8; HEADER_FIELDS + 8];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.blocks.to_le_bytes());
        h[32..36].copy_from_slice(&self.region_shift.to_le_bytes());
        h[40..48].copy_from_slice(&ENTRIES_AT.to_le_bytes());
        h[48..56].copy_from_slice(&self.image_id.to_le_bytes());
        let sum = xxh3_64(&h[..HEADER_FIELDS]);
        h[HEADER_FIELDS..].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Reads a header; the error says what is wrong with it.
    pub fn decode(h: &[u8]) -> Result<Layout, String> {
        if h.len() < HEADER_FIELDS + 8 || h[0..8] != MAGIC {
            return Err("it is not a dst checksum table (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        if u64_at(HEADER_FIELDS) != xxh3_64(&h[..HEADER_FIELDS]) {
            return Err("its header is damaged (checksum mismatch)".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "it has format version {}; this dst-server reads version {VERSION}",
                u32_at(8)
            ));
        }
        let layout = Layout {
            image_size: u64_at(16),
            blocks: u64_at(24),
            region_shift: u32_at(32),
            image_id: u64_at(48),
        };
        if u32_at(12) as u64 != BLOCK_SIZE
            || u64_at(40) != ENTRIES_AT
            || layout.blocks != layout.image_size.div_ceil(BLOCK_SIZE)
            || layout.region_shift > 40
            || layout.regions() > MAX_REGIONS
        {
            return Err("its header has impossible values".into());
        }
        Ok(layout)
    }
}

/// What growing a table takes (see [`Layout::grow_to`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    pub layout: Layout,
    /// The old last block, when it was short: its entry describes fewer bytes than the
    /// block holds now.
    pub short_tail: Option<u64>,
    /// Blocks that did not exist before; their entries start as zeros, [`UNVERIFIED`].
    pub new_blocks: std::ops::Range<u64>,
}

// ---------------------------------------------------------------------------------------
// The crash-consistency state machine.

/// The persistent dirty-region bitmap and clean flag, as the [`Tracker`] sees them.
pub(crate) trait RegionBits: Send + Sync {
    /// Sets a region's bit in memory, and clears the clean flag with it.
    fn set(&self, region: u64);
    fn clear(&self, region: u64);
    fn mark_clean(&self);
    /// Makes the bits and the flag durable, as they are in memory now.
    fn persist(&self) -> io::Result<()>;
}

/// Which dirty regions a checkpoint may clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clear {
    /// Those not written since the previous checkpoint: hot regions stay dirty, so they
    /// cost no bitmap sync on their next write.
    Idle,
    /// All whose changes this checkpoint made durable (at shutdown).
    All,
}

/// Keeps the rule: a region's bit is durable before any change to the region starts,
/// and is cleared only after a checkpoint made all changes to it durable.
///
/// Changes run in epochs. A change holds the epoch (a read lock) from before its first
/// bit check until its checksums are stored. A checkpoint takes the lock for writing
/// just long enough to start a new epoch, which waits for the changes of the old one to
/// finish; its `fdatasync` and `msync` then cover all of them, and it clears only regions
/// whose last change (their stamp) is from an old epoch.
pub(crate) struct Tracker<B> {
    bits: B,
    epoch: RwLock<u64>,
    /// Per region: the epoch of the last change that found its bit durable.
    stamps: Vec<AtomicU64>,
    state: Mutex<TrackState>,
    persisted: Condvar,
    checkpointing: Mutex<()>,
}

struct TrackState {
    /// Bits set so far, counted; a bit set as number n is durable once `durable >= n`.
    set_seq: u64,
    durable: u64,
    persisting: bool,
    /// Per region: the number its bit was set as, 0 while clear.
    bit_seq: Vec<u64>,
    /// The epoch the previous checkpoint closed.
    last_checkpoint: u64,
}

/// Held by a change: its epoch cannot end, nor its regions be cleared, until dropped.
pub(crate) struct Change<'a> {
    _epoch: RwLockReadGuard<'a, u64>,
}

impl<B: RegionBits> Tracker<B> {
    /// A tracker for `regions` regions whose bits are all clear.
    pub(crate) fn new(bits: B, regions: u64) -> Self {
        Tracker {
            bits,
            epoch: RwLock::new(1),
            stamps: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            state: Mutex::new(TrackState {
                set_seq: 0,
                durable: 0,
                persisting: false,
                bit_seq: vec![0; regions as usize],
                last_checkpoint: 0,
            }),
            persisted: Condvar::new(),
            checkpointing: Mutex::new(()),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a change to regions `first..=last`; returns once their bits are durable.
    pub(crate) fn begin(&self, first: u64, last: u64) -> io::Result<Change<'_>> {
        let guard = self.epoch.read().unwrap_or_else(|e| e.into_inner());
        let e = *guard;
        // Fast path: marked in this epoch already, so durable and not clearable now.
        let stale: Vec<u64> = (first..=last)
            .filter(|&r| self.stamps[r as usize].load(Ordering::Acquire) != e)
            .collect();
        if !stale.is_empty() {
            self.mark(&stale, e)?;
        }
        Ok(Change { _epoch: guard })
    }

    fn mark(&self, regions: &[u64], e: u64) -> io::Result<()> {
        let mut st = self.lock_state();
        loop {
            let mut need = 0;
            for &r in regions {
                if st.bit_seq[r as usize] == 0 {
                    self.bits.set(r);
                    st.set_seq += 1;
                    st.bit_seq[r as usize] = st.set_seq;
                }
                need = need.max(st.bit_seq[r as usize]);
            }
            if need <= st.durable {
                for &r in regions {
                    self.stamps[r as usize].store(e, Ordering::Release);
                }
                return Ok(());
            }
            if st.persisting {
                // Group commit: another change's persist may cover our bits too.
                st = self.persisted.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.persisting = true;
            let target = st.set_seq;
            drop(st);
            let result = self.bits.persist();
            st = self.lock_state();
            st.persisting = false;
            if result.is_ok() {
                st.durable = st.durable.max(target);
            }
            self.persisted.notify_all();
            result?;
            // A checkpoint may have cleared one of our bits meanwhile: check again.
        }
    }

    /// Starts a new epoch, runs `make_durable` (which must make every change finished so
    /// far durable: data and checksums), then clears the regions `mode` allows. Returns
    /// whether no region is dirty any more. With [`Clear::All`], the cleared bits and
    /// the clean flag are made durable too.
    pub(crate) fn checkpoint(
        &self,
        mode: Clear,
        make_durable: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<bool> {
        let _one = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let old = {
            let mut e = self.epoch.write().unwrap_or_else(|e| e.into_inner());
            *e += 1;
            *e - 1
        };
        make_durable()?;
        let clean = {
            let mut st = self.lock_state();
            let limit = match mode {
                Clear::All => old,
                Clear::Idle => st.last_checkpoint,
            };
            st.last_checkpoint = old;
            let durable = st.durable;
            let mut dirty = 0;
            for (r, seq) in st.bit_seq.iter_mut().enumerate() {
                if *seq == 0 {
                    continue;
                }
                if *seq <= durable && self.stamps[r].load(Ordering::Acquire) <= limit {
                    self.bits.clear(r as u64);
                    *seq = 0;
                } else {
                    dirty += 1;
                }
            }
            if dirty == 0 {
                self.bits.mark_clean();
            }
            dirty == 0
        };
        // Cleared bits reach the disk lazily, with the next persist or writeback: a bit
        // that stays set on disk too long only widens a recovery.
        if mode == Clear::All {
            self.bits.persist()?;
        }
        Ok(clean)
    }

    /// Whether any region is dirty.
    pub(crate) fn any_dirty(&self) -> bool {
        self.lock_state().bit_seq.iter().any(|&s| s != 0)
    }
}

// ---------------------------------------------------------------------------------------
// Locks on block ranges, so a read never sees new data with an old checksum.

const STRIPES: u64 = 1024;
/// Blocks per lock unit (64 KiB): few locks for a large request.
const STRIPE_SHIFT: u32 = 4;

struct Stripes(Box<[RwLock<()>]>);

impl Stripes {
    fn new() -> Self {
        Stripes((0..STRIPES).map(|_| RwLock::new(())).collect())
    }

    /// The locks of blocks `first..=last`, in the one order every caller takes them.
    fn indices(first: u64, last: u64) -> Vec<usize> {
        let (a, b) = (first >> STRIPE_SHIFT, last >> STRIPE_SHIFT);
        if b - a + 1 >= STRIPES {
            return (0..STRIPES as usize).collect();
        }
        let mut v: Vec<usize> = (a..=b).map(|u| (u % STRIPES) as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn read(&self, first: u64, last: u64) -> Vec<std::sync::RwLockReadGuard<'_, ()>> {
        Self::indices(first, last)
            .into_iter()
            .map(|i| self.0[i].read().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    fn write(&self, first: u64, last: u64) -> Vec<std::sync::RwLockWriteGuard<'_, ()>> {
        Self::indices(first, last)
            .into_iter()
            .map(|i| self.0[i].write().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The table file.

/// Page 0 of the mapped table: the bitmap and the clean flag.
struct HeaderBits(Arc<MmapRaw>);

impl HeaderBits {
    fn word(&self, region: u64) -> &AtomicU64 {
        atomic_u64(&self.0, BITMAP_AT + (region / 64) as usize * 8)
    }

    fn is_set(&self, region: u64) -> bool {
        self.word(region).load(Ordering::Acquire) & (1u64 << (region % 64)).to_le() != 0
    }

    fn clean_flag(&self) -> &AtomicU32 {
        // SAFETY: in bounds of page 0 and 4-aligned; the map outlives the reference.
        unsafe { &*(self.0.as_mut_ptr().add(CLEAN_AT) as *const AtomicU32) }
    }

    fn is_clean(&self) -> bool {
        u32::from_le(self.clean_flag().load(Ordering::Acquire)) == 1
    }
}

impl RegionBits for HeaderBits {
    fn set(&self, region: u64) {
        self.clean_flag().store(0, Ordering::Release);
        self.word(region)
            .fetch_or((1u64 << (region % 64)).to_le(), Ordering::AcqRel);
    }
    fn clear(&self, region: u64) {
        self.word(region)
            .fetch_and(!(1u64 << (region % 64)).to_le(), Ordering::AcqRel);
    }
    fn mark_clean(&self) {
        self.clean_flag().store(1u32.to_le(), Ordering::Release);
    }
    fn persist(&self) -> io::Result<()> {
        self.0.flush_range(0, PAGE as usize)
    }
}

/// An `AtomicU64` view of 8 aligned bytes of the map.
fn atomic_u64(map: &MmapRaw, at: usize) -> &AtomicU64 {
    assert!(
        at.is_multiple_of(8) && at + 8 <= map.len(),
        "table offset {at} out of bounds"
    );
    // SAFETY: in bounds and aligned (the map is page-aligned); shared memory is only ever
    // accessed through atomics; the file is never shortened while mapped (we hold its lock).
    unsafe { &*(map.as_mut_ptr().add(at) as *const AtomicU64) }
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

/// The table as mapped for one layout; replaced whole when the table grows.
struct Mapped {
    layout: Layout,
    map: Arc<MmapRaw>,
    tracker: Tracker<HeaderBits>,
}

impl Mapped {
    /// Maps `file`, a table of `layout`, whose dirty bits are all clear.
    fn new(file: &File, layout: Layout) -> io::Result<Mapped> {
        let map = Arc::new(
            memmap2::MmapOptions::new()
                .len(layout.file_len() as usize)
                .map_raw(file)?,
        );
        Ok(Mapped {
            layout,
            tracker: Tracker::new(HeaderBits(map.clone()), layout.regions()),
            map,
        })
    }

    fn entry(&self, block: u64) -> u64 {
        u64::from_le(
            atomic_u64(&self.map, ENTRIES_AT as usize + block as usize * 8).load(Ordering::Relaxed),
        )
    }

    fn set_entry(&self, block: u64, value: u64) {
        atomic_u64(&self.map, ENTRIES_AT as usize + block as usize * 8)
            .store(value.to_le(), Ordering::Relaxed);
    }
}

struct Inner {
    name: String,
    path: PathBuf,
    image: File,
    /// Read-locked by every read, change, checkpoint and scan; write-locked to grow.
    mapped: RwLock<Mapped>,
    stripes: Stripes,
    /// Entries changed since the last checkpoint's msync.
    entries_changed: AtomicBool,
    stats: Mutex<ChecksumStats>,
    /// Whether the table was not closed cleanly, and the blocks recovery then marked
    /// unverified.
    was_unclean: bool,
    recovered: u64,
    /// The table file; holds its flock.
    file: File,
}

/// An open checksum table, with the image it describes.
pub struct ChecksumTable {
    inner: Arc<Inner>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ChecksumTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChecksumTable")
            .field("path", &self.inner.path)
            .field("layout", &self.inner.state().layout)
            .finish()
    }
}

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

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// What identifies an image file: a hash of its inode number, the inode's generation
/// and its birth time, since file systems reuse a deleted file's inode number at once
/// (the generation, where the file system has one, changes then); 0 for a block device.
fn image_id(image: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = image.metadata()?;
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
    unsafe { libc::ioctl(image.as_raw_fd(), libc::FS_IOC_GETVERSION, &mut generation) };
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&meta.ino().to_le_bytes());
    bytes[8..16].copy_from_slice(&(generation as u64).to_le_bytes());
    bytes[16..].copy_from_slice(&born.to_le_bytes());
    Ok(xxh3_64(&bytes).max(1))
}

/// The size of an image file or block device.
pub fn image_size(image: &File) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own.
    let end = unsafe { libc::lseek(image.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

impl ChecksumTable {
    /// Opens the table at `table_path` (see [`table_path`]) of the image at `image_path`
    /// (creating it if missing), locks it against other servers and scrubs, and recovers it
    /// after an unclean shutdown. With `checkpoint`, a background thread makes checksums
    /// durable at that interval.
    pub fn open(
        name: &str,
        image_path: &Path,
        table_path: &Path,
        image: File,
        checkpoint: Option<Duration>,
    ) -> Result<ChecksumTable, String> {
        let path = table_path.to_path_buf();
        let export = export_arg(name, image_path, &path);
        let size = image_size(&image).map_err(|e| format!("{}: {e}", image_path.display()))?;
        let ctx = |e: io::Error| format!("export '{name}': checksum table {}: {e}", path.display());
        if !path.exists() {
            let r = build(&image, size, &path, false, &mut |_| {}).map_err(ctx)?;
            log::info!(
                "export '{name}': created checksum table {} ({} blocks of 4 KiB)",
                path.display(),
                r.blocks
            );
            if r.unverified > 0 {
                log::warn!(
                    "export '{name}': {} blocks hold data written before checksums were enabled; \
                     they are served unverified until rewritten. If the image is known to be good, \
                     protect them now: stop the server and run \
                     `dst-server scrub --export {export} --repair-table`",
                    r.unverified,
                );
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(ctx)?;
        lock(&file).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!(
                    "export '{name}': checksum table {} is in use by another dst-server or a scrub; \
                     stop that first",
                    path.display()
                )
            } else {
                ctx(e)
            }
        })?;
        let mut header = [0u8; HEADER_FIELDS + 8];
        file.read_exact_at(&mut header, 0).map_err(ctx)?;
        let repair = format!(
            "if the image's data is good, rebuild the table with \
             `dst-server scrub --export {export} --repair-table`"
        );
        let layout = Layout::decode(&header).map_err(|why| {
            format!(
                "export '{name}': checksum table {}: {why}; {repair}",
                path.display()
            )
        })?;
        let id = image_id(&image).map_err(ctx)?;
        if layout.image_id != 0 && id != 0 && layout.image_id != id {
            return Err(format!(
                "export '{name}': {} is not the file checksum table {} was made for (it was \
                 replaced or copied since); if it is a new image, delete the table; if its data \
                 is good, rebuild the table with `dst-server scrub --export {export} --repair-table`",
                image_path.display(),
                path.display(),
            ));
        }
        if layout.image_size > size {
            return Err(format!(
                "export '{name}': checksum table {} describes an image of {} bytes, but {} has {size}; {repair}",
                path.display(),
                layout.image_size,
                image_path.display()
            ));
        }
        let len = file.metadata().map_err(ctx)?.len();
        if len < layout.file_len() {
            return Err(format!(
                "export '{name}': checksum table {} is truncated ({len} of {} bytes); {repair}",
                path.display(),
                layout.file_len()
            ));
        }
        let mapped = Mapped::new(&file, layout).map_err(ctx)?;
        let bits = &mapped.tracker.bits;
        let was_unclean = !bits.is_clean() || (0..layout.regions()).any(|r| bits.is_set(r));
        let mut inner = Inner {
            name: name.into(),
            path: path.clone(),
            image,
            mapped: RwLock::new(mapped),
            stripes: Stripes::new(),
            entries_changed: AtomicBool::new(false),
            stats: Mutex::new(ChecksumStats::default()),
            was_unclean,
            recovered: 0,
            file,
        };
        if was_unclean {
            inner.recovered = inner.recover().map_err(ctx)?;
        }
        if size > layout.image_size {
            log::info!(
                "export '{name}': {} grew from {} to {size} bytes while the server was stopped; \
                 growing its checksum table",
                image_path.display(),
                layout.image_size
            );
            inner.grow(size).map_err(ctx)?;
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
                    .map_err(|e| {
                        format!("export '{name}': cannot start the checkpoint thread: {e}")
                    })?,
            ),
            None => None,
        };
        log::info!(
            "export '{name}': checksums on: table {}, {} blocks of 4 KiB, dirty regions of {} MiB",
            inner.path.display(),
            layout.blocks,
            layout.region_bytes() >> 20
        );
        Ok(ChecksumTable {
            inner,
            stop,
            checkpointer,
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn layout(&self) -> Layout {
        self.inner.state().layout
    }

    /// Grows the table to describe an image of `size` bytes, while it is in use; does
    /// nothing if it describes that much already. Returns whether it grew.
    pub fn grow(&self, size: u64) -> io::Result<bool> {
        self.inner.grow(size)
    }

    /// Blocks that recovery marked unverified when the table was opened.
    pub fn recovered(&self) -> u64 {
        self.inner.recovered
    }

    pub fn stats(&self) -> ChecksumStats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads `len` bytes at `offset`, verifying every block they touch; a mismatch
    /// fails the whole read with EIO.
    pub fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let t = &*self.inner;
        if len == 0 {
            return Ok(Vec::new());
        }
        let (first, last) = block_range(offset, len as u64);
        let m = t.state();
        let size = m.layout.image_size;
        let _locks = t.stripes.read(first, last);
        let start = first * BLOCK_SIZE;
        let end = block_span(last, size).1;
        let mut buf = vec![0u8; (end - start) as usize];
        t.image.read_exact_at(&mut buf, start)?;
        let mut bad = false;
        for b in first..=last {
            let (s, e) = block_span(b, size);
            let data = &buf[(s - start) as usize..(e - start) as usize];
            if verify(m.entry(b), data) == Verdict::Corrupt {
                t.report_corrupt(b, size, "read");
                bad = true;
            }
        }
        if bad {
            t.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .failed_requests += 1;
            return Err(eio());
        }
        if start == offset && buf.len() == len as usize {
            Ok(buf)
        } else {
            let at = (offset - start) as usize;
            Ok(buf[at..at + len as usize].to_vec())
        }
    }

    /// Writes `data` at `offset` with `write`, keeping the checksums.
    pub fn write(
        &self,
        offset: u64,
        data: &[u8],
        write: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        self.inner
            .change(offset, data.len() as u64, Some(data), || {
                write().map(|()| true)
            })
            .map(drop)
    }

    /// Zeroes (trims) `len` bytes at `offset` with `zero`, which says whether it changed
    /// the data (a discard the file system ignores does not); returns what `zero` said.
    pub fn zero(
        &self,
        offset: u64,
        len: u64,
        zero: impl FnOnce() -> io::Result<bool>,
    ) -> io::Result<bool> {
        self.inner.change(offset, len, None, zero)
    }

    /// Makes every finished change durable, data and checksums, and marks the table
    /// clean if nothing is being changed: for a clean shutdown.
    pub fn sync(&self) -> io::Result<()> {
        let t = &*self.inner;
        let clean = t.checkpoint(Clear::All)?;
        let s = self.stats();
        if s.corrupt_blocks > 0 {
            log::warn!(
                "export '{}': {} blocks failed checksum verification since the server started \
                 ({} requests failed with EIO; first blocks: {:?}); run `dst-server scrub` for a full check",
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

    /// Verifies every block of the image. Blocks without a usable checksum (unverified)
    /// get one from their current contents; corrupt blocks are left as they are, so
    /// reads keep failing until the block is rewritten or the table repaired.
    /// `progress` is told the bytes done so far.
    pub fn scrub(&self, progress: &mut dyn FnMut(u64)) -> io::Result<ScrubReport> {
        let t = &*self.inner;
        // Adopted checksums must describe durable data, not a crashed writer's page cache.
        t.image.sync_data()?;
        let m = t.state();
        let layout = m.layout;
        let mut r = ScrubReport {
            blocks: layout.blocks,
            was_unclean: t.was_unclean,
            ..Default::default()
        };
        let mut buf = Vec::new();
        let mut b = 0;
        while b < layout.blocks {
            let n = SCAN_BLOCKS.min(layout.blocks - b);
            t.scan(&m, b, n, &mut buf, |block, data| {
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
        m.map.flush()?;
        Ok(r)
    }
}

impl Drop for ChecksumTable {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
    }
}

fn checkpoint_loop(table: Weak<Inner>, stop: Arc<(Mutex<bool>, Condvar)>, every: Duration) {
    loop {
        {
            let stopped = stop.0.lock().unwrap_or_else(|e| e.into_inner());
            let (stopped, _) = stop
                .1
                .wait_timeout_while(stopped, every, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        let Some(t) = table.upgrade() else { return };
        if t.state().tracker.any_dirty() {
            let started = Instant::now();
            match t.checkpoint(Clear::Idle) {
                Ok(_) => log::debug!(
                    "export '{}': checksum checkpoint took {:?}",
                    t.name,
                    started.elapsed()
                ),
                // Nothing is cleared on failure, so this only widens a later recovery.
                Err(e) => log::error!(
                    "export '{}': checksum checkpoint failed (will retry): {e}",
                    t.name
                ),
            }
        }
    }
}

impl Inner {
    fn state(&self) -> RwLockReadGuard<'_, Mapped> {
        self.mapped.read().unwrap_or_else(|e| e.into_inner())
    }

    fn report_corrupt(&self, block: u64, size: u64, during: &str) {
        let (s, e) = block_span(block, size);
        log::error!(
            "export '{}': block {block} (bytes {s}..{e} of the image) does not match its checksum \
             ({during} failed with EIO): the data was changed outside dst or the disk returned bad \
             data. Rewrite or restore the block; run `dst-server scrub` for a full check",
            self.name
        );
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.corrupt_blocks += 1;
        if st.first_corrupt.len() < FIRST_CORRUPT {
            st.first_corrupt.push(block);
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
            let mut block = vec![0u8; (e - s) as usize];
            self.image.read_exact_at(&mut block, s)?;
            let new = match verify(m.entry(b), &block) {
                Verdict::Corrupt => {
                    self.report_corrupt(b, size, "partial-block change");
                    self.stats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .failed_requests += 1;
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

    fn checkpoint(&self, mode: Clear) -> io::Result<bool> {
        self.checkpoint_in(&self.state(), mode)
    }

    fn checkpoint_in(&self, m: &Mapped, mode: Clear) -> io::Result<bool> {
        m.tracker.checkpoint(mode, || {
            let changed = self.entries_changed.swap(false, Ordering::AcqRel);
            // The two syncs are independent; overlap them.
            std::thread::scope(|s| {
                let entries = changed.then(|| s.spawn(|| m.map.flush()));
                let data = self.image.sync_data();
                let entries = entries.map_or(Ok(()), |h| h.join().unwrap_or_else(|_| Err(eio())));
                if data.is_err() || entries.is_err() {
                    self.entries_changed.store(true, Ordering::Release);
                }
                data.and(entries)
            })
        })
    }

    /// Calls `each(block, contents)` for `n` blocks from `first`.
    fn scan(
        &self,
        m: &Mapped,
        first: u64,
        n: u64,
        buf: &mut Vec<u8>,
        mut each: impl FnMut(u64, &[u8]),
    ) -> io::Result<()> {
        let size = m.layout.image_size;
        let start = first * BLOCK_SIZE;
        let end = block_span(first + n - 1, size).1;
        buf.resize((end - start) as usize, 0);
        self.image.read_exact_at(buf, start)?;
        for b in first..first + n {
            let (s, e) = block_span(b, size);
            each(b, &buf[(s - start) as usize..(e - start) as usize]);
        }
        Ok(())
    }

    /// After an unclean shutdown: blocks of dirty regions that disagree with their
    /// checksum were being changed; mark them unverified, make everything durable,
    /// then clear the bitmap. Returns the blocks marked. Safe to repeat if interrupted.
    fn recover(&self) -> io::Result<u64> {
        let m = self.state();
        let (bits, layout) = (&m.tracker.bits, m.layout);
        let dirty: Vec<u64> = (0..layout.regions()).filter(|&r| bits.is_set(r)).collect();
        log::warn!(
            "export '{}': the checksum table was not closed cleanly (server killed or machine \
             crashed); checking the {} regions of {} MiB written just before",
            self.name,
            dirty.len(),
            layout.region_bytes() >> 20
        );
        let started = Instant::now();
        let per = 1u64 << layout.region_shift;
        let mut marked = 0;
        let mut buf = Vec::new();
        for &r in &dirty {
            let end = ((r + 1) * per).min(layout.blocks);
            let mut b = r * per;
            while b < end {
                let n = SCAN_BLOCKS.min(end - b);
                self.scan(&m, b, n, &mut buf, |block, data| {
                    if verify(m.entry(block), data) == Verdict::Corrupt {
                        log::debug!("export '{}': block {block} marked unverified", self.name);
                        m.set_entry(block, UNVERIFIED);
                        marked += 1;
                    }
                })?;
                b += n;
            }
        }
        self.image.sync_data()?;
        m.map.flush()?;
        for r in dirty {
            bits.clear(r);
        }
        bits.mark_clean();
        bits.persist()?;
        log::warn!(
            "export '{}': recovered in {:.1?}: {marked} blocks changed just before the shutdown \
             did not match their checksums; they are now unverified, not corrupt (served \
             unchecked until rewritten or scrubbed)",
            self.name,
            started.elapsed()
        );
        Ok(marked)
    }

    /// Grows the table to an image of `size` bytes, with every reader and writer held off.
    /// The durable steps keep one layout valid at every moment of a crash: the image's
    /// new length is made durable; the old short last block's entry is made unverified
    /// (true under both layouts); the file is lengthened (new entries read as zeros,
    /// unverified); then the new header is written in one sector-sized write and synced.
    /// Only then do entries claim anything about the new blocks: holes are known zero,
    /// and the old last block gets the checksum of its whole contents. A table found
    /// shorter than its image at open is grown the same way.
    fn grow(&self, size: u64) -> io::Result<bool> {
        let mut m = self.mapped.write().unwrap_or_else(|e| e.into_inner());
        let Some(g) = m.layout.grow_to(size) else {
            return Ok(false);
        };
        // With nothing in flight, this makes every change durable and clears every bit,
        // so the bitmap means the same under the new region size.
        if !self.checkpoint_in(&m, Clear::All)? {
            return Err(io::Error::other(
                "dirty regions could not be cleared before growing the table",
            ));
        }
        self.image.sync_all()?;
        let tail = match g.short_tail {
            Some(b) => {
                let (s, e) = block_span(b, m.layout.image_size);
                let mut old = vec![0u8; (e - s) as usize];
                self.image.read_exact_at(&mut old, s)?;
                // A corrupt block keeps its entry, which fails the longer block too.
                let known = matches!(verify(m.entry(b), &old), Verdict::Ok | Verdict::Zero);
                if known {
                    m.set_entry(b, UNVERIFIED);
                    m.map.flush()?;
                }
                known.then_some(b)
            }
            None => None,
        };
        self.file.set_len(g.layout.file_len())?;
        self.file.sync_all()?;
        self.file.write_all_at(&g.layout.encode(), 0)?;
        self.file.sync_data()?;
        let old = m.layout;
        *m = Mapped::new(&self.file, g.layout)?;
        let zero = mark_holes(&self.image, size, g.new_blocks.clone(), |b| {
            m.set_entry(b, ZERO)
        });
        if let Some(b) = tail {
            let (s, e) = block_span(b, size);
            let mut block = vec![0u8; (e - s) as usize];
            self.image.read_exact_at(&mut block, s)?;
            m.set_entry(b, entry_for(&block));
        }
        self.entries_changed.store(true, Ordering::Release);
        log::info!(
            "export '{}': checksum table grown from {} to {size} bytes: {} new blocks of 4 KiB \
             ({zero} known zero, the rest unverified until written or scrubbed), dirty regions \
             of {} MiB",
            self.name,
            old.image_size,
            g.new_blocks.end - g.new_blocks.start,
            g.layout.region_bytes() >> 20
        );
        Ok(true)
    }
}

/// Takes the table's exclusive lock without waiting.
fn lock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Data ranges of the image from `from` on (SEEK_DATA/SEEK_HOLE); `None` where holes
/// are not reported.
fn data_ranges(image: &File, from: u64, size: u64) -> Option<Vec<(u64, u64)>> {
    let fd = image.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = from;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; reads use pread, so the offset is free.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Some(ranges),
                _ => None,
            };
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        ranges.push((data as u64, (hole as u64).min(size)));
        pos = hole as u64;
    }
    Some(ranges)
}

/// Calls `zero(b)` for every block of `blocks` that lies wholly in a hole of the image
/// of `size` bytes; returns how many.
fn mark_holes(
    image: &File,
    size: u64,
    blocks: std::ops::Range<u64>,
    mut zero: impl FnMut(u64),
) -> u64 {
    let from = blocks.start * BLOCK_SIZE;
    let data = data_ranges(image, from, size).unwrap_or_else(|| vec![(from, size)]);
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

/// Builds the table of `image` at `path`, atomically (a temporary file renamed into
/// place). With `from_data`, every block gets the checksum of its current contents;
/// without, holes are known zero and the rest unverified (cheap, for a new table).
fn build(
    image: &File,
    size: u64,
    path: &Path,
    from_data: bool,
    progress: &mut dyn FnMut(u64),
) -> io::Result<BuildReport> {
    // What we record must be what is on disk, not a crashed writer's page cache.
    image.sync_data()?;
    let layout = Layout {
        image_id: image_id(image)?,
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
        let map = MmapRaw::map_raw(&file)?;
        let set = |b: u64, v: u64| {
            atomic_u64(&map, ENTRIES_AT as usize + b as usize * 8)
                .store(v.to_le(), Ordering::Relaxed)
        };
        let mut r = BuildReport {
            blocks: layout.blocks,
            ..Default::default()
        };
        if from_data {
            let mut buf = vec![0u8; (SCAN_BLOCKS * BLOCK_SIZE) as usize];
            let mut b = 0;
            while b < layout.blocks {
                let n = SCAN_BLOCKS.min(layout.blocks - b);
                let start = b * BLOCK_SIZE;
                let end = block_span(b + n - 1, size).1;
                let buf = &mut buf[..(end - start) as usize];
                image.read_exact_at(buf, start)?;
                for i in 0..n {
                    let (s, e) = block_span(b + i, size);
                    let v = entry_for(&buf[(s - start) as usize..(e - start) as usize]);
                    r.zero += (v == ZERO) as u64;
                    set(b + i, v);
                }
                b += n;
                progress(end);
            }
        } else {
            r.zero = mark_holes(image, size, 0..layout.blocks, |b| set(b, ZERO));
            r.unverified = layout.blocks - r.zero;
        }
        map.flush()?;
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

/// `--repair-table`: replaces the table at `path` (see [`table_path`]) of the image at
/// `image_path` with one built from the image's current contents, for an image known to be
/// good. Refuses while a server or scrub holds the table.
pub fn rebuild(
    image_path: &Path,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<BuildReport, String> {
    let ctx = |e: io::Error| format!("checksum table {}: {e}", path.display());
    let image = File::open(image_path).map_err(|e| format!("{}: {e}", image_path.display()))?;
    let size = image_size(&image).map_err(|e| format!("{}: {e}", image_path.display()))?;
    // Hold the old table's lock while replacing it, so no server is using it.
    let _old = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => {
            lock(&f).map_err(|e| {
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    format!(
                        "checksum table {} is in use by a running dst-server or scrub; stop it first",
                        path.display()
                    )
                } else {
                    ctx(e)
                }
            })?;
            Some(f)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(ctx(e)),
    };
    build(&image, size, path, true, progress).map_err(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

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

    #[test]
    fn layout_sizes_regions_and_round_trips() {
        let small = Layout::for_image(64 << 20);
        assert_eq!(small.blocks, 16384);
        assert_eq!(small.region_bytes(), 16 << 20);
        assert_eq!(small.regions(), 4);
        assert_eq!(small.file_len(), 4096 + 16384 * 8);
        let big = Layout::for_image(16 << 40);
        assert!(big.regions() <= MAX_REGIONS);
        assert_eq!(big.region_bytes(), 2 << 30);
        let odd = Layout::for_image(10_000);
        assert_eq!((odd.blocks, odd.regions()), (3, 1));
        assert_eq!(Layout::for_image(0).regions(), 1);
        let with_id = Layout {
            image_id: 12345,
            ..small
        };
        for l in [small, big, odd, with_id] {
            assert_eq!(Layout::decode(&l.encode()), Ok(l));
        }
    }

    #[test]
    fn growth_keeps_the_regions_bounded_and_only_coarsens_them() {
        let small = Layout {
            image_id: 7,
            ..Layout::for_image(10_000)
        };
        assert_eq!(small.grow_to(10_000), None);
        assert_eq!(small.grow_to(4096), None, "a shrink is no growth");
        let g = small.grow_to(64 << 20).unwrap();
        assert_eq!(g.layout.image_id, 7, "the same image");
        assert_eq!(g.short_tail, Some(2), "10 000 bytes end inside block 2");
        assert_eq!(g.new_blocks, 3..16384);
        assert_eq!(g.layout.region_shift, small.region_shift);
        // Whole blocks: no tail to redo.
        let whole = Layout::for_image(64 << 20);
        assert_eq!(whole.grow_to(65 << 20).unwrap().short_tail, None);
        // A large growth needs coarser regions, never more than the bitmap holds.
        let g = whole.grow_to(16 << 40).unwrap();
        assert!(g.layout.regions() <= MAX_REGIONS);
        assert!(g.layout.region_shift > whole.region_shift);
        assert_eq!(g.layout, Layout::for_image(16 << 40));
        // Regions never get finer than the table had, whatever the new size suggests.
        let coarse = Layout {
            region_shift: 20,
            ..whole
        };
        assert_eq!(coarse.grow_to(128 << 20).unwrap().layout.region_shift, 20);
        for size in [10_001, 12_289, 1 << 30, (1 << 40) + 1, 1 << 50] {
            let g = small.grow_to(size).unwrap();
            assert!(g.layout.regions() <= MAX_REGIONS, "{size}");
            assert_eq!(Layout::decode(&g.layout.encode()), Ok(g.layout));
        }
    }

    #[test]
    fn damaged_headers_are_refused_with_a_reason() {
        let good = Layout::for_image(1 << 30).encode();
        let mut h = good;
        h[0] = b'X';
        assert!(Layout::decode(&h).unwrap_err().contains("magic"));
        let mut h = good;
        h[20] ^= 1;
        assert!(Layout::decode(&h).unwrap_err().contains("damaged"));
        assert!(Layout::decode(&good[..20]).is_err());
    }

    #[test]
    fn stripes_are_sorted_unique_and_bounded() {
        assert_eq!(Stripes::indices(0, 15), vec![0]);
        assert_eq!(Stripes::indices(15, 16), vec![0, 1]);
        let wrap = Stripes::indices((STRIPES - 1) << STRIPE_SHIFT, STRIPES << STRIPE_SHIFT);
        assert_eq!(wrap, vec![0, STRIPES as usize - 1]);
        assert_eq!(Stripes::indices(0, u32::MAX as u64).len(), STRIPES as usize);
    }

    /// Bits in memory and on "disk"; `persist` copies one to the other.
    #[derive(Default)]
    struct FakeBits {
        mem: Mutex<(Vec<bool>, bool)>,
        disk: Mutex<(Vec<bool>, bool)>,
        persists: AtomicUsize,
    }

    impl FakeBits {
        fn new(regions: usize) -> Self {
            FakeBits {
                mem: Mutex::new((vec![false; regions], true)),
                disk: Mutex::new((vec![false; regions], true)),
                persists: AtomicUsize::new(0),
            }
        }
        fn durable(&self, r: usize) -> bool {
            self.disk.lock().unwrap().0[r]
        }
        fn durable_clean(&self) -> bool {
            self.disk.lock().unwrap().1
        }
    }

    impl RegionBits for &FakeBits {
        fn set(&self, r: u64) {
            let mut m = self.mem.lock().unwrap();
            m.0[r as usize] = true;
            m.1 = false;
        }
        fn clear(&self, r: u64) {
            self.mem.lock().unwrap().0[r as usize] = false;
        }
        fn mark_clean(&self) {
            self.mem.lock().unwrap().1 = true;
        }
        fn persist(&self) -> io::Result<()> {
            self.persists.fetch_add(1, Ordering::SeqCst);
            *self.disk.lock().unwrap() = self.mem.lock().unwrap().clone();
            Ok(())
        }
    }

    #[test]
    fn a_change_starts_only_once_its_bits_are_durable_and_hot_regions_stay_dirty() {
        let bits = FakeBits::new(4);
        let t = Tracker::new(&bits, 4);
        drop(t.begin(1, 2).unwrap());
        assert!(bits.durable(1) && bits.durable(2) && !bits.durable_clean());
        assert_eq!(bits.persists.load(Ordering::SeqCst), 1, "one sync for both");
        drop(t.begin(1, 1).unwrap());
        assert_eq!(
            bits.persists.load(Ordering::SeqCst),
            1,
            "marked this epoch already"
        );

        // Written just before: an idle checkpoint keeps it; after an idle interval, clears.
        assert!(!t.checkpoint(Clear::Idle, || Ok(())).unwrap());
        drop(t.begin(1, 1).unwrap()); // still dirty: new epoch, but no sync needed
        assert_eq!(bits.persists.load(Ordering::SeqCst), 1);
        assert!(!t.checkpoint(Clear::Idle, || Ok(())).unwrap()); // 1 was written last epoch
        assert!(t.checkpoint(Clear::Idle, || Ok(())).unwrap());
        assert!(!t.any_dirty());
        // Cleared lazily; a new change makes its bit durable again.
        drop(t.begin(3, 3).unwrap());
        assert!(bits.durable(3) && !bits.durable(1));
    }

    #[test]
    fn a_clearing_checkpoint_persists_the_clean_flag_and_a_failed_one_clears_nothing() {
        let bits = FakeBits::new(2);
        let t = Tracker::new(&bits, 2);
        drop(t.begin(0, 1).unwrap());
        let err = t.checkpoint(Clear::All, || Err(io::Error::other("disk gone")));
        assert!(err.is_err());
        assert!(t.any_dirty() && bits.durable(0));
        assert!(t.checkpoint(Clear::All, || Ok(())).unwrap());
        assert!(!bits.durable(0) && !bits.durable(1) && bits.durable_clean());
    }

    #[test]
    fn a_checkpoint_waits_for_changes_in_progress() {
        let bits = FakeBits::new(1);
        let t = Tracker::new(&bits, 1);
        let synced = AtomicBool::new(false);
        std::thread::scope(|s| {
            let change = t.begin(0, 0).unwrap();
            let cp = s.spawn(|| {
                t.checkpoint(Clear::All, || {
                    synced.store(true, Ordering::SeqCst);
                    Ok(())
                })
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !synced.load(Ordering::SeqCst),
                "synced before the change finished"
            );
            drop(change);
            assert!(cp.join().unwrap().unwrap());
        });
    }

    #[test]
    fn concurrent_changes_share_bitmap_syncs() {
        let bits = FakeBits::new(64);
        let t = Tracker::new(&bits, 64);
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let t = &t;
                s.spawn(move || {
                    for r in 0..8 {
                        drop(t.begin(i * 8 + r, i * 8 + r).unwrap());
                    }
                });
            }
        });
        assert!((0..64).all(|r| bits.durable(r)));
        assert!(bits.persists.load(Ordering::SeqCst) <= 64);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Change(u64, u64),
        Checkpoint(bool),
    }

    proptest! {
        /// The invariant behind the guarantee, after every step: a region with a change
        /// not yet covered by a finished checkpoint has its bit durable, and a durable
        /// clean flag means no such region exists.
        #[test]
        fn uncovered_changes_always_have_durable_bits(steps in prop::collection::vec(
            prop_oneof![
                (0u64..6, 0u64..3).prop_map(|(r, n)| Step::Change(r, (r + n).min(5))),
                any::<bool>().prop_map(Step::Checkpoint),
            ], 1..60))
        {
            let bits = FakeBits::new(6);
            let t = Tracker::new(&bits, 6);
            let uncovered = Mutex::new([false; 6]);
            for step in steps {
                match step {
                    Step::Change(a, b) => {
                        let g = t.begin(a, b).unwrap();
                        for r in a..=b {
                            uncovered.lock().unwrap()[r as usize] = true;
                            prop_assert!(bits.durable(r as usize));
                        }
                        drop(g);
                    }
                    Step::Checkpoint(all) => {
                        let mode = if all { Clear::All } else { Clear::Idle };
                        t.checkpoint(mode, || {
                            *uncovered.lock().unwrap() = [false; 6];
                            Ok(())
                        }).unwrap();
                    }
                }
                let u = *uncovered.lock().unwrap();
                for (r, &open) in u.iter().enumerate() {
                    prop_assert!(!open || bits.durable(r), "region {} uncovered without its bit", r);
                }
                prop_assert!(!bits.durable_clean() || !u.iter().any(|&o| o));
            }
        }
    }

    fn image(dir: &Path, contents: &[(u64, &[u8])], size: u64) -> (PathBuf, File) {
        let path = dir.join("img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        for (at, data) in contents {
            f.write_all_at(data, *at).unwrap();
        }
        (path, f)
    }

    #[test]
    fn table_paths_default_beside_the_image_and_refuse_unsound_places() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = image(dir.path(), &[], 1 << 20);
        let beside = table_path("d", &img, None).unwrap();
        assert_eq!(beside, dir.path().join("img.dst-sum"));
        assert_eq!(
            export_arg("d", &img, &beside),
            format!("d={}", img.display())
        );
        let other = dir.path().join("elsewhere.sum");
        assert_eq!(table_path("d", &img, Some(&other)).unwrap(), other);
        assert_eq!(
            export_arg("d", &img, &other),
            format!("d={}:checksums={}", img.display(), other.display())
        );
        let err = table_path("d", &img, Some(&img)).unwrap_err();
        assert!(err.contains("is the image itself"), "{err}");
        let err = table_path("d", &img, Some(Path::new("/dev/null"))).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        // A block device must name its table's place (where this machine has one).
        use std::os::unix::fs::FileTypeExt;
        let dev = Path::new("/dev/loop0");
        if std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_block_device()) {
            let err = table_path("d", dev, None).unwrap_err();
            assert!(err.contains("is a block device"), "{err}");
            assert!(err.contains(":checksums=/var/lib/dst/d.dst-sum"), "{err}");
            assert_eq!(table_path("d", dev, Some(&other)).unwrap(), other);
        }
    }

    #[test]
    fn table_round_trip_on_files_with_recovery_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let size = 40 << 20; // 3 regions of 16 MiB, the last one short
        let (path, img) = image(dir.path(), &[(8 << 20, &[5u8; 4096])], size);
        // Placed elsewhere (`:checksums=TABLE`): all the same, whatever the name.
        let table = dir.path().join("t.sum");
        let open = || ChecksumTable::open("t", &path, &table, img.try_clone().unwrap(), None);
        let t = open().unwrap();
        assert!(!sidecar_path(&path).exists());
        // A fresh table: holes are zero, data blocks unverified.
        assert_eq!(t.inner.state().entry(0), ZERO);
        assert_eq!(t.inner.state().entry(2048), UNVERIFIED);
        assert_eq!(t.read(8 << 20, 4096).unwrap(), vec![5u8; 4096]);

        let data = vec![9u8; 3 * 4096];
        let write = |t: &ChecksumTable, at: u64, d: &[u8]| {
            t.write(at, d, || img.write_all_at(d, at)).unwrap()
        };
        write(&t, 4096, &data);
        write(&t, 100, &[1u8; 50]); // partial block 0, which was zero
        write(&t, 2048 * 4096, &[3u8; 10]); // partial on an unverified block stays unverified
        assert_eq!(t.inner.state().entry(2048), UNVERIFIED);
        assert_eq!(t.read(4096, 3 * 4096).unwrap(), data);
        assert_eq!(t.read(90, 70).unwrap()[10..60], [1u8; 50]);
        // A byte changed behind the table's back fails reads of its block only.
        img.write_all_at(&[0xff], 2 * 4096 + 7).unwrap();
        assert_eq!(
            t.read(0, 4 * 4096).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(t.read(3 * 4096, 4096).is_ok());
        // And a partial write into it is refused rather than laundered.
        assert!(t.write(2 * 4096 + 100, &[0u8; 4], || Ok(())).is_err());
        assert_eq!(t.stats().corrupt_blocks, 2);
        t.zero(4096, 4096, || Ok(true)).unwrap();
        img.write_all_at(&[0u8; 4096], 4096).unwrap();
        assert_eq!(t.inner.state().entry(1), ZERO);
        assert_eq!(t.read(4096, 4096).unwrap(), vec![0; 4096]);

        // "Crash": the table is dropped unsynced with region 0 dirty. Block 6 was
        // changed without its checksum (as a torn write leaves it); block 5120 rots in
        // a region that a checkpoint made clean.
        write(&t, 20 << 20, &[4u8; 4096]); // region 1
        assert!(t.inner.checkpoint(Clear::All).unwrap());
        write(&t, 5 * 4096, &[6u8; 4096]); // region 0 dirty again
        img.write_all_at(&[7u8; 4096], 6 * 4096).unwrap();
        img.write_all_at(&[8u8; 1], (20 << 20) + 1).unwrap();
        assert!(open().unwrap_err().contains("in use"), "locked while open");
        drop(t);
        let t = open().unwrap();
        // Blocks 2 (flipped earlier) and 6 are in the dirty region: unverified, served.
        assert_eq!(t.recovered(), 2);
        assert_eq!(t.read(6 * 4096, 4096).unwrap(), vec![7u8; 4096]);
        assert!(t.read(2 * 4096, 4096).is_ok());
        assert_eq!(t.read(5 * 4096, 4096).unwrap(), vec![6u8; 4096]);
        assert!(
            t.read(20 << 20, 4096).is_err(),
            "rot in a clean region is caught"
        );

        let report = t.scrub(&mut |_| {}).unwrap();
        assert!(report.was_unclean);
        assert_eq!(report.corrupt, 1);
        assert_eq!(report.first_corrupt, vec![5120]);
        assert_eq!(report.unverified, 3, "blocks 2, 6 and 2048: {report:?}");
        assert_eq!(
            report.ok + report.zero + report.unverified + report.corrupt,
            report.blocks
        );
        assert!(t.read(6 * 4096, 4096).is_ok());
        t.sync().unwrap();
        drop(t);

        // A clean close needs no recovery; a rebuilt table accepts the rot.
        let t = open().unwrap();
        assert_eq!(t.recovered(), 0);
        drop(t);
        let r = rebuild(&path, &table, &mut |_| {}).unwrap();
        assert_eq!(r.blocks, 10240);
        let t = open().unwrap();
        assert!(t.read(20 << 20, 4096).is_ok());
        let report = t.scrub(&mut |_| {}).unwrap();
        assert_eq!((report.corrupt, report.unverified), (0, 0));
    }

    #[test]
    fn a_table_grows_in_use_and_when_found_short_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let old = 3 * 4096 + 100; // the last block short
        let (path, img) = image(dir.path(), &[(0, &[5u8; 3 * 4096 + 100])], old);
        let table = dir.path().join("t.sum");
        let open = || ChecksumTable::open("t", &path, &table, img.try_clone().unwrap(), None);
        let t = open().unwrap();
        let write = |t: &ChecksumTable, at: u64, d: &[u8]| {
            t.write(at, d, || img.write_all_at(d, at)).unwrap()
        };
        write(&t, 0, &[1u8; 3 * 4096 + 100]);
        write(&t, 4096, &[2u8; 10]); // dirty when the table grows
        assert!(t.inner.state().tracker.any_dirty());
        let tail = t.inner.state().entry(3);
        assert_eq!(tail, block_sum(&[1u8; 100]));

        img.set_len(40 << 20).unwrap();
        assert!(t.grow(40 << 20).unwrap());
        assert!(!t.grow(40 << 20).unwrap(), "once");
        assert!(!t.grow(1 << 20).unwrap(), "never shrinks");
        assert_eq!(
            t.layout(),
            Layout::for_image(40 << 20).with_id(t.layout().image_id)
        );
        let m = t.inner.state();
        let mut whole = vec![0u8; 4096];
        whole[..100].fill(1);
        assert_eq!(m.entry(3), block_sum(&whole), "the old tail, checked whole");
        assert_eq!(m.entry(4), ZERO, "a new hole is known zero");
        assert_eq!(m.entry(10239), ZERO);
        assert!(!m.tracker.any_dirty());
        drop(m);
        assert_eq!(t.read(3 * 4096, 4096).unwrap(), whole);
        write(&t, 39 << 20, &[3u8; 4096]);
        write(&t, (39 << 20) + 4096, &[4u8; 100]); // partial on a known zero: checked
        assert_eq!(t.read((39 << 20) + 4096, 100).unwrap(), vec![4u8; 100]);
        img.write_all_at(&[9], (39 << 20) + 4096 + 7).unwrap();
        assert!(
            t.read((39 << 20) + 4096, 100).is_err(),
            "new blocks are verified"
        );
        img.write_all_at(&[4], (39 << 20) + 4096 + 7).unwrap();
        t.sync().unwrap();
        drop(t);

        // Grown while the server was stopped: the table follows at open.
        img.set_len(64 << 20).unwrap();
        let t = open().unwrap();
        assert_eq!(t.layout().image_size, 64 << 20);
        assert_eq!(t.read(39 << 20, 4096).unwrap(), vec![3u8; 4096]);
        let r = t.scrub(&mut |_| {}).unwrap();
        assert_eq!((r.corrupt, r.blocks), (0, 16384), "{r:?}");
        drop(t);
        // A shrunk one is refused, and says how to mend it.
        img.set_len(32 << 20).unwrap();
        let err = open().unwrap_err();
        assert!(err.contains("describes an image of"), "{err}");
    }
}
