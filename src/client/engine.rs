//! The client transaction engine: every read, write, flush and trim is a transaction that
//! lives until the export node acks it.
//!
//! Callers submit concurrently and wait for room in the window rather than grow memory.
//! A request alone in flight is encrypted and sent by the thread that submits it, so it
//! reaches the socket without waking another thread; with company, a writer task sends
//! everything queued in one batch, along with resends and pings. One driver task keeps a
//! connection: a reader thread resolves transactions from replies and calls their
//! completions right there, and a watchdog pings an idle connection and declares it dead
//! when a ping goes unanswered. A lost connection is re-established with backoff, the
//! session resumed, and every unacked transaction sent again; the server's reply cache
//! makes those resends execute at most once. A timer resends what is not acked within the
//! resend timeout and fails it with EIO after the resend count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use smol::future::FutureExt;
use smol::net::{Shutdown, TcpStream};

use super::stats::Stats;
use super::table::{Table, Tx, Window};
use super::{ClientConfig, ClientError, Connection, Parts};
use crate::blocking::ThreadReader;
use crate::channel::{Hangup, Outgoing, OwnedFrame, Receiver, Sender};
use crate::pool::Pool;
use crate::protocol::{self, ExportInfo, Head, Limits, Op, RequestHeader, SessionId, FLAG_FUA};

/// Transaction id of pings; they live outside the table and never reach the reply cache.
const PING_TXID: u64 = u64::MAX;
/// Requests encoded into one channel send, at most (beyond the first).
const SEND_BATCH: usize = 1 << 20;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes of idle buffers the pool keeps at most.
const POOL_BYTES: usize = 16 << 20;
/// Read replies from this size on are handed to their callers on an executor thread.
const HANDOFF_BYTES: usize = 64 << 10;
/// Largest trim or write-zeroes range in one transaction.
const RANGE_CHUNK: u64 = 1 << 30;

/// How the engine connects and how patient it is.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub client: ClientConfig,
    /// Time to wait for an ack before sending a transaction again.
    pub resend_timeout: Duration,
    /// Resends before a transaction fails with EIO.
    pub resend_count: u32,
    /// Idle time after which the connection is pinged; a ping unanswered for as long
    /// again means the connection is dead.
    pub ping_interval: Duration,
    /// Transactions in flight at most.
    pub window_requests: usize,
    /// Bytes of reads and writes in flight at most.
    pub window_bytes: usize,
}

impl EngineConfig {
    pub const DEFAULT_RESEND_TIMEOUT: Duration = Duration::from_secs(5);
    /// With the default timeout: a minute of outage before an error, twice the 30 s
    /// that must never surface.
    pub const DEFAULT_RESEND_COUNT: u32 = 12;
    pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_WINDOW_REQUESTS: usize = 128;
    pub const DEFAULT_WINDOW_BYTES: usize = 64 << 20;

    pub fn new(client: ClientConfig) -> Self {
        EngineConfig {
            client,
            resend_timeout: Self::DEFAULT_RESEND_TIMEOUT,
            resend_count: Self::DEFAULT_RESEND_COUNT,
            ping_interval: Self::DEFAULT_PING_INTERVAL,
            window_requests: Self::DEFAULT_WINDOW_REQUESTS,
            window_bytes: Self::DEFAULT_WINDOW_BYTES,
        }
    }
}

/// A transaction's result: a read's data, or an errno.
pub type Outcome = Result<Vec<u8>, i32>;

/// Called once with a transaction's outcome, on whichever thread resolves it.
type Done = Box<dyn FnOnce(Outcome) + Send>;

/// Who waits for a transaction, and for a flush what it covers.
struct Waiter {
    done: Done,
    /// For a flush: the count of changes acked before it was submitted.
    covers: u64,
}

/// The sending half of the current connection, taken by whichever thread sends.
struct Wire {
    sender: Sender<TcpStream>,
    stream: Hangup,
    out: Outgoing,
    batch: Vec<(RequestHeader, Arc<Vec<u8>>)>,
}

