//! Admission of connections that have not authenticated yet: what a stranger can make the
//! server spend before it proves its key. Three decisions, each sans-I/O (time is passed
//! in):
//!
//! - [`Handshakes`]: the table of connections in the handshake, capped in all and per
//!   address prefix. A full table makes room by dropping its oldest entry, so a flood of
//!   idle connections only ever delays the newest comers by the handshake they are in;
//!   authenticated connections are not in the table and are never dropped for it.
//! - [`Rates`]: a token bucket of handshake attempts per prefix, so one prefix cannot
//!   spend the handshake threads' CPU on X25519 for garbage.
//! - [`RefusalLog`]: one line for the first refusal of a kind, then a summary at most
//!   every [`RefusalLog::EVERY`], so a flood cannot fill the log either.
//!
//! Peers are grouped by [`Prefix`] (a /24 or /64), as one host usually holds a whole one.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The network a peer address belongs to for limits: its /24 for IPv4, its /64 for IPv6;
/// an IPv4-mapped IPv6 address counts as the IPv4 address it maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix(IpAddr);

impl Prefix {
    pub fn of(ip: IpAddr) -> Prefix {
        let v4 = |a: Ipv4Addr| {
            let [a, b, c, _] = a.octets();
            Prefix(IpAddr::V4(Ipv4Addr::new(a, b, c, 0)))
        };
        match ip {
            IpAddr::V4(a) => v4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(m) => v4(m),
                None => Prefix(IpAddr::V6(Ipv6Addr::from(
                    u128::from(a) & !((1u128 << 64) - 1),
                ))),
            },
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}/24"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Connections in the handshake: at most `max` in all and `per_prefix` from one prefix.
pub struct Handshakes {
    table: Arc<Mutex<Table>>,
    max: usize,
    per_prefix: usize,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// By admission order, so the first entry is the oldest.
    entries: BTreeMap<u64, Entry>,
    per_prefix: HashMap<Prefix, usize>,
}

struct Entry {
    peer: IpAddr,
    eviction: Arc<Eviction>,
}

#[derive(Default)]
struct Eviction {
    evicted: AtomicBool,
    event: event_listener::Event,
}

/// A connection's place in [`Handshakes`], given back on drop (when it authenticates or
/// ends). Its task awaits [`evicted`](Self::evicted) to end when the place is taken away.
pub struct HandshakeSlot {
    table: Arc<Mutex<Table>>,
    id: u64,
    eviction: Arc<Eviction>,
}

/// What [`Handshakes::admit`] decided.
pub enum Admitted {
    /// In, with the address of the oldest connection dropped to make room, if one was.
    In(HandshakeSlot, Option<IpAddr>),
    /// The peer's prefix holds its most already; the connection is to be closed at once.
    PrefixFull,
}

impl Handshakes {
    pub fn new(max: usize, per_prefix: usize) -> Self {
        Handshakes {
            table: Arc::default(),
            // A table that admits no one would refuse every client.
            max: max.max(1),
            per_prefix: per_prefix.max(1),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn per_prefix(&self) -> usize {
        self.per_prefix
    }

    /// Connections in the handshake now.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a place for a connection from `peer`, dropping the oldest if the table is full.
    pub fn admit(&self, peer: IpAddr) -> Admitted {
        let prefix = Prefix::of(peer);
        let mut t = self.table.lock().unwrap();
        if t.per_prefix.get(&prefix).copied().unwrap_or(0) >= self.per_prefix {
            return Admitted::PrefixFull;
        }
        let evicted = if t.entries.len() >= self.max {
            t.pop_oldest().map(|old| {
                old.eviction.evicted.store(true, Ordering::SeqCst);
                old.eviction.event.notify(usize::MAX);
                old.peer
            })
        } else {
            None
        };
        let id = t.next;
        t.next += 1;
        let eviction = Arc::new(Eviction::default());
        t.entries.insert(
            id,
            Entry {
                peer,
                eviction: eviction.clone(),
            },
        );
        *t.per_prefix.entry(prefix).or_insert(0) += 1;
        Admitted::In(
            HandshakeSlot {
                table: self.table.clone(),
                id,
                eviction,
            },
            evicted,
        )
    }
}

impl Table {
    fn pop_oldest(&mut self) -> Option<Entry> {
        let (_, old) = self.entries.pop_first()?;
        self.forget(old.peer);
        Some(old)
    }

    fn forget(&mut self, peer: IpAddr) {
        let prefix = Prefix::of(peer);
        if let Some(n) = self.per_prefix.get_mut(&prefix) {
            *n -= 1;
            if *n == 0 {
                self.per_prefix.remove(&prefix);
            }
        }
    }
}

impl HandshakeSlot {
    pub fn is_evicted(&self) -> bool {
        self.eviction.evicted.load(Ordering::SeqCst)
    }

    /// Resolves once the place has been given to a newer connection.
    pub async fn evicted(&self) {
        loop {
            let listener = self.eviction.event.listen();
            if self.is_evicted() {
                return;
            }
            listener.await;
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap();
        // An evicted entry has been forgotten already.
        if let Some(entry) = t.entries.remove(&self.id) {
            t.forget(entry.peer);
        }
    }
}

/// Handshake attempts per prefix, as token buckets.
pub struct Rates {
    buckets: HashMap<Prefix, Bucket>,
    last_sweep: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Rates {
    /// Attempts per second one prefix may sustain: far above any honest reconnect rate
    /// (a client reconnects with backoff), well below what costs a core: 1,600 a second
    /// from one address took about one, so this is about 1% of one per prefix.
    pub const RATE: f64 = 20.0;
    /// Attempts one prefix may make at once: a host mounting many exports after a boot.
    pub const BURST: f64 = 40.0;
    /// Prefixes tracked at most (under 64 bytes each, 4 MiB in all). A bucket that has refilled is the
    /// same as none and is swept when this is reached; past it, new prefixes are refused
    /// until a sweep (at most one a second) finds full buckets. Reaching it takes this
    /// many prefixes each attempting within the refill time, BURST / RATE = 2 s.
    pub const MAX_PREFIXES: usize = 1 << 16;

    pub fn new() -> Self {
        Rates {
            buckets: HashMap::new(),
            last_sweep: None,
        }
    }

    /// Takes a token for an attempt from `prefix` at `now`; false if it has none left.
    pub fn allow(&mut self, prefix: Prefix, now: Instant) -> bool {
        if !self.buckets.contains_key(&prefix) && self.buckets.len() >= Self::MAX_PREFIXES {
            if self
                .last_sweep
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
            {
                return false;
            }
            self.last_sweep = Some(now);
            self.buckets.retain(|_, b| b.refilled(now) < Self::BURST);
            if self.buckets.len() >= Self::MAX_PREFIXES {
                return false;
            }
        }
        let b = self.buckets.entry(prefix).or_insert(Bucket {
            tokens: Self::BURST,
            at: now,
        });
        b.tokens = b.refilled(now);
        b.at = now.max(b.at);
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }
}

impl Default for Rates {
    fn default() -> Self {
        Self::new()
    }
}

impl Bucket {
    fn refilled(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + dt * Rates::RATE).min(Rates::BURST)
    }
}

/// Kinds of refusal, each summarised on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Over its prefix's handshake rate.
    Rate,
    /// Its prefix holds `--max-handshakes-per-prefix` handshakes.
    PrefixFull,
    /// The oldest handshake, dropped for a newer one at `--max-handshakes`.
    Evicted,
    /// No first handshake message within `--first-flight-timeout`.
    FirstFlight,
    /// Handshake and negotiation not done within `--handshake-timeout`.
    Timeout,
    /// A handshake that failed: not a dst client, a wrong key, a client not allowed.
    Failed,
}

impl Kind {
    /// What one of these is, and what several are, in a summary.
    fn nouns(self) -> (&'static str, &'static str) {
        match self {
            Kind::Rate | Kind::PrefixFull => ("connection refused", "connections refused"),
            Kind::Evicted => ("handshake dropped", "handshakes dropped"),
            Kind::FirstFlight | Kind::Timeout => ("handshake timed out", "handshakes timed out"),
            Kind::Failed => ("handshake failed", "handshakes failed"),
        }
    }

    /// Limits at work are worth a warning; failed handshakes are the peers' business.
    pub fn level(self) -> log::Level {
        match self {
            Kind::Rate | Kind::PrefixFull | Kind::Evicted => log::Level::Warn,
            Kind::FirstFlight | Kind::Timeout | Kind::Failed => log::Level::Info,
        }
    }
}

/// Log lines about refusals, at most one per kind every [`EVERY`](Self::EVERY) after the
/// first, each counting those it stands for.
#[derive(Default)]
pub struct RefusalLog {
    kinds: HashMap<Kind, Suppressed>,
}

struct Suppressed {
    last_line: Instant,
    count: u64,
    latest: String,
}

impl RefusalLog {
    pub const EVERY: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Self::default()
    }

    /// Notes a refusal described by `what` (the peer and the reason); returns the line
    /// to log now, if one is due.
    pub fn note(&mut self, kind: Kind, what: String, now: Instant) -> Option<String> {
        let (one, _) = kind.nouns();
        let Some(s) = self.kinds.get_mut(&kind) else {
            self.kinds.insert(
                kind,
                Suppressed {
                    last_line: now,
                    count: 0,
                    latest: String::new(),
                },
            );
            return Some(format!(
                "{one}: {what} (more are summarised every {}s)",
                Self::EVERY.as_secs()
            ));
        };
        if now.saturating_duration_since(s.last_line) < Self::EVERY {
            s.count += 1;
            s.latest = what;
            return None;
        }
        s.last_line = now;
        if s.count == 0 {
            return Some(format!("{one}: {what}"));
        }
        let n = std::mem::take(&mut s.count) + 1;
        s.latest.clear();
        Some(summary(kind, n, &what))
    }

    /// Summaries of what has been held back for [`EVERY`](Self::EVERY) or longer, so a
    /// flood that stops is still counted.
    pub fn flush(&mut self, now: Instant) -> Vec<(Kind, String)> {
        let mut lines = Vec::new();
        for (&kind, s) in &mut self.kinds {
            if s.count > 0 && now.saturating_duration_since(s.last_line) >= Self::EVERY {
                lines.push((kind, summary(kind, s.count, &s.latest)));
                s.count = 0;
                s.last_line = now;
                s.latest.clear();
            }
        }
        lines
    }
}

fn summary(kind: Kind, n: u64, latest: &str) -> String {
    let (one, many) = kind.nouns();
    let noun = if n == 1 { one } else { many };
    format!("{n} more {noun} since the last line; the latest: {latest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admit(h: &Handshakes, peer: &str) -> (HandshakeSlot, Option<IpAddr>) {
        match h.admit(ip(peer)) {
            Admitted::In(slot, evicted) => (slot, evicted),
            Admitted::PrefixFull => panic!("{peer} refused"),
        }
    }

    #[test]
    fn prefixes_are_a_24_or_a_64_and_mapped_v4_is_v4() {
        let p = |s| Prefix::of(ip(s));
        assert_eq!(p("10.1.2.3"), p("10.1.2.200"));
        assert_ne!(p("10.1.2.3"), p("10.1.3.3"));
        assert_eq!(p("10.1.2.3").to_string(), "10.1.2.0/24");
        assert_eq!(p("2001:db8:1:2:aaaa::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("2001:db8:1:2:3:4:5:6").to_string(), "2001:db8:1:2::/64");
        assert_eq!(p("::ffff:10.1.2.3"), p("10.1.2.99"));
        assert_eq!(p("::ffff:10.1.2.3").to_string(), "10.1.2.0/24");
    }

    #[test]
    fn a_full_table_drops_its_oldest_first() {
        let h = Handshakes::new(3, 16);
        let (a, _) = admit(&h, "10.0.1.1");
        let (b, _) = admit(&h, "10.0.2.1");
        let (c, _) = admit(&h, "10.0.3.1");
        let (d, evicted) = admit(&h, "10.0.4.1");
        assert_eq!(evicted, Some(ip("10.0.1.1")));
        assert!(a.is_evicted() && !b.is_evicted() && !c.is_evicted() && !d.is_evicted());
        let (_e, evicted) = admit(&h, "10.0.5.1");
        assert_eq!(evicted, Some(ip("10.0.2.1")));
        assert!(b.is_evicted());
        assert_eq!(h.len(), 3);
        // A place given back, even an evicted one's, leaves room without evicting.
        drop((a, b, c));
        assert_eq!(h.len(), 2);
        let (_f, evicted) = admit(&h, "10.0.6.1");
        assert_eq!(evicted, None);
        assert!(!d.is_evicted());
    }

    #[test]
    fn a_prefix_over_its_share_is_refused_and_others_are_not() {
        let h = Handshakes::new(100, 2);
        let (a, _) = admit(&h, "10.0.1.1");
        let (_b, _) = admit(&h, "10.0.1.2");
        assert!(matches!(h.admit(ip("10.0.1.3")), Admitted::PrefixFull));
        assert!(matches!(
            h.admit(ip("::ffff:10.0.1.4")),
            Admitted::PrefixFull
        ));
        let (_c, _) = admit(&h, "10.0.2.1");
        let (_d, _) = admit(&h, "2001:db8::1");
        let (_e, _) = admit(&h, "2001:db8::2");
        assert!(matches!(
            h.admit(ip("2001:db8::ffff:1")),
            Admitted::PrefixFull
        ));
        let (_f, _) = admit(&h, "2001:db8:0:1::1");
        drop(a);
        let (_g, _) = admit(&h, "10.0.1.3");
    }

    #[test]
    fn an_evicted_slot_no_longer_counts_for_its_prefix() {
        let h = Handshakes::new(2, 2);
        let (a, _) = admit(&h, "10.0.1.1");
        let (b, _) = admit(&h, "10.0.1.2");
        assert!(matches!(h.admit(ip("10.0.1.3")), Admitted::PrefixFull));
        let (_c, evicted) = admit(&h, "10.0.2.1");
        assert_eq!(evicted, Some(ip("10.0.1.1")));
        let (_d, evicted) = admit(&h, "10.0.1.3");
        assert_eq!(evicted, Some(ip("10.0.1.2")));
        // Already forgotten: dropping them must not free places a second time.
        drop((a, b));
        let (_e, _) = admit(&h, "10.0.1.4");
        assert!(matches!(h.admit(ip("10.0.1.5")), Admitted::PrefixFull));
    }

    #[test]
    fn eviction_wakes_the_slots_task() {
        let h = Handshakes::new(1, 1);
        let (a, _) = admit(&h, "10.0.1.1");
        let (_b, _) = admit(&h, "10.0.2.1");
        smol::block_on(a.evicted());
    }

    #[test]
    fn buckets_allow_a_burst_then_the_rate() {
        let mut r = Rates::new();
        let t0 = Instant::now();
        let p = Prefix::of(ip("10.0.0.1"));
        let other = Prefix::of(ip("10.0.1.1"));
        let burst = (0..100).take_while(|_| r.allow(p, t0)).count();
        assert_eq!(burst, Rates::BURST as usize);
        assert!(r.allow(other, t0), "other prefixes have their own bucket");
        assert!(!r.allow(p, t0 + Duration::from_millis(10)));
        // One token every 1/RATE seconds.
        let t1 = t0 + Duration::from_millis(1000 / Rates::RATE as u64 + 1);
        assert!(r.allow(p, t1));
        assert!(!r.allow(p, t1));
        let second = t1 + Duration::from_secs(1);
        let n = (0..100).take_while(|_| r.allow(p, second)).count();
        assert_eq!(n, Rates::RATE as usize);
        // Refilled to the burst, not beyond.
        let later = second + Duration::from_secs(60);
        let n = (0..1000).take_while(|_| r.allow(p, later)).count();
        assert_eq!(n, Rates::BURST as usize);
    }

    #[test]
    fn a_time_earlier_than_the_last_does_not_refill_or_panic() {
        let mut r = Rates::new();
        let t0 = Instant::now() + Duration::from_secs(10);
        let p = Prefix::of(ip("10.0.0.1"));
        while r.allow(p, t0) {}
        assert!(!r.allow(p, t0 - Duration::from_secs(5)));
        assert!(!r.allow(p, t0));
    }

    #[test]
    fn the_first_refusal_is_logged_then_summaries_count_the_rest() {
        let mut log = RefusalLog::new();
        let t0 = Instant::now();
        let first = log.note(Kind::PrefixFull, "from A".into(), t0).unwrap();
        assert!(first.starts_with("connection refused: from A"), "{first}");
        for i in 1..=9 {
            let t = t0 + Duration::from_millis(i * 100);
            assert_eq!(log.note(Kind::PrefixFull, format!("from {i}"), t), None);
        }
        // Another kind is logged apart.
        assert!(log.note(Kind::Rate, "from B".into(), t0).is_some());
        assert!(log.flush(t0 + Duration::from_secs(4)).is_empty());
        let lines = log.flush(t0 + RefusalLog::EVERY);
        assert_eq!(
            lines,
            vec![(
                Kind::PrefixFull,
                "9 more connections refused since the last line; the latest: from 9".into()
            )]
        );
        // Counting starts again from that line.
        let t1 = t0 + RefusalLog::EVERY;
        assert_eq!(log.note(Kind::PrefixFull, "from C".into(), t1), None);
        let line = log
            .note(Kind::PrefixFull, "from D".into(), t1 + RefusalLog::EVERY)
            .unwrap();
        assert_eq!(
            line,
            "2 more connections refused since the last line; the latest: from D"
        );
        // After a quiet spell, a refusal is logged in full again.
        let quiet = t1 + RefusalLog::EVERY * 3;
        assert_eq!(
            log.note(Kind::PrefixFull, "from E".into(), quiet).unwrap(),
            "connection refused: from E"
        );
    }
}
