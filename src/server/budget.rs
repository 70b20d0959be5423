//! The server's memory budget: what the requests of every session may hold at once
//! (write payloads waiting for the disk, read data and replies waiting for the socket).
//!
//! Four bounds apply to each request, all in one [`Ledger`]: the whole server's budget,
//! the share of one client key (which all of that key's sessions draw from), the
//! session's window (bytes, and a count of requests), and, so that no tenant can starve
//! another by filling the budget, a reserve of one request's room that every open
//! connection has taken from the budget when it was admitted and may always use. A
//! request that fits nowhere waits, and its connection is not read meanwhile: under
//! pressure the server slows senders instead of growing.
//!
//! The ledger is pure; [`Budget`] puts it behind a lock and lets readers wait for room.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::keys::PublicKey;
use crate::protocol::SessionId;

/// The bounds of a [`Ledger`], in bytes unless said otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// All requests of all sessions, with the connections' reserves.
    pub total: usize,
    /// All requests of one client key's sessions, reserves apart.
    pub per_key: usize,
    /// One session's requests.
    pub session_bytes: usize,
    /// One session's requests, counted.
    pub session_requests: usize,
    /// What each connection reserves when it is admitted: room for one request.
    pub reserve: usize,
    /// What each connection costs besides, for its buffers and threads.
    pub overhead: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Use {
    bytes: usize,
    requests: usize,
}

#[derive(Debug)]
struct Reserve {
    busy: bool,
    /// The connection closed while its reserve was in use: free it when released.
    closed: bool,
}

/// What a request took, to give back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge<K, S> {
    key: K,
    session: S,
    bytes: usize,
    /// The connection whose reserve it took, rather than the shared budget.
    reserve: Option<u64>,
}

/// The accounting of the budget; see the module doc.
#[derive(Debug)]
pub struct Ledger<K, S> {
    bounds: Bounds,
    /// Bytes charged to the shared part of the budget.
    shared: usize,
    /// Reserves of open connections (and of closed ones still in use).
    reserved: usize,
    keys: HashMap<K, usize>,
    sessions: HashMap<S, Use>,
    reserves: HashMap<u64, Reserve>,
}

impl<K: Hash + Eq + Clone, S: Hash + Eq + Clone> Ledger<K, S> {
    pub fn new(bounds: Bounds) -> Self {
        Ledger {
            bounds,
            shared: 0,
            reserved: 0,
            keys: HashMap::new(),
            sessions: HashMap::new(),
            reserves: HashMap::new(),
        }
    }

    /// Admits connection `conn`, taking its reserve; false if the budget has no room
    /// for it.
    pub fn open(&mut self, conn: u64) -> bool {
        let cost = self.bounds.reserve + self.bounds.overhead;
        if self.shared + self.reserved + cost > self.bounds.total {
            return false;
        }
        self.reserved += cost;
        self.reserves.insert(
            conn,
            Reserve {
                busy: false,
                closed: false,
            },
        );
        true
    }

    /// Gives back the reserve of `conn`, or marks it to be given back when the request
    /// using it is released.
    pub fn close(&mut self, conn: u64) {
        match self.reserves.get_mut(&conn) {
            Some(r) if r.busy => r.closed = true,
            Some(_) => {
                self.reserves.remove(&conn);
                self.reserved -= self.bounds.reserve + self.bounds.overhead;
            }
            None => {}
        }
    }

