//! The client transaction engine's driver: every read, write, flush and trim is a
//! transaction that lives until the export node acks it. The decisions — admission into
//! the window, resends, pings, reconnect backoff, durability — are the [`Core`]'s; this
//! module does the I/O and the waiting around it, calling the core under one lock.
//!
//! Callers submit concurrently and wait for room in the window rather than grow memory.
//! A request is encrypted and sent by the thread that submits it, so it reaches the
//! socket without waking another thread, and a large write is sealed straight from the
//! caller's buffer into the one kept for resends; a thread that finds another sending
//! copies its request and leaves it to that one, which sends everything queued in one
//! batch. A writer task sends what no submitter does: resends, pings, what waited for a
//! connection. One driver task
//! keeps a connection: a reader thread resolves transactions from replies and calls their
//! completions right there. A timer task wakes when the core says and lets it resend,
//! fail, ping or declare the connection dead. A lost connection is re-established when
//! the core's backoff says, the session resumed, and every unacked transaction sent
//! again; the server's reply cache makes those resends execute at most once. The
//! connection's life and the timer are in `driver`; the awaited operations, split into as
//! many transactions as the server's limits require, in `ops`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use smol::net::{Shutdown, TcpStream};

use super::core::{self, Blocked, Core, CoreConfig, Failures, Request};
use super::stats::Stats;
use super::table::{Payload, Window};
use super::{ClientConfig, ClientError, Connection};
use crate::channel::{ChannelError, Hangup, Outgoing, Sender};
use crate::pool::Pool;
use crate::protocol::{self, ExportInfo, Op, RequestHeader, FLAG_FUA};

mod driver;
mod ops;

/// Requests encoded into one channel send, at most (beyond the first).
const SEND_BATCH: usize = 1 << 20;
/// Bytes of idle buffers the pool keeps at most.
const POOL_BYTES: usize = 16 << 20;
/// Read replies from this size on are handed to their callers on an executor thread.
const HANDOFF_BYTES: usize = 64 << 10;
/// Shortest sleep of the timer: deadlines a hair apart are met in one wake-up.
const TIMER_MIN: Duration = Duration::from_millis(1);

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

/// The sending half of the current connection, taken by whichever thread sends.
struct Wire {
    sender: Sender<TcpStream>,
    stream: Hangup,
    out: Outgoing,
    batch: Vec<(RequestHeader, Arc<Payload>)>,
}

/// A handle on the engine; clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: EngineConfig,
    info: ExportInfo,
    state: Mutex<Core<Done>>,
    /// Something was queued for sending.
    queued: Event,
    /// The window has room.
    room: Event,
    /// Closed with nothing left in flight: the connection's tasks end. Apart from `room`,
    /// so that they are not woken at every ack.
    finished: Event,
    /// The core's next wake-up may be earlier than the timer sleeps (a new connection),
    /// or the engine is closing.
    rewake: Event,
    /// The export grew.
    resized: Event,
    pool: Pool,
    driver: Mutex<Option<smol::Task<()>>>,
    /// `None` while there is no connection.
    wire: smol::lock::Mutex<Option<Wire>>,
    /// Hangs up the current connection, for ending it from outside its tasks.
    hangup: Mutex<Option<Hangup>>,
    /// Why the current connection failed or was ended, if it was.
    send_error: Mutex<Option<String>>,
}

impl Engine {
    /// Connects for the first time; an unreachable or refusing server is an error here,
    /// not retried. Then keeps the connection up until [`Engine::close`].
    pub async fn start(cfg: EngineConfig) -> Result<Engine, ClientError> {
        let conn = Connection::connect(&cfg.client, None).await?;
        let info = conn.info().clone();
        let core_cfg = CoreConfig {
            resend_timeout: cfg.resend_timeout,
            resend_count: cfg.resend_count,
            ping_interval: cfg.ping_interval,
            window: Window {
                requests: cfg.window_requests.max(1),
                bytes: cfg.window_bytes,
            },
        };
        let inner = Arc::new(Inner {
            // Enough buffers for a steady stream of the largest writes; beyond that the
            // allocator does as well, and resident memory stays lower.
            pool: Pool::new(cfg.window_bytes.min(POOL_BYTES)),
            state: Mutex::new(Core::new(core_cfg, &info, Instant::now())),
            cfg,
            info,
            queued: Event::new(),
            room: Event::new(),
            finished: Event::new(),
            rewake: Event::new(),
            resized: Event::new(),
            driver: Mutex::new(None),
            wire: smol::lock::Mutex::new(None),
            hangup: Mutex::new(None),
            send_error: Mutex::new(None),
        });
        let driver = smol::spawn(inner.clone().drive(conn));
        *inner.driver.lock().unwrap() = Some(driver);
        smol::spawn(inner.clone().timer()).detach();
        Ok(Engine { inner })
    }