/// A handle on the engine; clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: EngineConfig,
    info: ExportInfo,
    state: Mutex<State>,
    /// Something was queued for sending.
    queued: Event,
    /// The window has room, or the table emptied.
    room: Event,
    closing: AtomicBool,
    pool: Pool,
    driver: Mutex<Option<smol::Task<()>>>,
    /// `None` while there is no connection.
    wire: smol::lock::Mutex<Option<Wire>>,
    /// The watchdog wants a ping sent.
    ping_due: AtomicBool,
    /// Why sending failed on the current connection, if it did.
    send_error: Mutex<Option<String>>,
}

struct State {
    table: Table<Waiter>,
    session: SessionId,
    stats: Stats,
    /// Set when the export can no longer be used (it changed under us): every request fails.
    fatal: Option<i32>,
    /// Changes (writes, trims, zeroings) acked so far, and how many of them a flush covered.
    acked_changes: u64,
    flushed_changes: u64,
    /// The export node's boot, as last seen.
    boot_id: String,
    /// The export node rebooted while acked changes were not flushed: the next flush
    /// reports EIO, as a disk that lost its write cache would.
    lost_unflushed: bool,
    /// Since when the engine has had no connection, if it has none.
    down_since: Option<Instant>,
}

/// State of one connection, shared by its reader and watchdog.
struct Link {
    last_heard: Mutex<Instant>,
    ping_sent: Mutex<Option<Instant>>,
}

impl Engine {
    /// Connects for the first time; an unreachable or refusing server is an error here,
    /// not retried. Then keeps the connection up until [`Engine::close`].
    pub async fn start(cfg: EngineConfig) -> Result<Engine, ClientError> {
        let conn = Connection::connect(&cfg.client, None).await?;
        let info = conn.info().clone();
        let window = Window {
            requests: cfg.window_requests.max(1),
            bytes: cfg.window_bytes,
        };
        let inner = Arc::new(Inner {
            // Enough buffers for a steady stream of the largest writes; beyond that the
            // allocator does as well, and resident memory stays lower.
            pool: Pool::new(cfg.window_bytes.min(POOL_BYTES)),
            state: Mutex::new(State {
                table: Table::new(window),
                session: info.session,
                stats: Stats::default(),
                fatal: None,
                acked_changes: 0,
                flushed_changes: 0,
                boot_id: info.boot_id.clone(),
                lost_unflushed: false,
                down_since: None,
            }),
            cfg,
            info,
            queued: Event::new(),
            room: Event::new(),
            closing: AtomicBool::new(false),
            driver: Mutex::new(None),
            wire: smol::lock::Mutex::new(None),
            ping_due: AtomicBool::new(false),
            send_error: Mutex::new(None),
        });
        let driver = smol::spawn(inner.clone().drive(conn));
        *inner.driver.lock().unwrap() = Some(driver);
        smol::spawn(inner.clone().expire_loop()).detach();
        Ok(Engine { inner })
    }

