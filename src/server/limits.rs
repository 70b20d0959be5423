//! Counting limits on authenticated connections: how many may be open in all and per
//! client key, so that one client cannot crowd out the others (those still in the
//! handshake are `admission`'s).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Counts holders per key, up to a maximum each.
pub struct Tally<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    max: usize,
}

/// One place in a [`Tally`], given back on drop.
pub struct Slot<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Tally<K> {
    pub fn new(max: usize) -> Self {
        Tally {
            counts: Arc::new(Mutex::new(HashMap::new())),
            max,
        }
    }

    /// Takes a place for `key`, unless it already holds the maximum.
    pub fn try_take(&self, key: &K) -> Option<Slot<K>> {
        let mut counts = self.counts.lock().unwrap();
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.counts.clone(),
            key: key.clone(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Places held, over all keys.
    pub fn held(&self) -> usize {
        self.counts.lock().unwrap().values().sum()
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap();
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_limited_per_key_and_given_back() {
        let t = Tally::new(2);
        let a1 = t.try_take(&"a").unwrap();
        let _a2 = t.try_take(&"a").unwrap();
        assert!(t.try_take(&"a").is_none());
        let _b = t.try_take(&"b").expect("other keys are counted apart");
        drop(a1);
        assert!(t.try_take(&"a").is_some());
        assert_eq!(t.counts.lock().unwrap().len(), 2);
        assert_eq!(t.held(), 2);
    }

    #[test]
    fn empty_counts_are_forgotten() {
        let t = Tally::new(1);
        drop(t.try_take(&1u32));
        assert!(t.counts.lock().unwrap().is_empty());
    }
}
