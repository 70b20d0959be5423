//! Locks on block ranges, so a read never sees new data with an old checksum.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPES: u64 = 1024;
/// Blocks per lock unit (64 KiB): few locks for a large request.
const STRIPE_SHIFT: u32 = 4;

pub(super) struct Stripes(Box<[RwLock<()>]>);

impl Stripes {
    pub(super) fn new() -> Self {
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

    pub(super) fn read(&self, first: u64, last: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        Self::indices(first, last)
            .into_iter()
            .map(|i| self.0[i].read().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    pub(super) fn write(&self, first: u64, last: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        Self::indices(first, last)
            .into_iter()
            .map(|i| self.0[i].write().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_are_sorted_unique_and_bounded() {
        assert_eq!(Stripes::indices(0, 15), vec![0]);
        assert_eq!(Stripes::indices(15, 16), vec![0, 1]);
        let wrap = Stripes::indices((STRIPES - 1) << STRIPE_SHIFT, STRIPES << STRIPE_SHIFT);
        assert_eq!(wrap, vec![0, STRIPES as usize - 1]);
        assert_eq!(Stripes::indices(0, u32::MAX as u64).len(), STRIPES as usize);
    }
}