    /// The export as negotiated on the first connection; its size now is
    /// [`Engine::size`].
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// The export's size now: it grows when the server's export does.
    pub fn size(&self) -> u64 {
        self.inner.state.lock().unwrap().size()
    }

    /// Waits until the export's size is other than `known`, and returns it.
    pub async fn resized(&self, known: u64) -> u64 {
        loop {
            let resized = self.inner.resized.listen();
            let size = self.size();
            if size != known {
                return size;
            }
            resized.await;
        }
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

    /// Starts a flush without waiting, as [`Engine::start_read`].
    pub fn start_flush(&self, done: impl FnOnce(Result<(), i32>) + Send + 'static) {
        let done = Box::new(move |outcome: Outcome| done(outcome.map(drop)));
        self.begin(Op::Flush, 0, 0, 0, Vec::new(), done);
    }

    /// Starts a write of the caller's `data` without waiting, as [`Engine::start_read`].
    /// The engine keeps the data until the ack, for resends: when this thread can send it
    /// at once (nobody else sending, room in the window), sealed straight from `data` as
    /// it is sent; otherwise as a plain copy.
    pub fn start_write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        done: impl FnOnce(Result<(), i32>) + Send + 'static,
    ) {
        if data.len() > self.inner.info.max_transfer as usize {
            // Over what the server takes at once: split, from a copy.
            let (engine, data) = (self.clone(), self.inner.pool.copy_of(data));
            smol::spawn(async move {
                let result = engine.write(offset, &data, fua).await;
                engine.recycle(data);
                done(result)
            })
            .detach();
            return;
        }
        let flags = if fua { FLAG_FUA } else { 0 };
        let done: Done = Box::new(move |outcome: Outcome| done(outcome.map(drop)));
        let tx = write_request(flags, offset, data, done);
        if let Err(tx) = smol::block_on(self.inner.send_sealed(tx, data)) {
            self.enter_or_wait(tx);
        }
    }

    /// Enters a transaction and sends it from this thread if the window has room; else a
    /// task waits for room.
    fn begin(&self, op: Op, flags: u8, offset: u64, length: u32, data: Vec<u8>, done: Done) {
        let tx = core::request(op, flags, offset, length, data, Instant::now(), done);
        self.enter_or_wait(tx);
    }

    fn enter_or_wait(&self, tx: Request<Done>) {
        match self.inner.try_enter(tx) {
            // Sent from this thread, which saves waking the writer; a thread already
            // sending sends it too, with what gathered meanwhile, in one batch.
            Ok(()) => smol::block_on(self.inner.send_queued()),
            Err(Blocked::Failed(errno, done)) => done(Err(errno)),
            Err(Blocked::NoRoom(tx)) => {
                let inner = self.inner.clone();
                smol::spawn(async move {
                    if let Err((errno, done)) = inner.enter(tx).await {
                        done(Err(errno));
                    }
                })
                .detach();
            }
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.state.lock().unwrap().stats()
    }

    /// Waits until every transaction is acked or failed, then disconnects.
    pub async fn close(&self) {
        self.inner.state.lock().unwrap().close();
        self.inner.room.notify(usize::MAX);
        self.inner.finished.notify(usize::MAX);
        self.inner.queued.notify(usize::MAX);
        self.inner.rewake.notify(usize::MAX);
        let driver = self.inner.driver.lock().unwrap().take();
        if let Some(driver) = driver {
            driver.await;
        }
    }
}

impl Inner {
    /// Enters a transaction, waiting for room in the window, and sends it; returns where
    /// its outcome arrives.
    async fn submit(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u32,
    ) -> Result<smol::channel::Receiver<Outcome>, i32> {
        let (done, outcome) = awaited();
        let tx = core::request(op, flags, offset, length, Vec::new(), Instant::now(), done);
        self.enter(tx).await.map_err(|(errno, _)| errno)?;
        Ok(outcome)
    }

