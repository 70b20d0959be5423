//! A pool of payload buffers, so that a steady stream of requests reuses a few buffers
//! instead of allocating (and, for large ones, mapping, faulting in and unmapping) one per
//! request.

use std::sync::Mutex;

pub struct Pool {
    free: Mutex<Free>,
    /// Bytes of capacity the pool may keep.
    budget: usize,
}

#[derive(Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    /// Capacity of `bufs`, in all.
    bytes: usize,
}

/// Free buffers looked at for one that fits, most recently returned first.
const SCAN: usize = 8;

impl Pool {
    pub fn new(budget: usize) -> Pool {
        Pool {
            free: Mutex::new(Free::default()),
            budget,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(&self, data: &[u8]) -> Vec<u8> {
        let mut buf = self.reuse(data.len());
        buf.clear();
        buf.extend_from_slice(data);
        buf
    }

    /// A buffer of `len` bytes to be overwritten: its contents are whatever they were.
    /// Only bytes the reused buffer never held are zeroed.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.reuse(len);
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// Takes a buffer back, unless the pool already keeps its budget's worth.
    pub fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap();
        if free.bytes + buf.capacity() <= self.budget {
            free.bytes += buf.capacity();
            free.bufs.push(buf);
        }
        // Else `buf` is freed, after the lock is released.
    }

    /// Bytes of capacity the pool keeps.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.free.lock().unwrap().bytes
    }

    /// A free buffer for `len` bytes: among the most recently returned (likely still in
    /// cache), the shortest one already that long, else the longest one with the room, so
    /// that [`take`](Self::take) zeroes as little as it can. (Payloads vary in length: the
    /// kernel splits a loop device's 1 MiB writes into two of 496 to 528 KiB. Taking the
    /// shortest that fits keeps the longer buffers for the longer payloads.) A buffer too
    /// small is dropped rather than grown, which would copy it.
    fn reuse(&self, len: usize) -> Vec<u8> {
        if len == 0 {
            return Vec::new();
        }
        let mut free = self.free.lock().unwrap();
        let from = free.bufs.len().saturating_sub(SCAN);
        // Most recent first, so that of equals the most recent is taken.
        let recent = || free.bufs[from..].iter().enumerate().rev();
        let fit = recent()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .or_else(|| {
                recent()
                    .filter(|(_, b)| b.capacity() >= len)
                    .min_by_key(|(_, b)| std::cmp::Reverse(b.len()))
            })
            .map(|(i, _)| i);
        let Some(i) = fit else {
            let small = free.bufs.pop().unwrap_or_default();
            free.bytes -= small.capacity();
            drop(free);
            drop(small);
            return Vec::with_capacity(len);
        };
        let buf = free.bufs.swap_remove(from + i);
        free.bytes -= buf.capacity();
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_within_the_budget() {
        let pool = Pool::new(10_000);
        let a = pool.copy_of(&[1; 4000]);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.copy_of(&[2; 100]);
        assert_eq!((b.as_ptr(), b.as_slice()), (ptr, &[2u8; 100][..]));
        pool.put(b);
        pool.put(vec![0; 8000]); // over budget with the first: dropped
        assert_eq!(pool.free.lock().unwrap().bufs.len(), 1);
    }

    #[test]
    fn taken_buffers_keep_old_bytes_and_zero_only_new_ones() {
        let pool = Pool::new(1 << 20);
        let mut a = pool.take(1000);
        assert_eq!(a, vec![0; 1000]);
        a.fill(7);
        a.reserve(9000);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.take(3000);
        assert_eq!(
            b.as_ptr(),
            ptr,
            "grown within the capacity, not reallocated"
        );
        assert!(b[..1000].iter().all(|&x| x == 7) && b[1000..].iter().all(|&x| x == 0));
        pool.put(b);
        let c = pool.take(10);
        assert_eq!(c.as_ptr(), ptr);
        assert_eq!(pool.take(0).capacity(), 0, "nothing taken for nothing");
    }

    #[test]
    fn the_buffer_taken_is_the_one_that_needs_the_least_zeroing() {
        let pool = Pool::new(1 << 20);
        let mut bufs: Vec<Vec<u8>> = [500, 600, 300]
            .map(|len| {
                let mut b = pool.take(len);
                b.reserve_exact(1000 - len);
                b
            })
            .into();
        let ptrs: Vec<_> = bufs.iter().map(|b| b.as_ptr()).collect();
        for b in bufs.drain(..) {
            pool.put(b);
        }
        // The shortest already long enough, not the most recent or the longest.
        let a = pool.take(450);
        assert_eq!(a.as_ptr(), ptrs[0]);
        // None is long enough: the longest with the room (100 bytes to zero, not 600).
        let b = pool.take(700);
        assert_eq!(b.as_ptr(), ptrs[1]);
        let c = pool.take(700);
        assert_eq!(c.as_ptr(), ptrs[2]);
    }

    #[test]
    fn a_buffer_that_fits_is_preferred_and_one_too_small_is_dropped() {
        let pool = Pool::new(1 << 20);
        let big = pool.take(64 << 10);
        let ptr = big.as_ptr();
        pool.put(big);
        pool.put(pool.copy_of(&[1; 100]));
        // The big one, though the small one came back last.
        let c = pool.take(32 << 10);
        assert_eq!(c.as_ptr(), ptr);
        // None fits: the small one goes, a new one is made.
        assert_eq!(pool.take(128 << 10).len(), 128 << 10);
        drop(c);
        let free = pool.free.lock().unwrap();
        assert_eq!((free.bufs.len(), free.bytes), (0, 0));
    }
}
