//! The table file, mapped: its dirty bitmap and clean flag as the [`Tracker`] sees them,
//! and its entries. Every unsafe block of the checksum table is here; the map is only
//! ever accessed through atomics, since many threads read and write it at once.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::MmapRaw;

use super::layout::{Layout, BITMAP_AT, CLEAN_AT, ENTRIES_AT, PAGE};
use super::tracker::{RegionBits, Tracker};

/// Page 0 of the mapped table: the bitmap and the clean flag.
pub(super) struct HeaderBits(Arc<MmapRaw>);

impl HeaderBits {
    fn word(&self, region: u64) -> &AtomicU64 {
        atomic_u64(&self.0, BITMAP_AT + (region / 64) as usize * 8)
    }

    pub(super) fn is_set(&self, region: u64) -> bool {
        self.word(region).load(Ordering::Acquire) & (1u64 << (region % 64)).to_le() != 0
    }

    fn clean_flag(&self) -> &AtomicU32 {
        assert!(CLEAN_AT.is_multiple_of(4) && CLEAN_AT + 4 <= self.0.len());
        // SAFETY: in bounds (checked above) and 4-aligned (the map is page-aligned); the
        // Arc keeps the map alive as long as the reference; only atomics touch it.
        unsafe { &*(self.0.as_mut_ptr().add(CLEAN_AT) as *const AtomicU32) }
    }

    pub(super) fn is_clean(&self) -> bool {
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
    // SAFETY: in bounds and aligned (checked above; the map is page-aligned); shared
    // memory is only ever accessed through atomics; the file is never shortened while
    // mapped (we hold its lock, and a table only grows).
    unsafe { &*(map.as_mut_ptr().add(at) as *const AtomicU64) }
}

/// The table as mapped for one layout; replaced whole when the table grows.
pub(super) struct Mapped {
    pub(super) layout: Layout,
    map: Arc<MmapRaw>,
    pub(super) tracker: Tracker<HeaderBits>,
}

impl Mapped {
    /// Maps `file`, a table of `layout` at least [`Layout::file_len`] long.
    pub(super) fn new(file: &File, layout: Layout) -> io::Result<Mapped> {
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

    pub(super) fn entry(&self, block: u64) -> u64 {
        u64::from_le(
            atomic_u64(&self.map, ENTRIES_AT as usize + block as usize * 8).load(Ordering::Relaxed),
        )
    }

    pub(super) fn set_entry(&self, block: u64, value: u64) {
        atomic_u64(&self.map, ENTRIES_AT as usize + block as usize * 8)
            .store(value.to_le(), Ordering::Relaxed);
    }

    /// Makes every change to the mapped table durable (`msync`).
    pub(super) fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }
}