    /// Enters a write of `data`, as [`Engine::start_write`] keeps it; returns where its
    /// outcome arrives.
    async fn submit_write(
        &self,
        flags: u8,
        offset: u64,
        data: &[u8],
    ) -> Result<smol::channel::Receiver<Outcome>, i32> {
        let (done, outcome) = awaited();
        let tx = write_request(flags, offset, data, done);
        if let Err(tx) = self.send_sealed(tx, data).await {
            self.enter(tx).await.map_err(|(errno, _)| errno)?;
        }
        Ok(outcome)
    }

    /// Enters a transaction once the window has room, and sends it.
    async fn enter(&self, mut tx: Request<Done>) -> Result<(), (i32, Done)> {
        loop {
            let room = self.room.listen();
            match self.try_enter(tx) {
                Ok(()) => break,
                Err(Blocked::Failed(errno, done)) => return Err((errno, done)),
                Err(Blocked::NoRoom(back)) => tx = back,
            }
            room.await;
        }
        self.send_queued().await;
        Ok(())
    }

    /// Enters a transaction if the core admits it now.
    fn try_enter(&self, tx: Request<Done>) -> Result<(), Blocked<Done>> {
        self.state.lock().unwrap().submit(Instant::now(), tx)
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
            if !self.state.lock().unwrap().wants_send() {
                return;
            }
        }
    }

    /// Enters a write and sends it from this thread, sealing its payload straight from
    /// `data` into the buffer the table keeps ([`Payload::Sealed`]). When that cannot be
    /// done now (another thread sending, no connection, no room in the window) or is not
    /// worth it (a payload small enough to copy in with its head, as [`Outgoing::INLINE`]
    /// says), hands the request back with a plain copy of `data`, to enter as usual.
    async fn send_sealed(&self, mut tx: Request<Done>, data: &[u8]) -> Result<(), Request<Done>> {
        let copied = |mut tx: Request<Done>| {
            tx.data = Arc::new(Payload::Plain(self.pool.copy_of(data)));
            Err(tx)
        };
        if data.len() < Outgoing::INLINE {
            return copied(tx);
        }
        let Some(mut guard) = self.wire.try_lock() else {
            return copied(tx);
        };
        let Some(wire) = guard.as_mut() else {
            return copied(tx);
        };
        // Nobody else sends while this thread holds the wire, so nobody sees the payload
        // before it is attached.
        tx.data = Arc::new(Payload::Sealing);
        let submitted = self.state.lock().unwrap().submit_sent(Instant::now(), tx);
        let h = match submitted {
            Ok(h) => h,
            Err(Blocked::NoRoom(tx)) => return copied(tx),
            Err(Blocked::Failed(errno, done)) => {
                done(Err(errno));
                return Ok(());
            }
        };
        let Wire {
            sender,
            stream,
            out,
            ..
        } = wire;
        out.clear();
        protocol::encode_request_head(out.staged(), &h, data.len());
        let buf = self.pool.take(data.len());
        let (sealed, sent) = sender.send_apart(out.staged(), data, buf).await;
        // Attached whether or not it went out: a lost connection's transactions are sent
        // again on the next. A reply may have resolved it already.
        let attached = self
            .state
            .lock()
            .unwrap()
            .attach(h.txid, Payload::Sealed(sealed));
        if let Err(payload) = attached {
            self.recycle_payload(payload);
        }
        if let Err(e) = sent {
            self.send_failed(stream, e);
            return Ok(());
        }
        // What other threads queued meanwhile.
        drop(guard);
        self.send_queued().await;
        Ok(())
    }

    /// Encrypts and sends one batch of what the core has to send; false once nothing was
    /// left or sending failed (which ends the connection).
    async fn send_batch(&self, wire: &mut Wire) -> bool {
        let Wire {
            sender,
            stream,
            out,
            batch,
        } = wire;
        batch.clear();
        self.state
            .lock()
            .unwrap()
            .poll_transmit(Instant::now(), batch, SEND_BATCH);
        if batch.is_empty() {
            return false;
        }
        // Payloads first sent sealed (resends) are opened, to be sealed for this connection.
        let mut opened = Vec::new();
        for (h, payload) in batch.iter() {
            if let Payload::Sealed(sealed) = &**payload {
                let mut plain = self.pool.take(sealed.plain_len());
                match sealed.open(&mut plain) {
                    Ok(()) => opened.push((h.txid, plain)),
                    Err(_) => log::error!("transaction {}: its kept payload does not open", h.txid),
                }
            }
        }
        out.clear();
        for (i, item) in batch.iter().enumerate() {
            let h = &item.0;
            // A payload not yet attached or not opened: the transaction is sent again
            // when its deadline passes.
            let Some(data) = plaintext(item, &opened) else {
                continue;
            };
            if data.len() < Outgoing::INLINE {
                protocol::encode_request(out.staged(), h, data);
            } else {
                protocol::encode_request_head(out.staged(), h, data.len());
                out.payload(i);
            }
        }
        let parts = out.parts(|i| plaintext(&batch[i], &opened).unwrap_or_default());
        let sent = sender.send_parts(&parts).await;
        drop(parts);
        batch.clear();
        for (_, plain) in opened {
            self.pool.put(plain);
        }
        match sent {
            Ok(()) => true,
            Err(e) => {
                self.send_failed(stream, e);
                false
            }
        }
    }

