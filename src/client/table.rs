//! The transaction table: every transaction the client has submitted and the export node
//! has not yet acked, the queue of those to (re)send, the in-flight window, and the resend
//! deadlines. Pure: time comes in as an argument, so the logic is tested without sockets.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::channel::Sealed;
use crate::protocol::{Op, RequestHeader};

/// A transaction's payload as the table keeps it until the ack, for resends.
#[derive(Debug)]
pub enum Payload {
    /// Plaintext in a buffer of the caller's (empty but for writes).
    Plain(Vec<u8>),
    /// Sealed for the connection it was first sent on: the submitting thread sealed it
    /// straight from its caller's buffer, and it is opened only to be sent again.
    Sealed(Sealed),
    /// Being sealed by the thread that entered it as sent, which attaches it before it
    /// lets go of the connection: nobody else can send it meanwhile.
    Sealing,
}

impl Payload {
    /// Bytes of plaintext.
    pub fn plain_len(&self) -> usize {
        match self {
            Payload::Plain(data) => data.len(),
            Payload::Sealed(sealed) => sealed.plain_len(),
            Payload::Sealing => 0,
        }
    }
}

/// One transaction, alive until acked or failed.
#[derive(Debug)]
pub struct Tx<W> {
    pub op: Op,
    pub flags: u8,
    pub offset: u64,
    pub length: u32,
    /// The payload of a write, kept for resends; shared with the sender while it encrypts.
    pub data: Arc<Payload>,
    pub submitted: Instant,
    /// When it is resent (or failed) if no ack came.
    deadline: Instant,
    /// Times it was resent after its deadline passed.
    pub resends: u32,
    /// Whoever waits for the outcome.
    pub waiter: W,
}

impl<W> Tx<W> {
    pub fn new(
        op: Op,
        flags: u8,
        offset: u64,
        length: u32,
        data: Vec<u8>,
        now: Instant,
        waiter: W,
    ) -> Self {
        Tx {
            op,
            flags,
            offset,
            length,
            data: Arc::new(Payload::Plain(data)),
            submitted: now,
            deadline: now,
            resends: 0,
            waiter,
        }
    }

    /// Bytes this transaction holds or will receive, counted against the window.
    pub fn cost(&self) -> usize {
        match self.op {
            Op::Read | Op::Write => self.length as usize,
            _ => 0,
        }
    }
}

/// Limits on what may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub requests: usize,
    pub bytes: usize,
}

/// What the resend timer decided.
#[derive(Debug)]
pub struct Expired<W> {
    /// Transactions that ran out of resends; the caller fails them.
    pub failed: Vec<(u64, Tx<W>)>,
    /// Number of transactions queued again for sending.
    pub resent: usize,
    /// The earliest deadline left, if any: nothing expires before it.
    pub next: Option<Instant>,
}

#[derive(Debug)]
pub struct Table<W> {
    txs: BTreeMap<u64, Tx<W>>,
    queue: VecDeque<u64>,
    next_id: u64,
    bytes: usize,
    window: Window,
}

impl<W> Table<W> {
    pub fn new(window: Window) -> Self {
        Table {
            txs: BTreeMap::new(),
            queue: VecDeque::new(),
            next_id: 1,
            bytes: 0,
            window,
        }
    }

    /// Whether a transaction of `cost` bytes fits in the window now. One always fits in
    /// an empty table, so a request larger than the window cannot wait forever.
    pub fn has_room(&self, cost: usize) -> bool {
        self.txs.is_empty()
            || (self.txs.len() < self.window.requests && self.bytes + cost <= self.window.bytes)
    }

    /// Adds a transaction and queues it for sending; returns its id. Its first deadline
    /// runs from submission, so it fails in time even if no connection ever takes it.
    pub fn insert(&mut self, tx: Tx<W>, timeout: Duration) -> u64 {
        let id = self.insert_unqueued(tx, timeout);
        self.queue.push_back(id);
        id
    }