    /// The export as negotiated on the first connection.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        let max = self.inner.info.max_transfer;
        let mut pending = Vec::new();
        for (off, n) in chunks(offset, len as u64, max as u64) {
            pending.push(
                self.inner
                    .submit(Op::Read, 0, off, n as u32, Vec::new())
                    .await?,
            );
        }
        let mut out = Vec::with_capacity(len as usize);
        for rx in pending {
            let data = wait(rx).await?;
            if out.is_empty() {
                out = data;
            } else {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), i32> {
        let max = self.inner.info.max_transfer as usize;
        let flags = if fua { FLAG_FUA } else { 0 };
        let mut pending = Vec::new();
        for (i, part) in data.chunks(max).enumerate() {
            let buf = self.inner.pool.copy_of(part);
            let off = offset + (i * max) as u64;
            pending.push(
                self.inner
                    .submit(Op::Write, flags, off, part.len() as u32, buf)
                    .await?,
            );
        }
        wait_all(pending).await
    }

    /// A copy of `data` in a buffer from the engine's pool, for [`Engine::write_buffer`]:
    /// a caller whose data lives in a borrowed buffer copies it once, here.
    pub fn buffer(&self, data: &[u8]) -> Vec<u8> {
        self.inner.pool.copy_of(data)
    }

    /// Writes a buffer the engine keeps until the write is acked (for resends), then
    /// returns to its pool; no further copy unless it is over the maximum transfer.
    pub async fn write_buffer(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), i32> {
        if data.len() > self.inner.info.max_transfer as usize {
            // The server granted less than the caller's writes: split, copying the parts.
            let result = self.write(offset, &data, fua).await;
            self.recycle(data);
            return result;
        }
        let flags = if fua { FLAG_FUA } else { 0 };
        let len = data.len() as u32;
        let rx = self
            .inner
            .submit(Op::Write, flags, offset, len, data)
            .await?;
        wait(rx).await.map(drop)
    }

    /// Gives the buffer of a finished read back to the pool.
    pub fn recycle(&self, buf: Vec<u8>) {
        self.inner.pool.put(buf);
    }

    /// Starts a read without waiting for it: `done` gets the data (a pooled buffer, see
    /// [`Engine::recycle`]) or an errno, on the thread that resolves it. This thread at
    /// most sends the request; when the window is full, a task waits for room instead.
    pub fn start_read(&self, offset: u64, len: u32, done: impl FnOnce(Outcome) + Send + 'static) {
        if len > self.inner.info.max_transfer {
            let engine = self.clone();
            smol::spawn(async move { done(engine.read(offset, len).await) }).detach();
            return;
        }
        self.begin(Op::Read, 0, offset, len, Vec::new(), Box::new(done));
    }

    /// Starts a write of a buffer from [`Engine::buffer`] without waiting, as
    /// [`Engine::start_read`].
    pub fn start_write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
        done: impl FnOnce(Result<(), i32>) + Send + 'static,
    ) {
        if data.len() > self.inner.info.max_transfer as usize {
            let engine = self.clone();
            smol::spawn(async move { done(engine.write_buffer(offset, data, fua).await) }).detach();
            return;
        }
        let flags = if fua { FLAG_FUA } else { 0 };
        let len = data.len() as u32;
        let done = Box::new(move |outcome: Outcome| done(outcome.map(drop)));
        self.begin(Op::Write, flags, offset, len, data, done);
    }

    /// Starts a flush without waiting, as [`Engine::start_read`].
    pub fn start_flush(&self, done: impl FnOnce(Result<(), i32>) + Send + 'static) {
        let done = Box::new(move |outcome: Outcome| done(outcome.map(drop)));
        self.begin(Op::Flush, 0, 0, 0, Vec::new(), done);
    }

    /// Enters a transaction and sends it from this thread if the window has room; else a
    /// task waits for room.
    fn begin(&self, op: Op, flags: u8, offset: u64, length: u32, data: Vec<u8>, done: Done) {
        let waiter = Waiter { done, covers: 0 };
        let tx = Tx::new(op, flags, offset, length, data, Instant::now(), waiter);
        match self.inner.try_enter(tx) {
            // Alone in flight, it is latency-bound: sending here saves waking the writer.
            // Otherwise the writer sends it with what gathers meanwhile, in one batch, and
            // this thread is free for the next request.
            Ok(true) => smol::block_on(self.inner.send_queued()),
            Ok(false) => {
                self.inner.queued.notify(1);
            }
            Err(Blocked::Failed(errno, tx)) => (tx.waiter.done)(Err(errno)),
            Err(Blocked::NoRoom(tx)) => {
                let inner = self.inner.clone();
                smol::spawn(async move {
                    if let Err((errno, tx)) = inner.enter(tx).await {
                        (tx.waiter.done)(Err(errno));
                    }
                })
                .detach();
            }
        }
    }

