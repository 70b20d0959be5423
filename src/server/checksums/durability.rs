//! Making a checksum table durable, and mending it: the background checkpoints (data
//! synced, then entries, then idle regions' dirty bits cleared), recovery after an
//! unclean shutdown, and growth with the image. Each keeps the guarantee of the module
//! documentation ([`super`]) at every moment a crash could come.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::build::mark_holes;
use super::filter::Inner;
use super::map::Mapped;
use super::tracker::{Clear, RegionBits};
use super::{block_span, eio, entry_for, verify, Verdict, SCAN_BLOCKS, UNVERIFIED, ZERO};

/// Every `every`, until `stop` is set or the table dropped: a checkpoint, if any region
/// is dirty.
pub(super) fn checkpoint_loop(
    table: Weak<Inner>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    every: Duration,
) {
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
    pub(super) fn checkpoint(&self, mode: Clear) -> io::Result<bool> {
        self.checkpoint_in(&self.state(), mode)
    }

    fn checkpoint_in(&self, m: &Mapped, mode: Clear) -> io::Result<bool> {
        m.tracker.checkpoint(mode, || {
            let changed = self.entries_changed.swap(false, Ordering::AcqRel);
            // The two syncs are independent; overlap them.
            std::thread::scope(|s| {
                let entries = changed.then(|| s.spawn(|| m.flush()));
                let data = self.below.flush();
                let entries = entries.map_or(Ok(()), |h| h.join().unwrap_or_else(|_| Err(eio())));
                if data.is_err() || entries.is_err() {
                    self.entries_changed.store(true, Ordering::Release);
                }
                data.and(entries)
            })
        })
    }

    /// After an unclean shutdown: blocks of dirty regions that disagree with their
    /// checksum were being changed; mark them unverified, make everything durable,
    /// then clear the bitmap. Returns the blocks marked. Safe to repeat if interrupted.
    pub(super) fn recover(&self) -> io::Result<u64> {
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
        for &r in &dirty {
            let end = ((r + 1) * per).min(layout.blocks);
            let mut b = r * per;
            while b < end {
                let n = SCAN_BLOCKS.min(end - b);
                self.scan(layout.image_size, b, n, |block, data| {
                    if verify(m.entry(block), data) == Verdict::Corrupt {
                        log::debug!("export '{}': block {block} marked unverified", self.name);
                        m.set_entry(block, UNVERIFIED);
                        marked += 1;
                    }
                })?;
                b += n;
            }
        }
        self.below.flush()?;
        m.flush()?;
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
    /// shorter than its image at open is grown the same way. Returns whether it grew.
    pub(super) fn grow(&self, size: u64) -> io::Result<bool> {
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
        // fdatasync makes the new length durable too: it is needed to read the data.
        self.below.flush()?;
        let tail = match g.short_tail {
            Some(b) => {
                let (s, e) = block_span(b, m.layout.image_size);
                let old = self.below.read(s, (e - s) as usize, &self.pool)?;
                // A corrupt block keeps its entry, which fails the longer block too.
                let known = matches!(verify(m.entry(b), &old), Verdict::Ok | Verdict::Zero);
                self.pool.put(old);
                if known {
                    m.set_entry(b, UNVERIFIED);
                    m.flush()?;
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
        let zero = mark_holes(&*self.below, size, g.new_blocks.clone(), |b| {
            m.set_entry(b, ZERO)
        });
        if let Some(b) = tail {
            let (s, e) = block_span(b, size);
            let block = self.below.read(s, (e - s) as usize, &self.pool)?;
            m.set_entry(b, entry_for(&block));
            self.pool.put(block);
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
