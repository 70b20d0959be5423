//! The health of the engine's connection to the export node, as a pure state machine:
//! when an idle connection is pinged, when an unanswered ping makes it dead, when to try
//! to connect again after losing it (backoff doubling up to a cap), and since when it is
//! down (for failing new requests at once after a long outage). Time comes in as an
//! argument; the caller does the sending, the connecting and the sleeping.

use std::time::{Duration, Instant};

/// Wait before the second connection attempt of an outage; doubled after each failure.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest wait between two connection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Connected; `ping_sent` while a ping waits for its answer.
    Up {
        last_heard: Instant,
        ping_sent: Option<Instant>,
    },
    /// Declared dead (a ping went unanswered); the caller is ending the connection.
    Dead,
    /// No connection since `since`; the next attempt is due at `retry_at`.
    Down {
        since: Instant,
        retry_at: Instant,
        backoff: Duration,
        attempts: u32,
    },
}

/// What a tick found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Liveness {
    /// A ping should be sent now.
    pub ping: bool,
    /// The connection is dead: no answer to a ping within the interval.
    pub dead: bool,
}

#[derive(Debug)]
pub struct Link {
    state: State,
    /// Idle time before a ping, and how long a ping may go unanswered.
    interval: Duration,
    /// A ping was decided and not yet taken for sending.
    ping_due: bool,
}

impl Link {
    /// A link over a connection that is up as of `now`.
    pub fn up(now: Instant, interval: Duration) -> Self {
        Link {
            state: State::Up {
                last_heard: now,
                ping_sent: None,
            },
            interval,
            ping_due: false,
        }
    }

    /// Something arrived from the export node: it is alive, and any ping is answered.
    pub fn heard(&mut self, now: Instant) {
        if let State::Up { .. } = self.state {
            self.state = State::Up {
                last_heard: now,
                ping_sent: None,
            };
        }
    }

    /// Pings after an idle interval; a ping unanswered for an interval kills the link.
    pub fn tick(&mut self, now: Instant) -> Liveness {
        let State::Up {
            last_heard,
            ping_sent,
        } = self.state
        else {
            return Liveness::default();
        };
        match ping_sent {
            Some(at) if now - at >= self.interval => {
                self.state = State::Dead;
                self.ping_due = false;
                Liveness {
                    ping: false,
                    dead: true,
                }
            }
            Some(_) => Liveness::default(),
            None if now - last_heard >= self.interval => {
                self.state = State::Up {
                    last_heard,
                    ping_sent: Some(now),
                };
                self.ping_due = true;
                Liveness {
                    ping: true,
                    dead: false,
                }
            }
            None => Liveness::default(),
        }
    }

    /// Whether a ping is due, clearing it: the caller sends it now.
    pub fn take_ping(&mut self) -> bool {
        std::mem::take(&mut self.ping_due)
    }

    pub fn ping_due(&self) -> bool {
        self.ping_due
    }

    /// When [`Link::tick`] next has something to decide, if ever on this link.
    pub fn next_wake(&self) -> Option<Instant> {
        match self.state {
            State::Up {
                ping_sent: Some(at),
                ..
            } => Some(at + self.interval),
            State::Up { last_heard, .. } => Some(last_heard + self.interval),
            State::Dead | State::Down { .. } => None,
        }
    }

    /// The connection ended at `now`: the first attempt to connect again is due at once.
    /// A link already down stays down since its outage began.
    pub fn lost(&mut self, now: Instant) {
        if let State::Down { .. } = self.state {
            return;
        }
        self.state = State::Down {
            since: now,
            retry_at: now,
            backoff: BACKOFF_START,
            attempts: 0,
        };
        self.ping_due = false;
    }

