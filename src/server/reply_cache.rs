//! The reply cache of one session: what the server knows about the transactions it has
//! seen, so that a resent transaction is answered, or joined, instead of run again.
//!
//! A resent write must never execute after a newer write to the same range completed;
//! remembering every transaction id above the client's floor makes that hold. The client
//! sends its floor (the lowest id it still waits for) with every request, and entries
//! below it are forgotten, so the cache holds at most the client's window.

use std::collections::BTreeMap;

/// What to do with an arriving request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// New (or a read, which is safe to repeat): execute it.
    Execute,
    /// Already executing: its reply will be sent when it completes.
    Join,
    /// Already executed: answer with this status, do not execute.
    Answer(u32),
    /// Below the client's floor: the client has its answer; drop the request.
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Executing,
    Done(u32),
}

/// Transaction states of one session, keyed by transaction id.
#[derive(Debug)]
pub struct ReplyCache {
    entries: BTreeMap<u64, Entry>,
    floor: u64,
    capacity: usize,
}

impl ReplyCache {
    /// A cache that keeps at most `capacity` entries even if the client never raises
    /// its floor; `capacity` should be well above the client's window.
    pub fn new(capacity: usize) -> Self {
        ReplyCache {
            entries: BTreeMap::new(),
            floor: 0,
            capacity,
        }
    }

    /// Registers an arriving transaction. `repeatable` requests (reads) that already
    /// completed are executed again, since their data is not kept.
    pub fn admit(&mut self, txid: u64, floor: u64, repeatable: bool) -> Admit {
        self.raise_floor(floor);
        if txid < self.floor {
            return Admit::Stale;
        }
        match self.entries.get(&txid) {
            Some(Entry::Executing) => Admit::Join,
            Some(Entry::Done(_)) if repeatable => {
                self.entries.insert(txid, Entry::Executing);
                Admit::Execute
            }
            Some(Entry::Done(status)) => Admit::Answer(*status),
            None => {
                self.entries.insert(txid, Entry::Executing);
                self.evict();
                Admit::Execute
            }
        }
    }

    /// Records the outcome of an executed transaction.
    pub fn complete(&mut self, txid: u64, status: u32) {
        if let Some(e) = self.entries.get_mut(&txid) {
            *e = Entry::Done(status);
        }
    }

    /// Number of transactions still executing.
    #[cfg(test)]
    pub fn executing(&self) -> usize {
        self.entries
            .values()
            .filter(|e| **e == Entry::Executing)
            .count()
    }

    /// Entries held: the client's window, at most the capacity.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.entries.len()
    }

    fn raise_floor(&mut self, floor: u64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        // Executing entries stay until they complete; their ids are below the floor only
        // if the client gave up on them, and their completion is then just dropped.
        let keep = self.entries.split_off(&floor);
        let below = std::mem::replace(&mut self.entries, keep);
        self.entries
            .extend(below.into_iter().filter(|(_, e)| *e == Entry::Executing));
    }

    /// Forgets the oldest completed entries of a client that does not raise its floor.
    fn evict(&mut self) {
        while self.entries.len() > self.capacity {
            let oldest = self
                .entries
                .iter()
                .find(|(_, e)| matches!(e, Entry::Done(_)))
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => {
                    self.entries.remove(&id);
                    self.floor = self.floor.max(id + 1);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_transactions_execute_once() {
        let mut c = ReplyCache::new(16);
        assert_eq!(c.admit(1, 1, false), Admit::Execute);
        assert_eq!(c.admit(1, 1, false), Admit::Join);
        c.complete(1, 0);
        assert_eq!(c.admit(1, 1, false), Admit::Answer(0));
    }

    #[test]
    fn errors_are_remembered() {
        let mut c = ReplyCache::new(16);
        c.admit(5, 1, false);
        c.complete(5, libc::ENOSPC as u32);
        assert_eq!(c.admit(5, 1, false), Admit::Answer(libc::ENOSPC as u32));
    }

    #[test]
    fn completed_reads_run_again() {
        let mut c = ReplyCache::new(16);
        c.admit(2, 1, true);
        c.complete(2, 0);
        assert_eq!(c.admit(2, 1, true), Admit::Execute);
        assert_eq!(c.admit(2, 1, true), Admit::Join);
    }

    #[test]
    fn floor_forgets_and_makes_older_ids_stale() {
        let mut c = ReplyCache::new(16);
        for id in 1..=4 {
            c.admit(id, 1, false);
            c.complete(id, 0);
        }
        assert_eq!(c.admit(5, 4, false), Admit::Execute);
        assert_eq!(c.held(), 2); // 4 and 5
        assert_eq!(c.admit(2, 4, false), Admit::Stale);
        assert_eq!(c.admit(4, 4, false), Admit::Answer(0));
    }

    #[test]
    fn executing_entries_survive_the_floor() {
        let mut c = ReplyCache::new(16);
        c.admit(1, 1, false);
        c.admit(2, 1, false);
        c.complete(2, 0);
        c.admit(3, 3, false);
        assert_eq!(c.executing(), 2); // 1 and 3
        c.complete(1, 0);
        assert_eq!(c.executing(), 1);
    }

    #[test]
    fn capacity_bounds_a_client_that_never_raises_its_floor() {
        let mut c = ReplyCache::new(8);
        for id in 1..=100 {
            assert_eq!(c.admit(id, 0, false), Admit::Execute);
            c.complete(id, 0);
        }
        assert!(c.held() <= 8);
        assert_eq!(c.admit(50, 0, false), Admit::Stale);
        assert_eq!(c.admit(100, 0, false), Admit::Answer(0));
    }
}
