//! Which queued request runs next: deficit round robin by cost across flows (one flow a
//! client key), so that a tenant with a deep backlog of expensive requests delays
//! another tenant by about one request's service time, not by its whole backlog.
//!
//! Pure: no threads or clocks. The I/O workers (`workers`) pop from it under a lock.
//! Each flow is served in arrival order. On its turn a flow earns one quantum of credit
//! and runs requests while its credit covers their cost; a request dearer than a quantum
//! waits for the credit of several turns, so cost, not count, is what is shared.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::protocol::{Op, RequestHeader, FLAG_FUA};

/// Cost of any request, beyond the bytes it moves: the syscall, the reply, the crypto.
pub const BASE_COST: u64 = 16 << 10;
/// Cost of making an export durable (FLUSH, or the sync of a FUA request): priced as a
/// large write, since an fdatasync may write back that much and more.
pub const SYNC_COST: u64 = 1 << 20;
/// A TRIM or WRITE_ZEROES range costs this fraction of its length: such requests change
/// metadata mostly, but a large one still keeps the disk busy.
const RANGE_DIVISOR: u64 = 64;

/// What a request costs in the fair queue, in bytes-equivalent.
pub fn cost(h: &RequestHeader) -> u64 {
    let sync = if h.flags & FLAG_FUA != 0 || h.op == Op::Flush {
        SYNC_COST
    } else {
        0
    };
    let bytes = match h.op {
        Op::Read | Op::Write => h.length as u64,
        Op::Trim | Op::WriteZeroes => h.length as u64 / RANGE_DIVISOR,
        Op::Flush | Op::Ping => 0,
    };
    BASE_COST + bytes + sync
}

struct Flow<T> {
    items: VecDeque<(u64, T)>,
    credit: u64,
    /// Whether the flow has earned its quantum on the turn it is having now.
    earned: bool,
}

/// Items of several flows, taken in deficit-round-robin order.
pub struct FairQueue<K, T> {
    flows: HashMap<K, Flow<T>>,
    /// Flows with items, the one having its turn first.
    turns: VecDeque<K>,
    quantum: u64,
    len: usize,
}

impl<K: Hash + Eq + Clone, T> FairQueue<K, T> {
    /// A queue whose flows earn `quantum` of cost per turn (about the dearest common
    /// request, so that a turn is about one request).
    pub fn new(quantum: u64) -> Self {
        FairQueue {
            flows: HashMap::new(),
            turns: VecDeque::new(),
            quantum: quantum.max(1),
            len: 0,
        }
    }

    /// Queues `item` of `cost` at the end of `key`'s flow.
    pub fn push(&mut self, key: K, cost: u64, item: T) {
        let flow = self.flows.entry(key.clone()).or_insert_with(|| Flow {
            items: VecDeque::new(),
            credit: 0,
            earned: false,
        });
        if flow.items.is_empty() {
            self.turns.push_back(key);
        }
        flow.items.push_back((cost, item));
        self.len += 1;
    }

    /// The next item to run, if any.
    pub fn pop(&mut self) -> Option<T> {
        loop {
            let key = self.turns.front()?;
            let flow = self.flows.get_mut(key).expect("a flow with a turn exists");
            if !flow.earned {
                flow.credit += self.quantum;
                flow.earned = true;
            }
            let (cost, _) = flow.items.front().expect("a flow with a turn has items");
            if flow.credit >= *cost {
                flow.credit -= cost;
                let (_, item) = flow.items.pop_front().expect("checked above");
                self.len -= 1;
                if flow.items.is_empty() {
                    // An idle flow keeps no credit: it cannot save up for a burst.
                    let key = self.turns.pop_front().expect("checked above");
                    self.flows.remove(&key);
                }
                return Some(item);
            }
            // Out of credit: the turn passes to the next flow.
            flow.earned = false;
            let key = self.turns.pop_front().expect("checked above");
            self.turns.push_back(key);
        }
    }