    /// Takes room for a request of `bytes` (at most the session's window) of `session`
    /// of `key` on connection `conn`, if every bound allows it.
    pub fn charge(
        &mut self,
        key: &K,
        session: &S,
        conn: u64,
        bytes: usize,
    ) -> Option<Charge<K, S>> {
        let b = self.bounds;
        let bytes = bytes.min(b.session_bytes);
        let used = self.sessions.get(session).copied().unwrap_or_default();
        if used.requests >= b.session_requests || used.bytes + bytes > b.session_bytes {
            return None;
        }
        let of_key = self.keys.get(key).copied().unwrap_or(0);
        let reserve =
            if self.shared + self.reserved + bytes <= b.total && of_key + bytes <= b.per_key {
                self.shared += bytes;
                *self.keys.entry(key.clone()).or_insert(0) += bytes;
                None
            } else {
                match self.reserves.get_mut(&conn) {
                    Some(r) if !r.busy && !r.closed && bytes <= b.reserve => r.busy = true,
                    _ => return None,
                }
                Some(conn)
            };
        let used = self.sessions.entry(session.clone()).or_default();
        used.bytes += bytes;
        used.requests += 1;
        Some(Charge {
            key: key.clone(),
            session: session.clone(),
            bytes,
            reserve,
        })
    }

    /// Gives back what `charge` took.
    pub fn release(&mut self, charge: &Charge<K, S>) {
        if let Some(used) = self.sessions.get_mut(&charge.session) {
            used.bytes -= charge.bytes;
            used.requests -= 1;
            if used.requests == 0 {
                self.sessions.remove(&charge.session);
            }
        }
        match charge.reserve {
            Some(conn) => {
                if let Some(r) = self.reserves.get_mut(&conn) {
                    r.busy = false;
                    if r.closed {
                        self.close(conn);
                    }
                }
            }
            None => {
                self.shared -= charge.bytes;
                if let Some(n) = self.keys.get_mut(&charge.key) {
                    *n -= charge.bytes;
                    if *n == 0 {
                        self.keys.remove(&charge.key);
                    }
                }
            }
        }
    }

    /// Bytes held, reserves included.
    pub fn in_use(&self) -> usize {
        self.shared + self.reserved
    }
}

/// The server's [`Ledger`], shared by every connection, with waiting for room.
pub struct Budget {
    ledger: Mutex<Ledger<PublicKey, SessionId>>,
    freed: event_listener::Event,
}

/// A connection's place in the budget (its reserve), given back on drop.
pub struct Admission {
    budget: Arc<Budget>,
    conn: u64,
}

/// Room taken for one request, given back on drop (once its reply is sent).
pub struct Permit {
    budget: Arc<Budget>,
    charge: Charge<PublicKey, SessionId>,
}

impl Budget {
    pub fn new(bounds: Bounds) -> Arc<Budget> {
        Arc::new(Budget {
            ledger: Mutex::new(Ledger::new(bounds)),
            freed: event_listener::Event::new(),
        })
    }

    /// Admits connection `conn` if the budget has room for its reserve.
    pub fn admit(self: &Arc<Self>, conn: u64) -> Option<Admission> {
        self.ledger.lock().unwrap().open(conn).then(|| Admission {
            budget: self.clone(),
            conn,
        })
    }

    /// Waits until a request of `bytes` fits, and takes its room.
    pub async fn acquire(
        self: &Arc<Self>,
        key: &PublicKey,
        session: &SessionId,
        conn: u64,
        bytes: usize,
    ) -> Permit {
        loop {
            let freed = self.freed.listen();
            if let Some(charge) = self
                .ledger
                .lock()
                .unwrap()
                .charge(key, session, conn, bytes)
            {
                return Permit {
                    budget: self.clone(),
                    charge,
                };
            }
            freed.await;
        }
    }

    /// Bytes held, reserves included.
    pub fn in_use(&self) -> usize {
        self.ledger.lock().unwrap().in_use()
    }