    /// Returns once every write acked before it is on stable storage on the export node.
    pub async fn flush(&self) -> Result<(), i32> {
        let rx = self.inner.submit(Op::Flush, 0, 0, 0, Vec::new()).await?;
        wait(rx).await.map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.range_op(Op::Trim, 0, offset, len).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), i32> {
        self.range_op(Op::WriteZeroes, if fua { FLAG_FUA } else { 0 }, offset, len)
            .await
    }

    async fn range_op(&self, op: Op, flags: u8, offset: u64, len: u64) -> Result<(), i32> {
        let mut pending = Vec::new();
        for (off, n) in chunks(offset, len, RANGE_CHUNK) {
            pending.push(
                self.inner
                    .submit(op, flags, off, n as u32, Vec::new())
                    .await?,
            );
        }
        wait_all(pending).await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let st = self.inner.state.lock().unwrap();
        let mut stats = st.stats.clone();
        stats.in_flight = st.table.len();
        stats.in_flight_bytes = st.table.bytes();
        stats
    }

    /// Waits until every transaction is acked or failed, then disconnects.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.room.notify(usize::MAX);
        self.inner.queued.notify(usize::MAX);
        let driver = self.inner.driver.lock().unwrap().take();
        if let Some(driver) = driver {
            driver.await;
        }
    }
}

/// Whether a reconnect found the export node rebooted with acked changes unflushed: its
/// page cache, which held them, is gone. A restarted server process keeps the page cache.
fn rebooted(last_boot: &str, info: &ExportInfo, unflushed: bool) -> bool {
    unflushed && !info.resumed && !info.boot_id.is_empty() && info.boot_id != last_boot
}

/// Splits `len` bytes at `offset` into pieces of at most `max`.
fn chunks(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let count = len.div_ceil(max).max(1);
    (0..count).map(move |i| (offset + i * max, (len - i * max).min(max)))
}

/// Why a transaction could not enter the table at once.
enum Blocked {
    /// The window is full: wait for room.
    NoRoom(Tx<Waiter>),
    /// It must fail with this errno.
    Failed(i32, Tx<Waiter>),
}

async fn wait(rx: smol::channel::Receiver<Outcome>) -> Outcome {
    rx.recv().await.unwrap_or(Err(libc::EIO))
}

async fn wait_all(pending: Vec<smol::channel::Receiver<Outcome>>) -> Result<(), i32> {
    let mut result = Ok(());
    for rx in pending {
        if let Err(e) = wait(rx).await {
            result = result.and(Err(e));
        }
    }
    result
}

impl Inner {
    fn timeout(&self) -> Duration {
        self.cfg.resend_timeout
    }

    /// How long a transaction waits in all before it fails.
    fn resend_budget(&self) -> Duration {
        self.cfg.resend_timeout * (self.cfg.resend_count + 1)
    }

    /// Enters a transaction, waiting for room in the window, and sends it; returns where
    /// its outcome arrives.
    async fn submit(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u32,
        data: Vec<u8>,
    ) -> Result<smol::channel::Receiver<Outcome>, i32> {
        let (sender, outcome) = smol::channel::bounded(1);
        let waiter = Waiter {
            done: Box::new(move |o| {
                let _ = sender.try_send(o);
            }),
            covers: 0,
        };
        let tx = Tx::new(op, flags, offset, length, data, Instant::now(), waiter);
        self.enter(tx).await.map_err(|(errno, _)| errno)?;
        Ok(outcome)
    }

    /// Enters a transaction once the window has room, and sends it.
    async fn enter(&self, mut tx: Tx<Waiter>) -> Result<(), (i32, Tx<Waiter>)> {
        let alone = loop {
            let room = self.room.listen();
            match self.try_enter(tx) {
                Ok(alone) => break alone,
                Err(Blocked::Failed(errno, tx)) => return Err((errno, tx)),
                Err(Blocked::NoRoom(back)) => tx = back,
            }
            room.await;
        };
        if alone {
            self.send_queued().await;
        } else {
            self.queued.notify(1);
        }
        Ok(())
    }

