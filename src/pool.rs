//! A pool of payload buffers, so that a steady stream of requests reuses a few buffers
//! instead of allocating (and, for large ones, mapping and unmapping) one per request.

use std::sync::Mutex;

pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Bytes of capacity the pool may keep.
    budget: usize,
}

impl Pool {
    pub fn new(budget: usize) -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            budget,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(&self, data: &[u8]) -> Vec<u8> {
        let mut buf = self.free.lock().unwrap().pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        buf
    }

    /// Takes a buffer back, unless the pool already keeps its budget's worth.
    pub fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap();
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= self.budget {
            free.push(buf);
        }
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
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }
}
