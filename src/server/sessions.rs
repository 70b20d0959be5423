//! The session table: which sessions exist, which connection each has, who holds each
//! export read-write, and when a disconnected session is let go.
//!
//! A session outlives its connection for the linger time, so that its client can resume
//! it (and its reply cache answers resends). Sessions are bounded per client key and in
//! all; to make room, the oldest disconnected session goes first, the key's own before
//! anyone else's, and a connected one never. One session at a time holds an export
//! read-write; a restarted client (same key, its old session disconnected) takes over.
//!
//! Pure: time is an argument, values (the live sessions) are opaque.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::keys::PublicKey;
use crate::protocol::{Access, SessionId};

/// The bounds of a [`SessionTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions of one client key, connected or not.
    pub per_key: usize,
    /// Sessions in all.
    pub total: usize,
    /// How long a disconnected session is kept.
    pub linger: Duration,
}

/// What a new session is, as the table needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask<'a> {
    pub client: PublicKey,
    pub export: &'a str,
    pub access: Access,
}

/// Why a session could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another session holds the export read-write; since when it is disconnected, if it is.
    Busy { disconnected: Option<Duration> },
    /// The key has its most sessions, all connected.
    KeyFull,
    /// The server has its most sessions, all connected.
    Full,
}

/// A session that left the table, and why.
#[derive(Debug)]
pub struct Ended<V> {
    pub value: V,
    pub why: EndReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Disconnected for longer than the linger time.
    Expired,
    /// Disconnected, and its place was needed for a newer session.
    Evicted,
    /// Its client, restarted, opened a new session on the same export read-write.
    Replaced,
}

#[derive(Debug)]
struct Entry<V> {
    client: PublicKey,
    export: String,
    access: Access,
    /// The connection the session has now, if it has one.
    connection: Option<u64>,
    /// Since when it has none.
    detached_since: Instant,
    value: V,
}

/// The sessions of one server; see the module doc.
#[derive(Debug)]
pub struct SessionTable<V> {
    limits: SessionLimits,
    entries: HashMap<SessionId, Entry<V>>,
    /// The session holding each export read-write.
    writers: HashMap<String, SessionId>,
}

impl<V: Clone> SessionTable<V> {
    pub fn new(limits: SessionLimits) -> Self {
        SessionTable {
            limits,
            entries: HashMap::new(),
            writers: HashMap::new(),
        }
    }

    /// The session `id`, if it exists and is what `ask` asks for: a client resuming it.
    pub fn resume(&self, id: &SessionId, ask: &Ask) -> Option<V> {
        let e = self.entries.get(id)?;
        (e.client == ask.client && e.export == ask.export && e.access == ask.access)
            .then(|| e.value.clone())
    }

    /// Makes session `id` for `ask`, without a connection yet. Returns the sessions that
    /// had to go for it (replaced or evicted), or why it cannot be made; then nothing
    /// changed.
    pub fn create(
        &mut self,
        id: SessionId,
        ask: &Ask,
        value: V,
        now: Instant,
    ) -> Result<Vec<Ended<V>>, Refusal> {
        let mut gone = Vec::new();
        // Single writer: a restarted client takes over its own disconnected session.
        let replaced = match self.writer_of(ask) {
            None => None,
            Some((other, e)) if e.client == ask.client && e.connection.is_none() => Some(other),
            Some((_, e)) => {
                let disconnected = e
                    .connection
                    .is_none()
                    .then(|| now.saturating_duration_since(e.detached_since));
                return Err(Refusal::Busy { disconnected });
            }
        };
        let others = |t: &Self, key: Option<&PublicKey>| {
            t.entries
                .iter()
                .filter(|(sid, e)| Some(**sid) != replaced && key.is_none_or(|k| e.client == *k))
                .count()
        };
        let of_key = others(self, Some(&ask.client));
        let evict_own = of_key >= self.limits.per_key;
        let evict_any = others(self, None) >= self.limits.total;
        let victim = if evict_own || evict_any {
            let own = self.oldest_detached(Some(&ask.client), replaced);
            let any = if evict_own {
                None
            } else {
                self.oldest_detached(None, replaced)
            };
            match own.or(any) {
                Some(v) => Some(v),
                None if evict_own => return Err(Refusal::KeyFull),
                None => return Err(Refusal::Full),
            }
        } else {
            None
        };
        for (sid, why) in [
            (replaced, EndReason::Replaced),
            (victim, EndReason::Evicted),
        ] {
            if let Some(value) = sid.and_then(|sid| self.remove(&sid)) {
                gone.push(Ended { value, why });
            }
        }
        if ask.access == Access::ReadWrite {
            self.writers.insert(ask.export.to_owned(), id);
        }
        self.entries.insert(
            id,
            Entry {
                client: ask.client,
                export: ask.export.to_owned(),
                access: ask.access,
                connection: None,
                detached_since: now,
                value,
            },
        );
        Ok(gone)
    }