    fn freed(&self) {
        self.freed.notify(usize::MAX);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.budget.ledger.lock().unwrap().close(self.conn);
        self.budget.freed();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.ledger.lock().unwrap().release(&self.charge);
        self.budget.freed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn bounds() -> Bounds {
        Bounds {
            total: 16 * MIB,
            per_key: 8 * MIB,
            session_bytes: 6 * MIB,
            session_requests: 4,
            reserve: MIB,
            overhead: 0,
        }
    }

    #[test]
    fn a_session_is_held_to_its_window_in_bytes_and_in_requests() {
        let mut l = Ledger::new(bounds());
        assert!(l.open(1));
        let big: Vec<_> = (0..3)
            .map(|_| l.charge(&"k", &"s", 1, 2 * MIB).unwrap())
            .collect();
        assert!(l.charge(&"k", &"s", 1, 1).is_none(), "6 MiB window full");
        l.release(&big[0]);
        let small: Vec<_> = (0..2)
            .map(|_| l.charge(&"k", &"s", 1, 1).unwrap())
            .collect();
        assert!(l.charge(&"k", &"s", 1, 1).is_none(), "4 requests at most");
        for c in big[1..].iter().chain(&small) {
            l.release(c);
        }
        assert_eq!(l.in_use(), MIB, "only the connection's reserve is left");
        l.close(1);
        assert_eq!(l.in_use(), 0);
    }

    #[test]
    fn a_key_shares_its_part_among_its_sessions_then_uses_reserves() {
        let mut l = Ledger::new(bounds());
        assert!(l.open(1) && l.open(2));
        let a = l.charge(&"k", &"a", 1, 4 * MIB).unwrap();
        let b = l.charge(&"k", &"b", 2, 4 * MIB).unwrap();
        assert!(a.reserve.is_none() && b.reserve.is_none());
        // The key's 8 MiB are used: each connection may still run one request.
        let ra = l.charge(&"k", &"a", 1, MIB).unwrap();
        assert_eq!(ra.reserve, Some(1));
        assert!(
            l.charge(&"k", &"a", 1, MIB).is_none(),
            "one reserve a connection"
        );
        assert!(
            l.charge(&"k", &"b", 2, 2 * MIB).is_none(),
            "a reserve is one request's room"
        );
        // Another key is not held up by the first.
        assert!(l.open(3));
        assert!(l
            .charge(&"other", &"c", 3, 2 * MIB)
            .unwrap()
            .reserve
            .is_none());
        l.release(&ra);
        assert!(
            l.charge(&"k", &"a", 1, MIB).is_some(),
            "the reserve is free again"
        );
    }

    #[test]
    fn greedy_keys_cannot_starve_a_newcomer() {
        let mut l = Ledger::new(bounds());
        assert!(l.open(9));
        for (conn, key) in [(1, "x"), (2, "y")] {
            assert!(l.open(conn));
            while l.charge(&key, &key, conn, MIB).is_some() {}
        }
        assert!(l.in_use() <= 16 * MIB, "the total holds: {}", l.in_use());
        // Whatever the others hold, an admitted connection always has its reserve.
        assert!(l.charge(&"newcomer", &"n", 9, MIB).is_some());
    }

    #[test]
    fn connections_are_admitted_while_their_reserves_fit() {
        let mut l = Ledger::<&str, &str>::new(bounds());
        let admitted = (0..100).filter(|&c| l.open(c)).count();
        assert_eq!(admitted, 16);
        let mut l = Ledger::<&str, &str>::new(Bounds {
            overhead: MIB,
            ..bounds()
        });
        assert_eq!(
            (0..100).filter(|&c| l.open(c)).count(),
            8,
            "overhead counts"
        );
        l.close(0);
        assert!(l.open(100));
    }

    #[test]
    fn a_reserve_in_use_is_freed_when_its_request_is_done() {
        let mut l = Ledger::new(bounds());
        assert!(l.open(1));
        let hog = l.charge(&"k", &"s", 1, 6 * MIB).unwrap();
        let other = l.charge(&"k", &"t", 1, 2 * MIB).unwrap();
        let r = l.charge(&"k", &"u", 1, MIB).unwrap();
        assert_eq!(r.reserve, Some(1));
        l.close(1);
        assert_eq!(l.in_use(), 9 * MIB, "still in use");
        l.release(&r);
        l.release(&hog);
        l.release(&other);
        assert_eq!(l.in_use(), 0);
    }
}