    /// Sending on the current connection failed: it ends. The reader sees the socket shut
    /// and ends the connection with this reason; what was sent on it is sent again on the
    /// next one.
    fn send_failed(&self, stream: &Hangup, e: ChannelError) {
        self.send_error.lock().unwrap().get_or_insert(e.to_string());
        let _ = stream.shutdown(Shutdown::Both);
    }

    /// Gives a payload's buffer back to the pool.
    fn recycle_payload(&self, payload: Payload) {
        match payload {
            Payload::Plain(data) => self.pool.put(data),
            Payload::Sealed(sealed) => self.pool.put(sealed.into_buffer()),
            Payload::Sealing => {}
        }
    }

    /// Hands a reply to the core, and completes the transaction it resolves, if any.
    fn complete(&self, txid: u64, status: u32, data: Vec<u8>) {
        let (resolved, finished) = {
            let mut st = self.state.lock().unwrap();
            let resolved = st.on_reply(Instant::now(), txid, status, data.len());
            (resolved, st.finished())
        };
        if finished {
            self.finished.notify(usize::MAX);
        }
        let Some(done) = resolved else {
            self.pool.put(data);
            return;
        };
        self.room.notify(usize::MAX);
        let outcome = match done.result {
            Ok(()) => Ok(data),
            Err(errno) => {
                self.pool.put(data);
                Err(errno)
            }
        };
        let waiter = done.waiter;
        match &outcome {
            // Handing a large read to its caller is a copy as long as the decryption: on
            // another thread, the reader goes on decrypting the next reply meanwhile.
            Ok(data) if data.len() >= HANDOFF_BYTES => {
                smol::spawn(async move { waiter(outcome) }).detach();
            }
            _ => waiter(outcome),
        }
        // Unless a resend of it is being encrypted right now, the buffer is free again.
        if let Ok(payload) = Arc::try_unwrap(done.data) {
            self.recycle_payload(payload);
        }
    }

    fn fail(&self, failed: Failures<Done>) {
        if failed.is_empty() {
            return;
        }
        for (done, errno) in failed {
            done(Err(errno));
        }
        self.room.notify(usize::MAX);
        if self.state.lock().unwrap().finished() {
            self.finished.notify(usize::MAX);
        }
    }

    /// Ends the current connection, for `why`; the driver then reconnects.
    fn cut(&self, why: String) {
        self.send_error.lock().unwrap().get_or_insert(why);
        if let Some(hangup) = self.hangup.lock().unwrap().as_ref() {
            let _ = hangup.shutdown(Shutdown::Both);
        }
    }
}

/// A completion that hands the outcome to the receiver returned, for awaiting it.
fn awaited() -> (Done, smol::channel::Receiver<Outcome>) {
    let (sender, outcome) = smol::channel::bounded(1);
    let done: Done = Box::new(move |o| {
        let _ = sender.try_send(o);
    });
    (done, outcome)
}

/// A write of `data`, its payload to be sealed from it or copied.
fn write_request(flags: u8, offset: u64, data: &[u8], done: Done) -> Request<Done> {
    let len = data.len() as u32;
    core::request(
        Op::Write,
        flags,
        offset,
        len,
        Vec::new(),
        Instant::now(),
        done,
    )
}

/// The plaintext to send for a batch item: its own, or what `opened` holds for it; `None`
/// while it has none to send.
fn plaintext<'a>(
    item: &'a (RequestHeader, Arc<Payload>),
    opened: &'a [(u64, Vec<u8>)],
) -> Option<&'a [u8]> {
    match &*item.1 {
        Payload::Plain(data) => Some(data),
        Payload::Sealed(_) => opened
            .iter()
            .find(|(txid, _)| *txid == item.0.txid)
            .map(|(_, plain)| plain.as_slice()),
        Payload::Sealing => None,
    }
}
