//! The client engine's decisions, without I/O: a state machine the driver
//! ([`super::engine`]) feeds with events — a request submitted, a reply received, a
//! connection made or lost, a timer tick — and asks what to do — which frames to send
//! (new requests, resends, pings), which transactions to complete and how, when to wake
//! next, when to try to connect again. Every call takes the time as an argument, as in
//! rustls or boringtun: no sockets, threads, locks, sleeps or clock reads in here, so
//! every rule is tested deterministically.
//!
//! It owns the transaction [`Table`] (the window, the resend queue and deadlines), the
//! connection's health (`link`: pings, death, backoff, down time), the accounting of
//! what is durable (`durability`: acked against flushed, the reboot rule), the session
//! to resume, and the counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::durability::Durability;
use super::link::Link;
use super::stats::Stats;
use super::table::{Payload, Table, Tx, Window};
use crate::protocol::{self, ExportInfo, Op, RequestHeader, SessionId};

/// Transaction id of pings; they live outside the table and never reach the reply cache.
pub const PING_TXID: u64 = u64::MAX;

/// How patient the engine is and how much it keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct CoreConfig {
    /// Time to wait for an ack before sending a transaction again.
    pub resend_timeout: Duration,
    /// Resends before a transaction fails with EIO.
    pub resend_count: u32,
    /// Idle time after which the connection is pinged, and how long a ping may go
    /// unanswered before the connection counts as dead.
    pub ping_interval: Duration,
    pub window: Window,
}

/// How long a transaction waits in all before it fails with EIO when nothing answers: the
/// first send and every resend each wait a resend timeout.
pub fn give_up_after(resend_timeout: Duration, resend_count: u32) -> Duration {
    resend_timeout * (resend_count + 1)
}

impl CoreConfig {
    fn resend_budget(&self) -> Duration {
        give_up_after(self.resend_timeout, self.resend_count)
    }
}

/// A transaction's waiter, and for a flush the changes it covers.
#[derive(Debug)]
pub struct Waiting<W> {
    pub waiter: W,
    covers: u64,
}

/// A transaction as the core keeps it.
pub type Request<W> = Tx<Waiting<W>>;

/// A request to submit; `now` is when it was made.
pub fn request<W>(
    op: Op,
    flags: u8,
    offset: u64,
    length: u32,
    data: Vec<u8>,
    now: Instant,
    waiter: W,
) -> Request<W> {
    let waiting = Waiting { waiter, covers: 0 };
    Tx::new(op, flags, offset, length, data, now, waiting)
}

/// Why a request could not enter at once.
#[derive(Debug)]
pub enum Blocked<W> {
    /// The window is full: submit it again once a transaction completes.
    NoRoom(Request<W>),
    /// It fails with this errno; here is its waiter.
    Failed(i32, W),
}

/// Waiters to complete with an errno each.
pub type Failures<W> = Vec<(W, i32)>;

/// A transaction resolved by its reply.
#[derive(Debug)]
pub struct Completed<W> {
    pub waiter: W,
    /// `Ok` hands the reply's data to the waiter; `Err` is the errno to report instead.
    pub result: Result<(), i32>,
    /// The transaction's own payload (a write's buffer), free to reuse once unshared.
    pub data: Arc<Payload>,
}

/// What a timer tick decided.
#[derive(Debug)]
pub struct Tick<W> {
    /// Transactions out of resends.
    pub failed: Failures<W>,
    /// Resends or a ping are queued: send them.
    pub send: bool,
    /// The connection is dead, and why: end it (then report [`Core::on_lost`]).
    pub dead: Option<String>,
}

#[derive(Debug)]
pub struct Core<W> {
    cfg: CoreConfig,
    table: Table<Waiting<W>>,
    link: Link,
    durability: Durability,
    session: SessionId,
    /// The export as first negotiated: a connection to a different one is refused.
    export: String,
    /// Its size now: it may grow (a RESIZE, or a reconnect finding it larger), never
    /// shrink.
    size: u64,
    stats: Stats,
    /// Set when the export can no longer be used (it changed under us): every request fails.
    fatal: Option<i32>,
    closing: bool,
    /// No deadline in the table is earlier (a bound: it may be earlier than needed).
    resend_at: Instant,
    /// The payload of a ping, shared.
    empty: Arc<Payload>,
}