    /// Removes session `id`, made but not to be used after all.
    pub fn discard(&mut self, id: &SessionId) {
        self.remove(id);
    }

    /// Connection `conn` now carries session `id`.
    pub fn attach(&mut self, id: &SessionId, conn: u64) {
        if let Some(e) = self.entries.get_mut(id) {
            e.connection = Some(conn);
        }
    }

    /// Connection `conn` ended; if it still carried session `id`, the session lingers
    /// from `now`.
    pub fn detach(&mut self, id: &SessionId, conn: u64, now: Instant) {
        if let Some(e) = self.entries.get_mut(id) {
            if e.connection == Some(conn) {
                e.connection = None;
                e.detached_since = now;
            }
        }
    }

    /// Removes the sessions disconnected for longer than the linger time.
    pub fn expire(&mut self, now: Instant) -> Vec<Ended<V>> {
        let linger = self.limits.linger;
        let expired: Vec<SessionId> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.connection.is_none() && now.saturating_duration_since(e.detached_since) > linger
            })
            .map(|(id, _)| *id)
            .collect();
        expired
            .iter()
            .filter_map(|id| self.remove(id))
            .map(|value| Ended {
                value,
                why: EndReason::Expired,
            })
            .collect()
    }

    /// Every session, connected or lingering.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.values().map(|e| &e.value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sessions that have a connection now; the others linger.
    pub fn connected(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.connection.is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn writer_of(&self, ask: &Ask) -> Option<(SessionId, &Entry<V>)> {
        if ask.access != Access::ReadWrite {
            return None;
        }
        let id = self.writers.get(ask.export)?;
        Some((*id, self.entries.get(id).expect("a writer is in the table")))
    }

    /// The session disconnected longest, of `key` if given, other than `except`.
    fn oldest_detached(
        &self,
        key: Option<&PublicKey>,
        except: Option<SessionId>,
    ) -> Option<SessionId> {
        self.entries
            .iter()
            .filter(|(id, e)| {
                e.connection.is_none() && Some(**id) != except && key.is_none_or(|k| e.client == *k)
            })
            .min_by_key(|(_, e)| e.detached_since)
            .map(|(id, _)| *id)
    }

    fn remove(&mut self, id: &SessionId) -> Option<V> {
        let e = self.entries.remove(id)?;
        if self.writers.get(&e.export) == Some(id) {
            self.writers.remove(&e.export);
        }
        Some(e.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SessionLimits = SessionLimits {
        per_key: 2,
        total: 3,
        linger: Duration::from_secs(120),
    };

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn ask(n: u8, export: &str, access: Access) -> Ask<'_> {
        Ask {
            client: key(n),
            export,
            access,
        }
    }

    fn id(n: u8) -> SessionId {
        [n; 16]
    }

    /// Creates session `n` and gives it connection `n`.
    fn open(
        t: &mut SessionTable<u8>,
        n: u8,
        a: &Ask,
        now: Instant,
    ) -> Result<Vec<(u8, EndReason)>, Refusal> {
        let gone = t.create(id(n), a, n, now)?;
        t.attach(&id(n), n as u64);
        Ok(gone.into_iter().map(|e| (e.value, e.why)).collect())
    }

    #[test]
    fn one_writer_an_export_and_a_restarted_client_takes_over() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(LIMITS);
        let rw = ask(1, "disk", Access::ReadWrite);
        assert_eq!(open(&mut t, 1, &rw, t0), Ok(vec![]));
        let other = ask(2, "disk", Access::ReadWrite);
        assert_eq!(
            open(&mut t, 2, &other, t0),
            Err(Refusal::Busy { disconnected: None })
        );
        // Readers and other exports are not held up.
        assert_eq!(
            open(&mut t, 3, &ask(2, "disk", Access::ReadOnly), t0),
            Ok(vec![])
        );
        // The same client, restarted: while its session is connected it is busy too.
        assert!(open(&mut t, 4, &rw, t0).is_err());
        t.detach(&id(1), 1, t0);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            open(&mut t, 2, &other, later),
            Err(Refusal::Busy {
                disconnected: Some(Duration::from_secs(5))
            }),
            "another key waits for the linger time"
        );
        assert_eq!(
            open(&mut t, 4, &rw, later),
            Ok(vec![(1, EndReason::Replaced)])
        );
        assert!(t.resume(&id(1), &rw).is_none());
        assert_eq!(t.resume(&id(4), &rw), Some(4));
        assert_eq!(
            t.resume(&id(4), &ask(1, "disk", Access::ReadOnly)),
            None,
            "same access only"
        );
        assert_eq!(
            t.resume(&id(4), &ask(9, "disk", Access::ReadWrite)),
            None,
            "same key only"
        );
    }

    #[test]
    fn sessions_expire_after_the_linger_time_and_release_the_export() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(LIMITS);
        let rw = ask(1, "disk", Access::ReadWrite);
        open(&mut t, 1, &rw, t0).unwrap();
        t.detach(&id(1), 99, t0);
        assert!(
            t.expire(t0 + Duration::from_secs(500)).is_empty(),
            "not its connection"
        );
        t.detach(&id(1), 1, t0);
        assert!(t.expire(t0 + LIMITS.linger).is_empty());
        let ended = t.expire(t0 + LIMITS.linger + Duration::from_secs(1));
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].why, EndReason::Expired);
        assert!(t.is_empty());
        assert_eq!(
            open(&mut t, 2, &ask(2, "disk", Access::ReadWrite), t0),
            Ok(vec![])
        );
    }

    #[test]
    fn a_key_at_its_cap_loses_its_oldest_disconnected_session_first() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(LIMITS);
        let ro = ask(1, "disk", Access::ReadOnly);
        open(&mut t, 1, &ro, t0).unwrap();
        open(&mut t, 2, &ro, t0).unwrap();
        assert_eq!(
            open(&mut t, 3, &ro, t0),
            Err(Refusal::KeyFull),
            "all connected"
        );
        t.detach(&id(2), 2, t0);
        t.detach(&id(1), 1, t0 + Duration::from_secs(1));
        assert_eq!(open(&mut t, 3, &ro, t0), Ok(vec![(2, EndReason::Evicted)]));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_server_takes_the_key_s_own_lingering_session_before_another_s() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(LIMITS);
        open(&mut t, 1, &ask(1, "disk", Access::ReadOnly), t0).unwrap();
        open(&mut t, 2, &ask(2, "disk", Access::ReadOnly), t0).unwrap();
        open(&mut t, 3, &ask(3, "disk", Access::ReadOnly), t0).unwrap();
        assert_eq!(
            open(&mut t, 4, &ask(3, "disk", Access::ReadOnly), t0),
            Err(Refusal::Full)
        );
        t.detach(&id(1), 1, t0);
        t.detach(&id(3), 3, t0 + Duration::from_secs(1));
        // Key 3's own session goes, though key 1's has lingered longer.
        assert_eq!(
            open(&mut t, 4, &ask(3, "disk", Access::ReadOnly), t0),
            Ok(vec![(3, EndReason::Evicted)])
        );
        // A key with none of its own lingering takes the oldest of anyone's.
        t.detach(&id(2), 2, t0 + Duration::from_secs(2));
        assert_eq!(
            open(&mut t, 5, &ask(5, "disk", Access::ReadOnly), t0),
            Ok(vec![(1, EndReason::Evicted)])
        );
    }

    #[test]
    fn a_takeover_at_the_key_s_cap_needs_no_eviction() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(LIMITS);
        let rw = ask(1, "disk", Access::ReadWrite);
        open(&mut t, 1, &rw, t0).unwrap();
        open(&mut t, 2, &ask(1, "disk", Access::ReadOnly), t0).unwrap();
        t.detach(&id(1), 1, t0);
        assert_eq!(open(&mut t, 3, &rw, t0), Ok(vec![(1, EndReason::Replaced)]));
        assert_eq!(t.resume(&id(2), &ask(1, "disk", Access::ReadOnly)), Some(2));
    }
}