    /// Adds a transaction that its submitter sends at once; returns the header to send
    /// it with. Its resend deadline runs from submission.
    pub fn insert_sent(&mut self, tx: Tx<W>, timeout: Duration) -> RequestHeader {
        let id = self.insert_unqueued(tx, timeout);
        self.header(id)
    }

    fn insert_unqueued(&mut self, mut tx: Tx<W>, timeout: Duration) -> u64 {
        tx.deadline = tx.submitted + timeout;
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += tx.cost();
        self.txs.insert(id, tx);
        id
    }

    /// Gives transaction `id` its payload; hands it back if `id` was acked or failed
    /// meanwhile.
    pub fn attach(&mut self, id: u64, payload: Payload) -> Result<(), Payload> {
        match self.txs.get_mut(&id) {
            Some(tx) => {
                tx.data = Arc::new(payload);
                Ok(())
            }
            None => Err(payload),
        }
    }

    /// The header of transaction `id`, which is in the table.
    fn header(&self, id: u64) -> RequestHeader {
        let tx = &self.txs[&id];
        RequestHeader {
            op: tx.op,
            flags: tx.flags,
            txid: id,
            floor: self.floor(),
            offset: tx.offset,
            length: tx.length,
        }
    }

    /// The lowest id still waiting for an ack: the server may forget replies below it.
    pub fn floor(&self) -> u64 {
        self.txs.keys().next().copied().unwrap_or(self.next_id)
    }