    /// When the next connection attempt is due, while down.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.state {
            State::Down { retry_at, .. } => Some(retry_at),
            _ => None,
        }
    }

    /// An attempt to connect failed at `now`: wait the backoff, and double it.
    pub fn connect_failed(&mut self, now: Instant) {
        if let State::Down {
            since,
            backoff,
            attempts,
            ..
        } = self.state
        {
            self.state = State::Down {
                since,
                retry_at: now + backoff,
                backoff: (backoff * 2).min(BACKOFF_MAX),
                attempts: attempts + 1,
            };
        }
    }

    /// Connected at `now`; returns the attempts it took, this one included.
    pub fn connected(&mut self, now: Instant) -> u32 {
        let attempts = match self.state {
            State::Down { attempts, .. } => attempts + 1,
            _ => 1,
        };
        *self = Link::up(now, self.interval);
        attempts
    }

    /// Whether the link has been down for longer than `budget` at `now`.
    pub fn down_longer_than(&self, now: Instant, budget: Duration) -> bool {
        match self.state {
            State::Down { since, .. } => now - since > budget,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(5);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_link_is_pinged_once_and_dies_unanswered() {
        let t0 = Instant::now();
        let mut l = Link::up(t0, I);
        assert_eq!(l.next_wake(), Some(t0 + I));
        assert_eq!(
            l.tick(t0 + I - MS),
            Liveness::default(),
            "not idle long enough"
        );
        assert!(l.tick(t0 + I).ping);
        assert!(l.take_ping());
        assert!(!l.take_ping(), "taken once");
        assert_eq!(l.next_wake(), Some(t0 + 2 * I));
        assert_eq!(
            l.tick(t0 + I + MS),
            Liveness::default(),
            "one ping at a time"
        );
        assert!(l.tick(t0 + 2 * I).dead);
        assert_eq!(l.next_wake(), None);
        assert_eq!(l.tick(t0 + 3 * I), Liveness::default(), "dead once");
    }

    #[test]
    fn an_answer_keeps_the_link_alive() {
        let t0 = Instant::now();
        let mut l = Link::up(t0, I);
        assert!(l.tick(t0 + I).ping);
        l.heard(t0 + I + MS);
        assert_eq!(l.tick(t0 + 2 * I), Liveness::default());
        assert!(l.tick(t0 + 2 * I + MS).ping, "idle again for an interval");
        // Traffic alone keeps it from being pinged.
        let mut l = Link::up(t0, I);
        for k in 1..10 {
            l.heard(t0 + k * I / 2);
            assert_eq!(l.tick(t0 + k * I / 2 + MS), Liveness::default());
        }
    }

    #[test]
    fn reconnect_backoff_doubles_up_to_the_cap() {
        let t0 = Instant::now();
        let mut l = Link::up(t0, I);
        l.lost(t0);
        assert_eq!(l.retry_at(), Some(t0), "the first attempt is at once");
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            l.connect_failed(now);
            let at = l.retry_at().unwrap();
            waits.push((at - now).as_millis());
            now = at;
        }
        assert_eq!(
            waits,
            vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        assert_eq!(l.connected(now), 10);
        assert_eq!(l.retry_at(), None);
        assert_eq!(l.next_wake(), Some(now + I), "up: pinged when idle");
        l.lost(now);
        l.connect_failed(now);
        assert_eq!(
            l.retry_at(),
            Some(now + BACKOFF_START),
            "a new outage starts over"
        );
    }

    #[test]
    fn down_time_counts_from_the_loss_across_attempts() {
        let t0 = Instant::now();
        let budget = Duration::from_secs(60);
        let mut l = Link::up(t0, I);
        assert!(!l.down_longer_than(t0 + 2 * budget, budget), "up");
        l.lost(t0);
        l.connect_failed(t0 + budget);
        l.lost(t0 + budget);
        assert!(!l.down_longer_than(t0 + budget, budget));
        assert!(l.down_longer_than(t0 + budget + MS, budget));
        l.connected(t0 + 2 * budget);
        assert!(!l.down_longer_than(t0 + 3 * budget, budget));
    }

    #[test]
    fn a_dead_link_is_down_once_lost() {
        let t0 = Instant::now();
        let mut l = Link::up(t0, I);
        l.tick(t0 + I);
        assert!(l.tick(t0 + 2 * I).dead);
        assert_eq!(l.retry_at(), None, "the connection is still being ended");
        l.lost(t0 + 2 * I + MS);
        assert_eq!(l.retry_at(), Some(t0 + 2 * I + MS));
    }
}