    /// Enters a transaction if the window has room now; true if it is the only one in
    /// flight.
    fn try_enter(&self, mut tx: Tx<Waiter>) -> Result<bool, Blocked> {
        let mut st = self.state.lock().unwrap();
        if let Some(e) = st.fatal {
            return Err(Blocked::Failed(e, tx));
        }
        // Down for longer than a transaction may wait: it would only wait the whole
        // resend budget to fail, so fail now (an array above can go on degraded).
        if st
            .down_since
            .is_some_and(|t| t.elapsed() > self.resend_budget())
        {
            return Err(Blocked::Failed(libc::EIO, tx));
        }
        if self.closing.load(Ordering::SeqCst) && st.table.is_empty() {
            return Err(Blocked::Failed(libc::ESHUTDOWN, tx));
        }
        if !st.table.has_room(tx.cost()) {
            return Err(Blocked::NoRoom(tx));
        }
        tx.submitted = Instant::now();
        tx.waiter.covers = st.acked_changes;
        st.table.insert(tx, self.timeout());
        st.stats.requests += 1;
        st.stats.max_in_flight_bytes = st.stats.max_in_flight_bytes.max(st.table.bytes());
        Ok(st.table.len() == 1)
    }

    /// Sends everything queued, unless another thread is sending (it sends ours too) or
    /// there is no connection (the next one sends it).
    async fn send_queued(&self) {
        loop {
            {
                let Some(mut wire) = self.wire.try_lock() else {
                    return;
                };
                let Some(wire) = wire.as_mut() else {
                    return;
                };
                while self.send_batch(wire).await {}
            }
            // Queued by a thread that found the wire taken just before it was let go.
            let queued = self.state.lock().unwrap().table.has_queued();
            if !queued && !self.ping_due.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Encrypts and sends one batch of queued transactions; false once nothing was left
    /// or sending failed (which ends the connection).
    async fn send_batch(&self, wire: &mut Wire) -> bool {
        let Wire {
            sender,
            stream,
            out,
            batch,
        } = wire;
        batch.clear();
        let ping = self.ping_due.swap(false, Ordering::SeqCst);
        let floor = {
            let mut st = self.state.lock().unwrap();
            let now = Instant::now();
            let mut bytes = 0;
            while bytes < SEND_BATCH {
                match st.table.next_to_send(now, self.timeout()) {
                    Some((h, data)) => {
                        bytes += data.len() + protocol::REQUEST_HEADER;
                        batch.push((h, data));
                    }
                    None => break,
                }
            }
            st.table.floor()
        };
        if batch.is_empty() && !ping {
            return false;
        }
        out.clear();
        if ping {
            let h = RequestHeader {
                op: Op::Ping,
                flags: 0,
                txid: PING_TXID,
                floor,
                offset: 0,
                length: 0,
            };
            protocol::encode_request(out.staged(), &h, &[]);
        }
        for (i, (h, data)) in batch.iter().enumerate() {
            if data.len() < Outgoing::INLINE {
                protocol::encode_request(out.staged(), h, data);
            } else {
                protocol::encode_request_head(out.staged(), h, data.len());
                out.payload(i);
            }
        }
        let parts = out.parts(|i| batch[i].1.as_slice());
        let sent = sender.send_parts(&parts).await;
        batch.clear();
        match sent {
            Ok(()) => true,
            Err(e) => {
                // The reader sees the socket shut and ends the connection with this reason;
                // what was sent on it is sent again on the next one.
                self.send_error.lock().unwrap().get_or_insert(e.to_string());
                let _ = stream.shutdown(Shutdown::Both);
                false
            }
        }
    }

    /// Resolves an acked transaction.
    fn complete(&self, txid: u64, mut status: u32, data: Vec<u8>) {
        let tx = {
            let mut st = self.state.lock().unwrap();
            let Some(tx) = st.table.complete(txid) else {
                self.pool.put(data);
                return;
            };
            if status == 0 && tx.op.modifies() {
                st.acked_changes += 1;
            }
            if status == 0 && tx.op == Op::Flush {
                if st.lost_unflushed {
                    st.lost_unflushed = false;
                    status = libc::EIO as u32;
                    log::error!(
                        "flush failed: the export node rebooted after acking writes that no flush \
                         covered; they may be lost"
                    );
                } else {
                    st.flushed_changes = st.flushed_changes.max(tx.waiter.covers);
                }
            }
            st.stats.latency.record(tx.submitted.elapsed());
            match (tx.op, status) {
                (Op::Read, 0) => st.stats.bytes_read += data.len() as u64,
                (Op::Write, 0) => st.stats.bytes_written += tx.length as u64,
                (_, 0) => {}
                _ => st.stats.failures += 1,
            }
            tx
        };
        self.room.notify(usize::MAX);
        let outcome = match status {
            0 => Ok(data),
            _ => {
                self.pool.put(data);
                Err(status as i32)
            }
        };
        match &outcome {
            // Handing a large read to its caller is a copy as long as the decryption: on
            // another thread, the reader goes on decrypting the next reply meanwhile.
            Ok(data) if data.len() >= HANDOFF_BYTES => {
                smol::spawn(async move { (tx.waiter.done)(outcome) }).detach();
            }
            _ => (tx.waiter.done)(outcome),
        }
        // Unless a resend of it is being encrypted right now, the buffer is free again.
        if let Ok(data) = Arc::try_unwrap(tx.data) {
            self.pool.put(data);
        }
    }

    fn fail(&self, failed: Vec<(u64, Tx<Waiter>)>, errno: i32) {
        if failed.is_empty() {
            return;
        }
        self.state.lock().unwrap().stats.failures += failed.len() as u64;
        for (id, tx) in failed {
            log::error!(
                "transaction {id} ({:?} at {}+{}) failed after {} resends",
                tx.op,
                tx.offset,
                tx.length,
                tx.resends
            );
            (tx.waiter.done)(Err(errno));
        }
        self.room.notify(usize::MAX);
    }

    /// Resends what is overdue and fails what is out of resends, until closed and empty.
    async fn expire_loop(self: Arc<Self>) {
        let tick = (self.timeout() / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            smol::Timer::after(tick).await;
            let expired = {
                let mut st = self.state.lock().unwrap();
                if self.closing.load(Ordering::SeqCst) && st.table.is_empty() {
                    return;
                }
                let e = st
                    .table
                    .expire(Instant::now(), self.timeout(), self.cfg.resend_count);
                st.stats.resends += e.resent as u64;
                e
            };
            if expired.resent > 0 {
                log::debug!("resending {} overdue transactions", expired.resent);
                self.send_queued().await;
            }
            self.fail(expired.failed, libc::EIO);
        }
    }

    fn finished(&self) -> bool {
        self.closing.load(Ordering::SeqCst) && self.state.lock().unwrap().table.is_empty()
    }

    /// Keeps a connection up and serves it, until closed with nothing left in flight.
    async fn drive(self: Arc<Self>, first: Connection) {
        let mut conn = Some(first);
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Some(c) => c,
                    None => break,
                },
            };
            let why = self.serve(c).await;
            {
                let mut st = self.state.lock().unwrap();
                st.stats.connected = false;
                st.down_since = Some(Instant::now());
            }
            if self.finished() {
                break;
            }
            log::warn!(
                "connection to {} lost: {why}; reconnecting",
                self.cfg.client.server
            );
        }
        log::debug!("engine for {} stopped", self.cfg.client.server);
    }

    /// Connects again with backoff, resuming the session; `None` once there is nothing
    /// left to do or the export changed.
    async fn reconnect(&self) -> Option<Connection> {
        let mut delay = BACKOFF_START;
        let mut attempts = 0u32;
        loop {
            if self.finished() {
                return None;
            }
            let session = self.state.lock().unwrap().session;
            let attempt =
                async { Some(Connection::connect(&self.cfg.client, Some(session)).await) };
            let limit = async {
                smol::Timer::after(self.timeout().max(Duration::from_secs(1))).await;
                None
            };
            attempts += 1;
            match attempt.or(limit).await {
                Some(Ok(c)) => {
                    let info = c.info();
                    if info.size != self.info.size || info.export != self.info.export {
                        log::error!(
                            "export '{}' changed on the server (size {} -> {}): refusing to continue; remount it",
                            self.info.export,
                            self.info.size,
                            info.size
                        );
                        let failed = {
                            let mut st = self.state.lock().unwrap();
                            st.fatal = Some(libc::EIO);
                            st.table.drain()
                        };
                        self.fail(failed, libc::EIO);
                        return None;
                    }
                    let how = if info.resumed {
                        "session resumed"
                    } else {
                        "the server lost the session; new session"
                    };
                    log::info!(
                        "reconnected to {} after {attempts} attempts ({how})",
                        self.cfg.client.server
                    );
                    let mut st = self.state.lock().unwrap();
                    st.stats.reconnects += 1;
                    st.down_since = None;
                    st.session = info.session;
                    let unflushed = st.acked_changes > st.flushed_changes;
                    if rebooted(&st.boot_id, info, unflushed) {
                        log::error!(
                            "the export node rebooted: writes acked since the last flush may be \
                             lost; the next flush reports EIO"
                        );
                        st.lost_unflushed = true;
                    }
                    st.boot_id = info.boot_id.clone();
                    return Some(c);
                }
                Some(Err(e)) => log::debug!(
                    "reconnect attempt {attempts} to {} failed: {e}",
                    self.cfg.client.server
                ),
                None => log::debug!(
                    "reconnect attempt {attempts} to {} timed out",
                    self.cfg.client.server
                ),
            }
            let room = self.room.listen();
            let sleep = async {
                smol::Timer::after(delay).await;
            };
            // Closing with nothing in flight ends the wait early.
            sleep.or(room).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Serves one connection until it fails or the engine is done; returns why it ended.
    async fn serve(self: &Arc<Self>, conn: Connection) -> String {
        let Parts {
            sender,
            receiver,
            hangup: stream,
            limits,
            ..
        } = conn.into_parts();
        let mut receiver = match receiver.into_blocking() {
            Ok(receiver) => receiver,
            Err(e) => return format!("cannot read the connection: {e}"),
        };
        {
            let mut st = self.state.lock().unwrap();
            st.table.requeue_all();
            st.stats.connected = true;
        }
        self.ping_due.store(false, Ordering::SeqCst);
        *self.send_error.lock().unwrap() = None;
        *self.wire.lock().await = Some(Wire {
            sender,
            stream: stream.clone(),
            out: Outgoing::default(),
            batch: Vec::new(),
        });
        let link = Arc::new(Link {
            last_heard: Mutex::new(Instant::now()),
            ping_sent: Mutex::new(None),
        });
        // Replies are read on a thread of their own, which completes each transaction as
        // its reply is decrypted: the kernel wakes it, and it answers the caller directly.
        let (ended_tx, ended) = smol::channel::bounded(1);
        let (inner, reader_link) = (self.clone(), link.clone());
        let spawned = std::thread::Builder::new()
            .name("dst-replies".into())
            .spawn(move || {
                let why = smol::block_on(inner.read_replies(&mut receiver, &limits, &reader_link));
                let _ = ended_tx.send_blocking(why);
            });
        if let Err(e) = spawned {
            let _ = stream.shutdown(Shutdown::Both);
            *self.wire.lock().await = None;
            return format!("cannot start the reply reader: {e}");
        }
        let replies_ended = async {
            ended
                .recv()
                .await
                .unwrap_or_else(|_| "the reply reader stopped".into())
        };
        let done = async {
            loop {
                let room = self.room.listen();
                if self.finished() {
                    return "closed".to_string();
                }
                room.await;
            }
        };
        let why = self
            .write_requests()
            .or(replies_ended)
            .or(self.watchdog(&link))
            .or(done)
            .await;
        let why = self.send_error.lock().unwrap().take().unwrap_or(why);
        // Threads blocked sending or reading on this connection let go once the socket is
        // shut; the reader is waited for, so nothing of this connection completes after
        // the next one starts.
        let _ = stream.shutdown(Shutdown::Both);
        let _ = ended.recv().await;
        *self.wire.lock().await = None;
        why
    }

    /// Sends what is queued without a submitter to send it: everything after a reconnect,
    /// resends, pings.
    async fn write_requests(&self) -> String {
        loop {
            let queued = self.queued.listen();
            self.send_queued().await;
            queued.await;
        }
    }

    async fn read_replies(
        &self,
        receiver: &mut Receiver<ThreadReader>,
        limits: &Limits,
        link: &Link,
    ) -> String {
        loop {
            // Read data is decrypted straight into the buffer handed to the caller.
            match receiver.recv_owned(limits, &self.pool).await {
                Ok(Some(OwnedFrame {
                    head: Head::Reply(h),
                    payload,
                })) => {
                    *link.last_heard.lock().unwrap() = Instant::now();
                    *link.ping_sent.lock().unwrap() = None;
                    if h.txid != PING_TXID {
                        self.complete(h.txid, h.status, payload);
                    }
                }
                Ok(Some(_)) => return "the server sent a frame other than a reply".into(),
                Ok(None) => return "closed by the server".into(),
                Err(e) => return e.to_string(),
            }
        }
    }

    /// Pings when nothing was heard for a ping interval; a ping unanswered for another
    /// interval ends the connection.
    async fn watchdog(&self, link: &Link) -> String {
        let interval = self.cfg.ping_interval;
        let tick = (interval / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            smol::Timer::after(tick).await;
            let now = Instant::now();
            let mut ping_sent = link.ping_sent.lock().unwrap();
            match *ping_sent {
                Some(at) if now - at > interval => {
                    return format!("no answer to a ping within {interval:?}");
                }
                Some(_) => {}
                None if now - *link.last_heard.lock().unwrap() >= interval => {
                    *ping_sent = Some(now);
                    self.ping_due.store(true, Ordering::SeqCst);
                    self.queued.notify(1);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{chunks, rebooted};
    use crate::protocol::{Access, ExportInfo};

    #[test]
    fn only_a_reboot_with_unflushed_changes_counts_as_a_loss() {
        let info = |boot: &str, resumed| ExportInfo {
            version: 1,
            export: "disk".into(),
            access: Access::ReadWrite,
            session: [0; 16],
            resumed,
            boot_id: boot.into(),
            size: 1 << 20,
            block_size: 4096,
            max_transfer: 1 << 20,
            features: 0,
        };
        assert!(rebooted("a", &info("b", false), true));
        assert!(
            !rebooted("a", &info("b", false), false),
            "everything was flushed"
        );
        assert!(
            !rebooted("a", &info("a", false), true),
            "process restart: page cache kept"
        );
        assert!(
            !rebooted("a", &info("b", true), true),
            "session resumed: same server"
        );
        assert!(
            !rebooted("a", &info("", false), true),
            "server does not say"
        );
    }

    #[test]
    fn chunks_cover_the_range() {
        assert_eq!(chunks(10, 0, 4).collect::<Vec<_>>(), vec![(10, 0)]);
        assert_eq!(chunks(10, 4, 4).collect::<Vec<_>>(), vec![(10, 4)]);
        assert_eq!(
            chunks(10, 9, 4).collect::<Vec<_>>(),
            vec![(10, 4), (14, 4), (18, 1)]
        );
    }
}