    /// Items queued, over all flows.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain<K: Hash + Eq + Clone, T>(q: &mut FairQueue<K, T>) -> Vec<T> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn one_flow_runs_in_arrival_order() {
        let mut q = FairQueue::new(100);
        for i in 0..5 {
            q.push("a", 250, i);
        }
        assert_eq!(q.len(), 5);
        assert_eq!(drain(&mut q), vec![0, 1, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_late_flow_waits_about_one_request_behind_a_backlog() {
        let mut q = FairQueue::new(SYNC_COST);
        let flush = RequestHeader {
            op: Op::Flush,
            flags: 0,
            txid: 1,
            floor: 1,
            offset: 0,
            length: 0,
        };
        for i in 0..10_000 {
            q.push("flooder", cost(&flush), i);
        }
        assert_eq!(q.pop(), Some(0));
        let read = RequestHeader {
            op: Op::Read,
            length: 4096,
            ..flush
        };
        q.push("victim", cost(&read), -1);
        let order = drain(&mut q);
        let at = order.iter().position(|&i| i == -1).unwrap();
        assert!(at <= 1, "the victim ran after {at} of the flood's flushes");
        assert_eq!(order.len(), 10_000);
    }

    #[test]
    fn flows_share_by_cost_not_by_count() {
        let mut q = FairQueue::new(1 << 20);
        // One flow sends 1 MiB writes, the other 4 KiB ones, both without end.
        for i in 0..100 {
            q.push("big", 1 << 20, ("big", i));
        }
        for i in 0..10_000 {
            q.push("small", 4 << 10, ("small", i));
        }
        let first: Vec<_> = (0..2000).map(|_| q.pop().unwrap().0).collect();
        let big = first.iter().filter(|k| **k == "big").count() as u64;
        let small = first.len() as u64 - big;
        let ratio = (small * (4 << 10)) as f64 / (big << 20) as f64;
        assert!(
            (0.8..1.25).contains(&ratio),
            "bytes served small:big = {ratio}"
        );
    }

    #[test]
    fn a_request_dearer_than_a_quantum_runs_after_enough_turns() {
        let mut q = FairQueue::new(10);
        q.push("dear", 35, "dear");
        for i in 0..10 {
            q.push("cheap", 10, if i == 0 { "c0" } else { "c" });
        }
        let order = drain(&mut q);
        let at = order.iter().position(|&s| s == "dear").unwrap();
        assert_eq!(
            at, 3,
            "{order:?}: needs 4 turns of credit, one cheap item each"
        );
    }

    #[test]
    fn an_idle_flow_saves_no_credit() {
        let mut q = FairQueue::new(100);
        q.push("a", 10, 1);
        assert_eq!(q.pop(), Some(1));
        // Had "a" kept its 90 unused, it would now run twice before "b".
        q.push("b", 100, 10);
        q.push("a", 100, 2);
        q.push("a", 100, 3);
        assert_eq!(drain(&mut q), vec![10, 2, 3]);
    }

    #[test]
    fn costs_price_syncs_and_ranges() {
        let h = |op, flags, length| RequestHeader {
            op,
            flags,
            txid: 1,
            floor: 1,
            offset: 0,
            length,
        };
        assert_eq!(cost(&h(Op::Read, 0, 4096)), BASE_COST + 4096);
        assert_eq!(
            cost(&h(Op::Write, FLAG_FUA, 4096)),
            BASE_COST + 4096 + SYNC_COST
        );
        assert_eq!(cost(&h(Op::Flush, 0, 0)), BASE_COST + SYNC_COST);
        let zeroes = cost(&h(Op::WriteZeroes, 0, u32::MAX));
        assert!(
            zeroes > 32 * SYNC_COST,
            "a 4 GiB WRITE_ZEROES is dear: {zeroes}"
        );
        assert_eq!(cost(&h(Op::Ping, 0, 0)), BASE_COST);
    }
}