    /// Takes the next queued transaction for sending: its header and payload. Its resend
    /// deadline starts now.
    pub fn next_to_send(
        &mut self,
        now: Instant,
        timeout: Duration,
    ) -> Option<(RequestHeader, Arc<Payload>)> {
        // Skip what was acked or failed since it was queued.
        let id = loop {
            let id = self.queue.pop_front()?;
            if self.txs.contains_key(&id) {
                break id;
            }
        };
        let h = self.header(id);
        let tx = self.txs.get_mut(&id).expect("checked above");
        tx.deadline = now + timeout;
        Some((h, tx.data.clone()))
    }

    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Removes an acked transaction; `None` for an id already acked or failed (a reply to
    /// a resend, say).
    pub fn complete(&mut self, id: u64) -> Option<Tx<W>> {
        let tx = self.txs.remove(&id)?;
        self.bytes -= tx.cost();
        Some(tx)
    }

    /// Queues every transaction again, oldest first, as after a reconnect.
    pub fn requeue_all(&mut self) {
        self.queue.clear();
        self.queue.extend(self.txs.keys().copied());
    }

    /// Resends what passed its deadline, and fails what passed it `max_resends` times.
    /// A transaction is never queued twice.
    pub fn expire(&mut self, now: Instant, timeout: Duration, max_resends: u32) -> Expired<W> {
        let mut failed_ids = Vec::new();
        let mut resent = 0;
        let mut next: Option<Instant> = None;
        for (id, tx) in self.txs.iter_mut() {
            if tx.deadline > now {
                next = Some(next.map_or(tx.deadline, |n| n.min(tx.deadline)));
                continue;
            }
            if tx.resends >= max_resends {
                failed_ids.push(*id);
                continue;
            }
            tx.resends += 1;
            tx.deadline = now + timeout;
            next = Some(next.map_or(tx.deadline, |n| n.min(tx.deadline)));
            if !self.queue.contains(id) {
                self.queue.push_back(*id);
            }
            resent += 1;
        }
        let failed = failed_ids
            .into_iter()
            .filter_map(|id| self.complete(id).map(|tx| (id, tx)))
            .collect();
        Expired {
            failed,
            resent,
            next,
        }
    }

    /// Removes every transaction, for failing them all.
    pub fn drain(&mut self) -> Vec<(u64, Tx<W>)> {
        self.queue.clear();
        self.bytes = 0;
        std::mem::take(&mut self.txs).into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.txs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// Bytes in flight, counted as the window counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn table() -> Table<()> {
        Table::new(Window {
            requests: 4,
            bytes: 10_000,
        })
    }

    fn write(len: u32, now: Instant) -> Tx<()> {
        Tx::new(Op::Write, 0, 0, len, vec![0; len as usize], now, ())
    }

    #[test]
    fn window_bounds_count_and_bytes() {
        let now = Instant::now();
        let mut t = table();
        assert!(
            t.has_room(50_000),
            "one fits in an empty table whatever its size"
        );
        t.insert(write(6000, now), T);
        assert!(!t.has_room(5000));
        assert!(t.has_room(4000));
        t.insert(write(4000, now), T);
        assert_eq!(t.bytes(), 10_000);
        assert!(t.has_room(0));
        t.insert(Tx::new(Op::Flush, 0, 0, 0, Vec::new(), now, ()), T);
        t.insert(Tx::new(Op::Flush, 0, 0, 0, Vec::new(), now, ()), T);
        assert!(!t.has_room(0), "four requests at most");
        t.complete(1);
        assert_eq!(t.bytes(), 4000);
        assert!(t.has_room(6000));
    }

    #[test]
    fn sends_in_order_with_the_floor() {
        let now = Instant::now();
        let mut t = table();
        let a = t.insert(write(10, now), T);
        let b = t.insert(write(20, now), T);
        let (h, data) = t.next_to_send(now, T).unwrap();
        assert_eq!((h.txid, h.floor, data.plain_len()), (a, a, 10));
        t.complete(a);
        let (h, _) = t.next_to_send(now, T).unwrap();
        assert_eq!((h.txid, h.floor), (b, b));
        assert!(t.next_to_send(now, T).is_none());
        t.complete(b);
        assert_eq!(t.floor(), 3);
    }

    #[test]
    fn acked_transactions_are_not_sent_and_late_acks_are_ignored() {
        let now = Instant::now();
        let mut t = table();
        let a = t.insert(write(10, now), T);
        assert!(t.complete(a).is_some());
        assert!(t.complete(a).is_none());
        assert!(t.next_to_send(now, T).is_none());
    }

    #[test]
    fn deadlines_resend_then_fail() {
        let now = Instant::now();
        let mut t = table();
        let a = t.insert(write(10, now), T);
        t.next_to_send(now, T).unwrap();
        assert_eq!(t.expire(now + T / 2, T, 2).resent, 0);
        let e = t.expire(now + T, T, 2);
        assert_eq!(
            (e.resent, e.failed.len(), e.next),
            (1, 0, Some(now + 2 * T))
        );
        assert_eq!(
            t.next_to_send(now + T, T).unwrap().0.txid,
            a,
            "queued again"
        );
        assert_eq!(t.expire(now + 2 * T, T, 2).resent, 1);
        let e = t.expire(now + 3 * T, T, 2);
        assert_eq!(e.failed.len(), 1, "failed after two resends");
        assert_eq!(e.failed[0].0, a);
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
        assert_eq!(e.next, None, "nothing left to expire");
    }

    #[test]
    fn expiry_while_queued_does_not_queue_twice() {
        let now = Instant::now();
        let mut t = table();
        t.insert(write(10, now), T);
        // Never sent (no connection): the deadline still runs from submission.
        assert_eq!(t.expire(now, T, 5).resent, 0);
        assert_eq!(t.expire(now + T, T, 5).resent, 1);
        assert!(t.next_to_send(now, T).is_some());
        assert!(t.next_to_send(now, T).is_none());
    }

    #[test]
    fn requeue_after_reconnect_resends_everything_in_order() {
        let now = Instant::now();
        let mut t = table();
        let ids: Vec<_> = (0..3).map(|_| t.insert(write(10, now), T)).collect();
        while t.next_to_send(now, T).is_some() {}
        t.complete(ids[1]);
        t.requeue_all();
        let sent: Vec<_> =
            std::iter::from_fn(|| t.next_to_send(now, T).map(|(h, _)| h.txid)).collect();
        assert_eq!(sent, vec![ids[0], ids[2]]);
    }

    #[test]
    fn drain_takes_everything() {
        let now = Instant::now();
        let mut t = table();
        t.insert(write(10, now), T);
        t.insert(write(10, now), T);
        assert_eq!(t.drain().len(), 2);
        assert!(t.is_empty() && !t.has_queued() && t.bytes() == 0);
    }
}
