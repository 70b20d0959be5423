//! The export node: listening, handshakes, negotiation, sessions, permissions, and the
//! execution of requests on the exports.
//!
//! Connections are admitted to the handshake by `admission`, and handshakes run on threads
//! of their own (`handshakers`); then each connection has two reader threads, taking turns,
//! that decode requests, write payloads decrypted straight into pooled buffers. Requests
//! run on the I/O threads, so a slow disk never stalls the network (a lone request runs on
//! a reader, the other one reading meanwhile), and the thread that executed a request
//! sends its reply (see `replies`). A session outlives its connection: a client that
//! reconnects resumes it, and its reply cache answers resent transactions.

pub mod admission;
pub mod auth;
mod baton;
pub mod budget;
pub mod checksums;
pub mod export;
pub mod fair;
mod flush_group;
mod handshakers;
pub mod limits;
pub mod negotiation;
mod replies;
pub mod reply_cache;
mod session;
pub mod sessions;
pub mod workers;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use smol::future::FutureExt;
use smol::net::{Shutdown, TcpListener, TcpStream};

use crate::blocking::ThreadReader;
use crate::channel::{self, Cipher, FirstFlight, OwnedFrame, Sender};
use crate::keys::{PrivateKey, PublicKey};
use crate::pool::Pool;
use crate::protocol::{
    self, features, Access, ExportInfo, Frame, Head, Hello, Limits, Op, ReplyHeader, RequestHeader,
    SessionId, Welcome, FLAG_FUA, MAX_NEGOTIATION, PROTOCOL_VERSION,
};
use crate::socket::Congestion;
use admission::{Admitted, HandshakeSlot, Handshakes, Kind, Prefix, Rates, RefusalLog};
use auth::AuthorizedKeys;
use baton::Baton;
use budget::{Admission, Budget};
use export::{Export, ExportSpec};
use handshakers::Handshakers;
use limits::{Slot, Tally};
use negotiation::Refused;
use replies::{Replies, Reply};
use reply_cache::{Admit, ReplyCache};
use session::Session;
use sessions::{Ask, EndReason, Ended, SessionLimits, SessionTable};
use workers::Workers;

/// Everything a server is started with.
#[derive(Debug)]
pub struct Config {
    pub key: PrivateKey,
    pub authorized_keys: AuthorizedKeys,
    /// Where the allowlist came from, for messages.
    pub authorized_keys_path: PathBuf,
    pub exports: Vec<ExportSpec>,
    /// Size of the sparse image to create for an export whose file does not exist.
    pub create_size: Option<u64>,
    pub listen: SocketAddr,
    pub ciphers: Vec<Cipher>,
    /// Largest transfer the server agrees to.
    pub max_transfer: u32,
    /// Time a client has to send its first handshake message.
    pub first_flight_timeout: Duration,
    /// Time a client has to finish the handshake and negotiation.
    pub handshake_timeout: Duration,
    /// How long a disconnected session is kept for its client to resume it.
    pub session_linger: Duration,
    /// Sessions of one client key, connected or lingering.
    pub max_sessions_per_key: usize,
    /// Sessions in all, connected or lingering.
    pub max_sessions: usize,
    /// Bytes of requests one session may have executing or queued for reply.
    pub session_window: usize,
    /// Requests one session may have executing or queued for reply.
    pub session_requests: usize,
    /// Bytes of requests all sessions may hold at once, with each connection's reserve.
    pub memory_budget: usize,
    /// Bytes of requests the sessions of one client key may hold at once.
    pub memory_per_key: usize,
    /// Authenticated connections open at once, in all.
    pub max_connections: usize,
    /// Connections open at once with one client key.
    pub max_connections_per_key: usize,
    /// Connections in the handshake at once, in all; more drop the oldest.
    pub max_handshakes: usize,
    /// Connections in the handshake at once from one address prefix (/24, /64).
    pub max_handshakes_per_prefix: usize,
    /// TCP congestion control of the connections.
    pub congestion: Congestion,
}