impl<W> Core<W> {
    /// A core over the first connection, made at `now` to the export `info` describes.
    pub fn new(cfg: CoreConfig, info: &ExportInfo, now: Instant) -> Self {
        Core {
            table: Table::new(cfg.window),
            link: Link::up(now, cfg.ping_interval),
            durability: Durability::new(&info.boot_id),
            session: info.session,
            export: info.export.clone(),
            size: info.size,
            stats: Stats {
                connected: true,
                ..Stats::default()
            },
            fatal: None,
            closing: false,
            resend_at: now + cfg.resend_timeout,
            empty: Arc::new(Payload::Plain(Vec::new())),
            cfg,
        }
    }

    /// Enters a request if the window has room.
    pub fn submit(&mut self, now: Instant, tx: Request<W>) -> Result<(), Blocked<W>> {
        let tx = self.admit(now, tx)?;
        self.table.insert(tx, self.cfg.resend_timeout);
        self.entered();
        Ok(())
    }

    /// Enters a request, as [`submit`](Self::submit), that the caller sends at once
    /// instead of queueing it: call only while connected. Returns the header to send it
    /// with; a payload left [`Payload::Sealing`] is given with [`attach`](Self::attach).
    pub fn submit_sent(
        &mut self,
        now: Instant,
        tx: Request<W>,
    ) -> Result<RequestHeader, Blocked<W>> {
        let tx = self.admit(now, tx)?;
        let h = self.table.insert_sent(tx, self.cfg.resend_timeout);
        self.entered();
        Ok(h)
    }

    /// Gives a transaction entered with [`submit_sent`](Self::submit_sent) its payload;
    /// hands it back if the transaction was resolved meanwhile.
    pub fn attach(&mut self, txid: u64, payload: Payload) -> Result<(), Payload> {
        self.table.attach(txid, payload)
    }

    fn entered(&mut self) {
        self.stats.requests += 1;
        self.stats.max_in_flight_bytes = self.stats.max_in_flight_bytes.max(self.table.bytes());
    }

    /// The request, ready to enter, if it may.
    fn admit(&mut self, now: Instant, mut tx: Request<W>) -> Result<Request<W>, Blocked<W>> {
        if let Some(errno) = self.fatal {
            return Err(Blocked::Failed(errno, tx.waiter.waiter));
        }
        // Down for longer than a transaction may wait: it would only wait the whole
        // resend budget to fail, so fail now (an array above can go on degraded).
        if self.link.down_longer_than(now, self.cfg.resend_budget()) {
            return Err(Blocked::Failed(libc::EIO, tx.waiter.waiter));
        }
        if self.closing && self.table.is_empty() {
            return Err(Blocked::Failed(libc::ESHUTDOWN, tx.waiter.waiter));
        }
        if !self.table.has_room(tx.cost()) {
            return Err(Blocked::NoRoom(tx));
        }
        tx.submitted = now;
        tx.waiter.covers = self.durability.covers();
        Ok(tx)
    }

    /// Whether something waits to be sent.
    pub fn wants_send(&self) -> bool {
        self.table.has_queued() || self.link.ping_due()
    }

