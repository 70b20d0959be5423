//! The crash-consistency state machine of a checksum table, pure: which dirty-region bits
//! must be durable before a change starts, and which a checkpoint may clear. The bits
//! themselves are behind [`RegionBits`] (the mapped table, or a fake in the tests).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// The persistent dirty-region bitmap and clean flag, as the [`Tracker`] sees them.
pub(super) trait RegionBits: Send + Sync {
    /// Sets a region's bit in memory, and clears the clean flag with it.
    fn set(&self, region: u64);
    fn clear(&self, region: u64);
    fn mark_clean(&self);
    /// Makes the bits and the flag durable, as they are in memory now.
    fn persist(&self) -> io::Result<()>;
}

/// Which dirty regions a checkpoint may clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Clear {
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
pub(super) struct Tracker<B> {
    pub(super) bits: B,
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
pub(super) struct Change<'a> {
    _epoch: RwLockReadGuard<'a, u64>,
}

impl<B: RegionBits> Tracker<B> {
    /// A tracker for `regions` regions whose bits are all clear.
    pub(super) fn new(bits: B, regions: u64) -> Self {
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
    pub(super) fn begin(&self, first: u64, last: u64) -> io::Result<Change<'_>> {
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
    pub(super) fn checkpoint(
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
    pub(super) fn any_dirty(&self) -> bool {
        self.lock_state().bit_seq.iter().any(|&s| s != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

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
}