impl Config {
    pub const DEFAULT_MAX_TRANSFER: u32 = 1 << 20;
    pub const DEFAULT_FIRST_FLIGHT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_SESSION_LINGER: Duration = Duration::from_secs(120);
    pub const DEFAULT_MAX_SESSIONS_PER_KEY: usize = 32;
    pub const DEFAULT_MAX_SESSIONS: usize = 256;
    pub const DEFAULT_SESSION_WINDOW: usize = 64 << 20;
    pub const DEFAULT_SESSION_REQUESTS: usize = 256;
    pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    pub const DEFAULT_MAX_CONNECTIONS_PER_KEY: usize = 16;
    pub const DEFAULT_MAX_HANDSHAKES: usize = 128;
    pub const DEFAULT_MAX_HANDSHAKES_PER_PREFIX: usize = 16;
}

/// Negotiation happens before any transfer size is agreed.
const NEGOTIATION_LIMITS: Limits = Limits {
    max_transfer: MAX_NEGOTIATION as u32,
};
/// Bytes of idle payload buffers kept for reuse.
const POOL_BYTES: usize = 32 << 20;

/// Threads for export I/O: one a core, at least two so that a slow flush does not hold up
/// every write, at most eight.
fn io_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Budget a request holds at least: what its reply costs to queue.
const REPLY_COST: usize = 128;
/// What a connection holds besides its requests (channel buffers, a sealed batch of
/// replies, its reader threads), charged to the budget when it is admitted.
pub const CONNECTION_OVERHEAD: usize = 512 << 10;
/// Reply cache entries a session keeps, per request it may have in progress: the cache
/// must remember every transaction the client may still resend.
const CACHE_PER_REQUEST: usize = 4;

/// A running server: bound, with its exports open.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    key: PrivateKey,
    authorized_keys: RwLock<AuthorizedKeys>,
    authorized_keys_path: PathBuf,
    exports: HashMap<String, Arc<Export>>,
    ciphers: Vec<Cipher>,
    max_transfer: u32,
    first_flight_timeout: Duration,
    handshake_timeout: Duration,
    session_linger: Duration,
    /// Room for the requests of every session.
    budget: Arc<Budget>,
    session_requests: usize,
    /// Authenticated connections; those in the handshake are in `handshakes`.
    connections: Tally<()>,
    per_key: Tally<PublicKey>,
    handshakes: Handshakes,
    rates: Mutex<Rates>,
    refusals: Mutex<RefusalLog>,
    handshakers: Handshakers,
    sessions: Mutex<SessionTable<Arc<Session>>>,
    /// The I/O threads, taking requests in turns by client key.
    workers: Workers<PublicKey>,
    /// Payload buffers: write data on its way to the disk, read data on its way out.
    pool: Arc<Pool>,
    shutting_down: AtomicBool,
    stop: event_listener::Event,
    /// Requests executing on the I/O threads, over all sessions.
    executing: AtomicUsize,
    idle: event_listener::Event,
    next_conn: AtomicU64,
    boot_id: String,
}

/// A connection after negotiation: its channel halves, its session, its place among its
/// key's connections, among all, and in the budget.
type Opened = (
    Sender<TcpStream>,
    channel::Receiver<TcpStream>,
    Arc<Session>,
    Places,
);

/// A connection's places among its key's connections, among all, and in the budget;
/// given back when it closes.
struct Places {
    _key: Slot<PublicKey>,
    _all: Slot<()>,
    _budget: Admission,
}

/// Why a connection was not opened.
enum Unopened {
    /// Its handshake place went to a newer connection; logged when that one came.
    Evicted,
    /// Failed before the client proved its key, or timed out: logged rate-limited.
    Stranger(Kind, String),
    /// Refused or failed in the negotiation, the client's key proved.
    Negotiation(String),
}