    /// Takes what is due for sending now, a ping first, into `batch`, until `max_bytes`
    /// of requests are in it. Call only while connected.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        batch: &mut Vec<(RequestHeader, Arc<Payload>)>,
        max_bytes: usize,
    ) {
        if self.link.take_ping() {
            let ping = RequestHeader {
                op: Op::Ping,
                flags: 0,
                txid: PING_TXID,
                floor: self.table.floor(),
                offset: 0,
                length: 0,
            };
            batch.push((ping, self.empty.clone()));
        }
        let mut bytes = 0;
        while bytes < max_bytes {
            let Some((h, data)) = self.table.next_to_send(now, self.cfg.resend_timeout) else {
                break;
            };
            bytes += data.plain_len() + protocol::REQUEST_HEADER;
            batch.push((h, data));
        }
    }

    /// A reply to `txid` with `status` and `len` bytes of data arrived at `now`; `None` if
    /// it resolves nothing (a ping's, or a late one to a transaction already resolved).
    pub fn on_reply(
        &mut self,
        now: Instant,
        txid: u64,
        status: u32,
        len: usize,
    ) -> Option<Completed<W>> {
        self.link.heard(now);
        if txid == PING_TXID {
            return None;
        }
        let tx = self.table.complete(txid)?;
        let mut result = match status {
            0 => Ok(()),
            e => Err(e as i32),
        };
        if result.is_ok() && tx.op.modifies() {
            self.durability.change_acked();
        }
        if result.is_ok() && tx.op == Op::Flush {
            result = self.durability.flush_acked(tx.waiter.covers);
        }
        self.stats
            .latency
            .record(now.saturating_duration_since(tx.submitted));
        match (tx.op, result) {
            (Op::Read, Ok(())) => self.stats.bytes_read += len as u64,
            (Op::Write, Ok(())) => self.stats.bytes_written += tx.length as u64,
            (_, Ok(())) => {}
            (_, Err(_)) => self.stats.failures += 1,
        }
        Some(Completed {
            waiter: tx.waiter.waiter,
            result,
            data: tx.data,
        })
    }

    /// Resends what is overdue, fails what is out of resends, and watches the connection.
    pub fn on_tick(&mut self, now: Instant) -> Tick<W> {
        let e = self
            .table
            .expire(now, self.cfg.resend_timeout, self.cfg.resend_count);
        // Every deadline set from now on is later than this.
        self.resend_at = e.next.unwrap_or(now + self.cfg.resend_timeout);
        self.stats.resends += e.resent as u64;
        if e.resent > 0 {
            log::debug!("resending {} overdue transactions", e.resent);
        }
        self.stats.failures += e.failed.len() as u64;
        let failed = e
            .failed
            .into_iter()
            .map(|(id, tx)| {
                log::error!(
                    "transaction {id} ({:?} at {}+{}) failed after {} resends",
                    tx.op,
                    tx.offset,
                    tx.length,
                    tx.resends
                );
                (tx.waiter.waiter, libc::EIO)
            })
            .collect();
        let live = self.link.tick(now);
        let interval = self.cfg.ping_interval;
        Tick {
            failed,
            send: e.resent > 0 || live.ping,
            dead: live
                .dead
                .then(|| format!("no answer to a ping within {interval:?}")),
        }
    }

    /// When [`Core::on_tick`] next has something to do; waking earlier does no harm.
    pub fn next_wake(&self) -> Instant {
        match self.link.next_wake() {
            Some(ping) => ping.min(self.resend_at),
            None => self.resend_at,
        }
    }

    /// The connection was lost at `now`.
    pub fn on_lost(&mut self, now: Instant) {
        self.link.lost(now);
        self.stats.connected = false;
    }

    /// When to try to connect again, while there is no connection.
    pub fn retry_at(&self) -> Option<Instant> {
        self.link.retry_at()
    }

    /// The session a new connection resumes.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// An attempt to connect again failed at `now`.
    pub fn on_connect_failed(&mut self, now: Instant) {
        self.link.connect_failed(now);
    }

    /// The export's size now.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The server says the export now has `size` bytes; true if that is news. A smaller
    /// size is ignored: the server never shrinks an export, and data past a new end would
    /// be lost.
    pub fn on_resize(&mut self, size: u64) -> bool {
        if size < self.size {
            log::warn!(
                "the server announced {size} bytes for export '{}', below its {} bytes; ignored",
                protocol::printable(&self.export),
                self.size
            );
        }
        let grew = size > self.size;
        if grew {
            log::info!(
                "export '{}' grew from {} to {size} bytes",
                protocol::printable(&self.export),
                self.size
            );
            self.size = size;
        }
        grew
    }

    /// A new connection, made at `now`, negotiated `info`; returns the attempts it took.
    /// Everything unacked is queued to be sent on it, oldest first. An export that grew
    /// meanwhile is taken at its new size ([`Core::size`] tells); a different export
    /// (another name, or a smaller size) is refused: everything fails, now and from now on.
    pub fn on_connected(&mut self, now: Instant, info: &ExportInfo) -> Result<u32, Failures<W>> {
        if info.size < self.size || info.export != self.export {
            log::error!(
                "export '{}' changed on the server (size {} -> {}, smaller): refusing to \
                 continue, since data past the new end would be lost; restore the export's \
                 size on the server, or remount it",
                protocol::printable(&self.export),
                self.size,
                info.size
            );
            self.fatal = Some(libc::EIO);
            let failed: Failures<W> = self
                .table
                .drain()
                .into_iter()
                .map(|(_, tx)| (tx.waiter.waiter, libc::EIO))
                .collect();
            self.stats.failures += failed.len() as u64;
            return Err(failed);
        }
        self.on_resize(info.size);
        let attempts = self.link.connected(now);
        self.stats.reconnects += 1;
        self.stats.connected = true;
        self.session = info.session;
        self.durability.connected(info);
        self.table.requeue_all();
        Ok(attempts)
    }

    /// No new requests once nothing is in flight; see [`Core::finished`].
    pub fn close(&mut self) {
        self.closing = true;
    }

    /// Closing, and nothing left in flight.
    pub fn finished(&self) -> bool {
        self.closing && self.table.is_empty()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.in_flight = self.table.len();
        stats.in_flight_bytes = self.table.bytes();
        stats.size = self.size;
        stats
    }
}

#[cfg(test)]
mod tests;