impl Server {
    /// Binds the listening socket and opens the exports.
    pub async fn bind(cfg: Config) -> Result<Server, String> {
        // Bound first, so that a bad address or congestion control creates no image.
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        // Accepted connections take the listener's congestion control.
        cfg.congestion
            .apply(&listener)
            .map_err(|e| format!("--congestion-control: {e}"))?;
        let mut exports = HashMap::new();
        for spec in &cfg.exports {
            if exports.contains_key(&spec.name) {
                return Err(format!("export '{}' is given twice", spec.name));
            }
            let export = Export::open(spec, cfg.create_size)?;
            log::info!(
                "export '{}': {} ({} bytes{})",
                export.name,
                export.path.display(),
                export.size,
                if export.read_only { ", read-only" } else { "" }
            );
            exports.insert(spec.name.clone(), Arc::new(export));
        }
        if exports.is_empty() {
            return Err("no exports; give at least one --export NAME=PATH".into());
        }
        let shared = Arc::new(Shared {
            key: cfg.key,
            authorized_keys: RwLock::new(cfg.authorized_keys),
            authorized_keys_path: cfg.authorized_keys_path,
            exports,
            ciphers: cfg.ciphers,
            max_transfer: cfg
                .max_transfer
                .clamp(64 << 10, protocol::MAX_TRANSFER_LIMIT),
            first_flight_timeout: cfg.first_flight_timeout,
            handshake_timeout: cfg.handshake_timeout,
            session_linger: cfg.session_linger,
            budget: Budget::new(budget::Bounds {
                total: cfg.memory_budget,
                per_key: cfg.memory_per_key,
                session_bytes: cfg.session_window.max(cfg.max_transfer as usize * 2),
                session_requests: cfg.session_requests.max(1),
                reserve: cfg.max_transfer as usize,
                overhead: CONNECTION_OVERHEAD,
            }),
            session_requests: cfg.session_requests.max(1),
            connections: Tally::new(cfg.max_connections),
            per_key: Tally::new(cfg.max_connections_per_key),
            handshakes: Handshakes::new(cfg.max_handshakes, cfg.max_handshakes_per_prefix),
            rates: Mutex::new(Rates::new()),
            refusals: Mutex::new(RefusalLog::new()),
            handshakers: Handshakers::new(handshakers::threads())
                .map_err(|e| format!("cannot start handshake threads: {e}"))?,
            sessions: Mutex::new(SessionTable::new(SessionLimits {
                per_key: cfg.max_sessions_per_key.max(1),
                total: cfg.max_sessions.max(1),
                linger: cfg.session_linger,
            })),
            workers: Workers::new(io_threads(), cfg.max_transfer as u64 + fair::BASE_COST)
                .map_err(|e| format!("cannot start I/O threads: {e}"))?,
            pool: Arc::new(Pool::new(POOL_BYTES)),
            shutting_down: AtomicBool::new(false),
            stop: event_listener::Event::new(),
            executing: AtomicUsize::new(0),
            idle: event_listener::Event::new(),
            next_conn: AtomicU64::new(1),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        });
        Ok(Server { listener, shared })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle for reloading the allowlist while the server runs.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.clone())
    }

    /// Serves until `stop` resolves, then finishes executing requests, syncs every
    /// export and returns.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> io::Result<()> {
        let shared = self.shared.clone();
        // Each second: refusals held back are summarised even once a flood stops, and
        // sessions past their linger time let go of what they hold.
        let _ticks = smol::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    smol::Timer::after(Duration::from_secs(1)).await;
                    let lines = shared.refusals.lock().unwrap().flush(Instant::now());
                    for (kind, line) in lines {
                        log::log!(kind.level(), "{line}");
                    }
                    shared.expire_sessions();
                }
            }
        });
        let accept = async {
            loop {
                match self.listener.accept().await {
                    // Admission costs no crypto and no task; a refused stream is closed
                    // at once, since answering would cost what the limits protect.
                    Ok((stream, peer)) => {
                        if let Some(slot) = shared.admit(peer, Instant::now()) {
                            let _ = stream.set_nodelay(true);
                            let shared = shared.clone();
                            smol::spawn(async move { shared.serve(stream, peer, slot).await })
                                .detach();
                        }
                    }
                    // Out of descriptors and the like: keep serving the others.
                    Err(e) => {
                        log::warn!("accept failed: {e}");
                        smol::Timer::after(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        accept.or(stop).await;
        log::info!("shutting down: finishing executing requests");
        shared.shutting_down.store(true, Ordering::SeqCst);
        shared.stop.notify(usize::MAX);
        loop {
            let idle = shared.idle.listen();
            if shared.executing.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
        for export in shared.exports.values() {
            if let Err(e) = export.sync() {
                log::error!("export '{}': final sync failed: {e}", export.name);
            }
        }
        // Let the last replies go out.
        smol::Timer::after(Duration::from_millis(100)).await;
        log::info!("all exports synced; bye");
        Ok(())
    }
}

/// Reloads the authorized keys of a running server (on SIGHUP, say).
pub struct Reloader(Arc<Shared>);

impl Reloader {
    /// Reads the authorized keys file again; new connections see the new list, and a key
    /// that is gone can no longer open or resume a session. On error the old list stays.
    pub fn reload(&self) -> Result<usize, String> {
        let keys = AuthorizedKeys::load(&self.0.authorized_keys_path)?;
        let n = keys.len();
        *self.0.authorized_keys.write().unwrap() = keys;
        Ok(n)
    }
}

impl Shared {
    /// Decides whether a connection from `peer` may start a handshake: within its
    /// prefix's rate and share, making room by dropping the oldest handshake if need be.
    fn admit(&self, peer: SocketAddr, now: Instant) -> Option<HandshakeSlot> {
        let prefix = Prefix::of(peer.ip());
        if !self.rates.lock().unwrap().allow(prefix, now) {
            let why = format!(
                "{peer}: over the handshake rate of prefix {prefix} ({}/s, burst {})",
                Rates::RATE,
                Rates::BURST
            );
            self.refused(Kind::Rate, why, now);
            return None;
        }
        match self.handshakes.admit(peer.ip()) {
            Admitted::PrefixFull => {
                let why = format!(
                    "{peer}: handshake limit for prefix {prefix}: {} in progress \
                     (--max-handshakes-per-prefix)",
                    self.handshakes.per_prefix()
                );
                self.refused(Kind::PrefixFull, why, now);
                None
            }
            Admitted::In(slot, evicted) => {
                if let Some(old) = evicted {
                    let why = format!(
                        "the oldest, from {old}, for one from {peer}: {} handshakes in progress \
                         (--max-handshakes)",
                        self.handshakes.max()
                    );
                    self.refused(Kind::Evicted, why, now);
                }
                Some(slot)
            }
        }
    }

    fn refused(&self, kind: Kind, what: String, now: Instant) {
        let line = self.refusals.lock().unwrap().note(kind, what, now);
        if let Some(line) = line {
            log::log!(kind.level(), "{line}");
        }
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, slot: HandshakeSlot) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let handshake = self.clone().handshake(conn, stream.clone(), slot);
        let (tx, rx, session, _places) = match self.handshakers.spawn(handshake).await {
            Ok(v) => v,
            Err(Unopened::Evicted) => return,
            Err(Unopened::Stranger(kind, why)) => {
                self.refused(kind, format!("{peer}: {why:?}"), Instant::now());
                return;
            }
            Err(Unopened::Negotiation(why)) => {
                log::info!("connection from {peer} closed: {why:?}");
                return;
            }
        };
        log::info!(
            "{peer}: client {} opened export '{}' {:?} (connection {conn})",
            session.client,
            session.export.name,
            session.access
        );
        let replies = Replies::new(tx, self.pool.clone());
        session.attach(conn, replies.clone());
        self.sessions.lock().unwrap().attach(&session.id, conn);
        let stopped = async {
            let stop = self.stop.listen();
            if !self.shutting_down.load(Ordering::SeqCst) {
                stop.await;
            }
            "the server is shutting down".to_string()
        };
        // Requests are read by threads of their own, which the kernel wakes when they come
        // and which hand each to a worker: no reactor between the socket and the disk. Two
        // take turns (see `baton`), so that one can run a lone request itself.
        let (ended_tx, ended) = smol::channel::bounded(2);
        let (closing_tx, closing) = smol::channel::bounded::<()>(1);
        let reader = ThreadReader::new(&stream).and_then(|reader| {
            let baton = Arc::new(Baton::new(rx.with_reader(reader)));
            for _ in 0..2 {
                let (shared, session, baton) = (self.clone(), session.clone(), baton.clone());
                let (closing, ended_tx) = (closing.clone(), ended_tx.clone());
                std::thread::Builder::new()
                    .name(format!("dst-conn-{conn}"))
                    .spawn(move || {
                        let read = shared.read_requests(&session, conn, &baton, &closing);
                        let _ = ended_tx.send_blocking(smol::block_on(read));
                        baton.end();
                    })?;
            }
            Ok(())
        });
        drop(ended_tx);
        let why = match reader {
            Ok(_) => {
                let read = async {
                    ended
                        .recv()
                        .await
                        .unwrap_or_else(|_| "the request reader stopped".into())
                };
                read.or(replies.ended()).or(stopped).await
            }
            Err(e) => format!("cannot start a reader for the connection: {e}"),
        };
        // The readers stop at once, blocked on the socket or on the window, and are waited
        // for, so nothing more of this connection executes once it is detached. Replies
        // already queued still go out.
        drop(closing_tx);
        let _ = stream.shutdown(Shutdown::Read);
        while ended.recv().await.is_ok() {}
        log::info!("{peer}: connection {conn} closed: {why}");
        session.detach(conn);
        self.sessions
            .lock()
            .unwrap()
            .detach(&session.id, conn, Instant::now());
        replies.close().await;
    }

    /// The handshake and the negotiation, each within its deadline, unless the connection's
    /// place is given to a newer one first. Its place is given back once it has opened.
    async fn handshake(
        self: Arc<Self>,
        conn: u64,
        stream: TcpStream,
        slot: HandshakeSlot,
    ) -> Result<Opened, Unopened> {
        let (mut reader, mut writer) = (stream.clone(), stream);
        let open = async {
            let flight = async {
                channel::accept_first_flight(&mut reader, &mut writer, &self.ciphers)
                    .await
                    .map_err(|e| Unopened::Stranger(Kind::Failed, e.to_string()))
            };
            let late = async {
                smol::Timer::after(self.first_flight_timeout).await;
                Err(Unopened::Stranger(
                    Kind::FirstFlight,
                    format!(
                        "sent no first handshake message within {:?}",
                        self.first_flight_timeout
                    ),
                ))
            };
            let flight = flight.or(late).await?;
            self.open(conn, flight, reader, writer).await
        };
        let timeout = async {
            smol::Timer::after(self.handshake_timeout).await;
            Err(Unopened::Stranger(
                Kind::Timeout,
                format!(
                    "did not finish the handshake within {:?}",
                    self.handshake_timeout
                ),
            ))
        };
        let evicted = async {
            slot.evicted().await;
            Err(Unopened::Evicted)
        };
        open.or(timeout).or(evicted).await
    }

    /// The rest of the handshake, and negotiation. Also returns the connection's places
    /// among its key's, among all and in the budget.
    async fn open(
        &self,
        conn: u64,
        flight: FirstFlight,
        reader: TcpStream,
        writer: TcpStream,
    ) -> Result<Opened, Unopened> {
        let (mut tx, mut rx, client) = flight
            .accept(reader, writer, &self.key, |key| {
                match self.authorized_keys.read().unwrap().lookup(key) {
                    Some(_) => Ok(()),
                    None => Err(format!(
                    "client key {key} is not in this server's authorized keys; its operator can \
                     add it there to admit this client"
                )),
                }
            })
            .await
            .map_err(|e| Unopened::Stranger(Kind::Failed, e.to_string()))?;
        // A first message can be replayed: the client has proved its key only once a record
        // of its own decrypts, so until then it is still a stranger.
        let hello = match rx.recv(&NEGOTIATION_LIMITS).await {
            Ok(Some(Frame::Hello(h))) => h,
            Ok(Some(_)) => return Err(Unopened::Negotiation("first frame is not HELLO".into())),
            Ok(None) => {
                let why = "closed before negotiation".into();
                return Err(Unopened::Stranger(Kind::Failed, why));
            }
            Err(e) => return Err(Unopened::Stranger(Kind::Failed, e.to_string())),
        };
        let slot = self.per_key.try_take(&client);
        let open = self.connections.try_take(&());
        let admission = self.budget.admit(conn);
        let result = match (&slot, &open, &admission) {
            (Some(_), Some(_), Some(_)) => self.negotiate(&client, &hello),
            (Some(_), Some(_), None) => Err((
                libc::EAGAIN,
                "the server's memory budget is in use by other connections; try again later, \
                 or raise the server's --memory-budget"
                    .to_string(),
            )),
            (None, _, _) => Err((
                libc::EUSERS,
                format!(
                    "{} connections with this client key are open, the most allowed; close one, \
                     or raise the server's --max-connections-per-key",
                    self.per_key.max()
                ),
            )),
            (_, None, _) => Err((
                libc::EUSERS,
                format!(
                    "{} connections are open on this server, the most allowed; try again later, \
                     or raise the server's --max-connections",
                    self.connections.max()
                ),
            )),
        };
        let welcome = match &result {
            Ok(s) => Welcome::Accepted(ExportInfo {
                version: PROTOCOL_VERSION,
                export: s.export.name.clone(),
                access: s.access,
                session: s.id,
                resumed: hello.session == Some(s.id),
                boot_id: self.boot_id.clone(),
                size: s.export.size,
                block_size: s.export.block_size,
                max_transfer: self.max_transfer.min(hello.max_transfer.max(64 << 10)),
                features: features::ALL,
            }),
            Err((status, message)) => Welcome::Refused {
                status: *status as u32,
                message: message.clone(),
            },
        };
        let mut buf = Vec::new();
        protocol::encode_welcome(&mut buf, &welcome);
        tx.send(&buf)
            .await
            .map_err(|e| Unopened::Negotiation(e.to_string()))?;
        match result {
            Ok(s) => Ok((
                tx,
                rx,
                s,
                Places {
                    _key: slot.expect("negotiated only with a slot"),
                    _all: open.expect("negotiated only with a slot"),
                    _budget: admission.expect("negotiated only when admitted"),
                },
            )),
            Err((_, message)) => Err(Unopened::Negotiation(format!("refused: {message}"))),
        }
    }

    /// Decides whether a client may open what it asks for, and finds or makes its session.
    fn negotiate(&self, client: &PublicKey, hello: &Hello) -> Result<Arc<Session>, Refused> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err((libc::ESHUTDOWN, "the server is shutting down".into()));
        }
        let export = self.exports.get(&hello.export);
        let grant = self
            .authorized_keys
            .read()
            .unwrap()
            .grant(client, &hello.export);
        let target = export.map(|e| negotiation::Target {
            read_only: e.read_only,
        });
        negotiation::check(hello, target, grant)?;
        let export = export.expect("checked: the export exists");
        let ask = Ask {
            client: *client,
            export: &export.name,
            access: hello.access,
        };
        let mut sessions = self.sessions.lock().unwrap();
        if let Some(s) = hello.session.and_then(|id| sessions.resume(&id, &ask)) {
            return Ok(s);
        }
        let session = Arc::new(Session::new(
            random_id(),
            *client,
            export.clone(),
            hello.access,
            ReplyCache::new(self.session_requests * CACHE_PER_REQUEST),
        ));
        let now = Instant::now();
        let ended = sessions.expire(now);
        let made = sessions.create(session.id, &ask, session.clone(), now);
        drop(sessions);
        log_ended(ended);
        let gone =
            made.map_err(|r| negotiation::refused_session(&r, &export.name, self.session_linger))?;
        log_ended(gone);
        Ok(session)
    }

    /// Lets go of the sessions disconnected for longer than the linger time.
    fn expire_sessions(&self) {
        let ended = self.sessions.lock().unwrap().expire(Instant::now());
        log_ended(ended);
    }

    /// Reads and dispatches requests, in turns with the connection's other reader, until
    /// the connection ends or `closing` closes; returns why it ended.
    async fn read_requests(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn: u64,
        baton: &Baton<channel::Receiver<ThreadReader>>,
        closing: &smol::channel::Receiver<()>,
    ) -> String {
        let limits = Limits {
            max_transfer: self.max_transfer,
        };
        let Some(mut rx) = baton.take() else {
            return "closing".into();
        };
        loop {
            // Every request holds room in the budget until its reply is sent, taken before
            // its payload is read: a peer that floods requests and never reads replies is
            // throttled (its socket is not read), not buffered.
            let admit = |head: &Head| {
                let cost = match head {
                    Head::Request(h) if matches!(h.op, Op::Read | Op::Write) => h.length as usize,
                    _ => 0,
                };
                let acquire =
                    self.budget
                        .acquire(&session.client, &session.id, conn, cost.max(REPLY_COST));
                async {
                    let closed = async {
                        let _ = closing.recv().await;
                        None
                    };
                    async { Some(acquire.await) }.or(closed).await
                }
            };
            let (h, data, permit) = match rx.recv_admitted(&limits, &self.pool, admit).await {
                Ok(Some((
                    OwnedFrame {
                        head: Head::Request(h),
                        payload,
                    },
                    Some(permit),
                ))) => (h, payload, permit),
                Ok(Some((_, None))) => return "closing".into(),
                Ok(Some(_)) => return "unexpected frame after negotiation".into(),
                Ok(None) => return "closed by the client".into(),
                Err(e) => return e.to_string(),
            };
            let answer = |status, permit| Reply {
                header: ReplyHeader {
                    txid: h.txid,
                    status,
                },
                data: Vec::new(),
                _permit: permit,
            };
            let admit = match self.refuse(session, &h) {
                Some(status) => Admit::Answer(status),
                // A read-only session has no writes of its own to make durable.
                None if h.op == Op::Ping
                    || (h.op == Op::Flush && session.access == Access::ReadOnly) =>
                {
                    Admit::Answer(0)
                }
                None => session
                    .state()
                    .cache
                    .admit(h.txid, h.floor, h.op == Op::Read),
            };
            match admit {
                Admit::Execute => {}
                Admit::Join | Admit::Stale => {
                    self.pool.put(data);
                    continue;
                }
                Admit::Answer(status) => {
                    self.pool.put(data);
                    session.reply(conn, answer(status, permit));
                    continue;
                }
            }
            let alone = self.executing.fetch_add(1, Ordering::SeqCst) == 0;
            let (flow, cost) = (session.client, fair::cost(&h));
            let (shared, session, export) = (self.clone(), session.clone(), session.export.clone());
            // Whoever executes also answers: no task to wake between the disk and the reply.
            let job = move || {
                let pool = shared.pool.clone();
                let done = move |(status, read)| {
                    let header = ReplyHeader {
                        txid: h.txid,
                        status,
                    };
                    session.complete(
                        h.txid,
                        Reply {
                            header,
                            data: read,
                            _permit: permit,
                        },
                    );
                    if shared.executing.fetch_sub(1, Ordering::SeqCst) == 1 {
                        shared.idle.notify(usize::MAX);
                    }
                };
                export.execute(&h, &data, &pool, done);
                pool.put(data);
            };
            // A lone request is latency-bound (the write, then the flush, of an fsync): run
            // it here rather than wake a worker for it. A write into the page cache is
            // quick, so this thread reads on after it; before what may wait on the disk
            // (reads, flushes, FUA), the other reader takes over. What has company,
            // executing or already received, goes to the workers.
            let quick = h.op == Op::Write && h.flags & FLAG_FUA == 0;
            if !(alone && rx.is_drained()) {
                self.workers.spawn(flow, cost, job);
            } else if quick {
                job();
            } else {
                baton.put(rx);
                job();
                rx = match baton.take() {
                    Some(rx) => rx,
                    None => return "closing".into(),
                };
            }
        }
    }

    /// The status for a request that must not execute, if it must not.
    fn refuse(&self, session: &Session, h: &RequestHeader) -> Option<u32> {
        if h.op.modifies() && session.access != Access::ReadWrite {
            return Some(libc::EROFS as u32);
        }
        if h.op.has_range() && !session.export.contains(h.offset, h.length) {
            log::debug!(
                "{:?} at {}+{} is outside export '{}'",
                h.op,
                h.offset,
                h.length,
                session.export.name
            );
            return Some(libc::EINVAL as u32);
        }
        None
    }
}

/// Logs why sessions ended; their requests still executing finish, and their replies are
/// dropped.
fn log_ended(ended: Vec<Ended<Arc<Session>>>) {
    for Ended { value: s, why } in ended {
        let why = match why {
            EndReason::Expired => "expired",
            EndReason::Evicted => "evicted for a newer session",
            EndReason::Replaced => "replaced by a new one of the same client",
        };
        log::info!(
            "export '{}': session of client {} {why}",
            s.export.name,
            s.client
        );
    }
}

fn random_id() -> SessionId {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the OS random number generator works");
    id
}
