//! The export node: listening, handshakes, negotiation, sessions, permissions, and the
//! execution of requests on the exports.
//!
//! This module binds, opens the exports and runs the accept loop; the jobs are apart.
//! Decisions, without I/O: `admission` (strangers: handshake places by age and prefix,
//! attempt rates, a summarising refusal log), `negotiation` (what a key may open, and
//! refusals that reveal nothing), `sessions` (the session table: caps, eviction, expiry,
//! one writer per export), `budget` (memory, server-wide, per key, per session), `fair`
//! (which queued request runs next) and `flush_group` (FLUSHes sharing one fdatasync).
//! I/O: `connection` (one connection's life: handshake on the `handshakers` threads,
//! negotiation, its readers), `requests` (the request path), `replies` (sending),
//! `workers` (the I/O threads), `export` (an export: its size and its requests, run on
//! its `backend` stack: a file or block device, with `checksums` as a filter over it) and
//! `advice` (storage errors turned into what the operator should run).
//!
//! Each connection has two reader threads, taking turns, that decode requests, write
//! payloads decrypted straight into pooled buffers. Requests run on the I/O threads, so a
//! slow disk never stalls the network (a lone request runs on a reader, the other one
//! reading meanwhile), and the thread that executed a request sends its reply. A session
//! outlives its connection: a client that reconnects resumes it, and its reply cache
//! answers resent transactions.

pub mod admission;
pub mod advice;
pub mod auth;
pub mod backend;
mod baton;
pub mod budget;
pub mod checksums;
mod connection;
pub mod export;
pub mod fair;
mod flush_group;
mod handshakers;
pub mod limits;
pub mod metrics;
mod metrics_endpoint;
pub mod negotiation;
mod replies;
pub mod reply_cache;
pub mod report;
mod requests;
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
use smol::net::TcpListener;

use crate::cipher::Cipher;
use crate::keys::{PrivateKey, PublicKey};
use crate::pool::Pool;
use crate::protocol::{self};
use crate::socket::Congestion;
use crate::units::human_bytes;
use admission::{Handshakes, Rates, RefusalLog};
use auth::AuthorizedKeys;
use budget::Budget;
use export::{Export, ExportSpec};
use handshakers::Handshakers;
use limits::Tally;
use metrics::Metrics;
use session::Session;
use sessions::{SessionLimits, SessionTable};
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
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
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

/// Seconds between looks at the exports' sizes, besides those on SIGHUP.
const SIZE_CHECK_TICKS: u32 = 5;

/// Bytes of idle payload buffers kept for reuse.
const POOL_BYTES: usize = 32 << 20;

/// Threads for export I/O: one a core, at least two so that a slow flush does not hold up
/// every write, at most eight.
fn io_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// What a connection holds besides its requests (channel buffers, a sealed batch of
/// replies, its reader threads), charged to the budget when it is admitted.
pub const CONNECTION_OVERHEAD: usize = 512 << 10;

/// A running server: bound, with its exports open.
pub struct Server {
    listener: TcpListener,
    metrics: Option<TcpListener>,
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
    memory_budget: usize,
    metrics: Metrics,
    session_requests: usize,
    /// Authenticated connections; those in the handshake are in `handshakes`.
    connections: Tally<()>,
    per_key: Tally<PublicKey>,
    handshakes: Handshakes,
    rates: Mutex<Rates>,
    refusals: Mutex<RefusalLog>,
    handshakers: Handshakers,
    sessions: Arc<Mutex<SessionTable<Arc<Session>>>>,
    /// Ended read-write sessions with requests still executing: the next writer of their
    /// export waits for them (see `session`).
    draining: Mutex<Vec<Arc<Session>>>,
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
        let metrics = match cfg.metrics {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot serve --metrics on {addr}: {e}"))?,
            ),
            None => None,
        };
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
                export.size(),
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
            memory_budget: cfg.memory_budget,
            metrics: Metrics::default(),
            session_requests: cfg.session_requests.max(1),
            connections: Tally::new(cfg.max_connections),
            per_key: Tally::new(cfg.max_connections_per_key),
            handshakes: Handshakes::new(cfg.max_handshakes, cfg.max_handshakes_per_prefix),
            rates: Mutex::new(Rates::new()),
            refusals: Mutex::new(RefusalLog::new()),
            handshakers: Handshakers::new(handshakers::threads())
                .map_err(|e| format!("cannot start handshake threads: {e}"))?,
            sessions: Arc::new(Mutex::new(SessionTable::new(SessionLimits {
                per_key: cfg.max_sessions_per_key.max(1),
                total: cfg.max_sessions.max(1),
                linger: cfg.session_linger,
            }))),
            draining: Mutex::new(Vec::new()),
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
        Ok(Server {
            listener,
            metrics,
            shared,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle for reloading the allowlist and reading the status while the server runs.
    pub fn control(&self) -> Control {
        Control(self.shared.clone())
    }

    /// Serves until `stop` resolves, then finishes executing requests, syncs every
    /// export and returns.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> io::Result<()> {
        let shared = self.shared.clone();
        // Each second: refusals held back are summarised even once a flood stops, and
        // sessions past their linger time let go of what they hold. Every few seconds, the
        // exports' sizes are looked at.
        let _ticks = smol::spawn({
            let shared = shared.clone();
            async move {
                for tick in 1u32.. {
                    smol::Timer::after(Duration::from_secs(1)).await;
                    let lines = shared.refusals.lock().unwrap().flush(Instant::now());
                    for (kind, line) in lines {
                        log::log!(kind.level(), "{line}");
                    }
                    shared.expire_sessions();
                    if tick % SIZE_CHECK_TICKS == 0 {
                        shared.check_sizes();
                    }
                }
            }
        });
        let _metrics = self.metrics.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                log::info!("metrics on http://{addr}/metrics");
            }
            smol::spawn(metrics_endpoint::serve(listener, shared.clone()))
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

impl Shared {
    /// Reads every export's size again; the connected clients of one that grew are told
    /// (those that take RESIZE notices), and new clients get the new size. Returns the
    /// exports that grew.
    fn check_sizes(&self) -> usize {
        let grown: Vec<&Arc<Export>> = self
            .exports
            .values()
            .filter(|e| e.check_size().is_some())
            .collect();
        if !grown.is_empty() {
            let sessions: Vec<Arc<Session>> =
                self.sessions.lock().unwrap().values().cloned().collect();
            for s in sessions
                .iter()
                .filter(|s| grown.iter().any(|e| Arc::ptr_eq(e, &s.export)))
            {
                s.tell_size();
            }
        }
        grown.len()
    }
}

/// Reloads the authorized keys of a running server and looks at its exports' sizes (on
/// SIGHUP, say), and sums up its state.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl Control {
    /// One line for `systemctl status`: exports, sessions, connections, bytes moved.
    pub fn status(&self) -> String {
        let s = &self.0;
        let (sessions, connected) = {
            let table = s.sessions.lock().unwrap();
            (table.len(), table.connected())
        };
        let (read, written) = s
            .exports
            .values()
            .map(|e| e.counters.moved())
            .fold((0, 0), |(r, w), (er, ew)| (r + er, w + ew));
        format!(
            "{} exports, {sessions} sessions ({connected} connected), {} connections; \
             {} read, {} written",
            s.exports.len(),
            s.connections.held(),
            human_bytes(read),
            human_bytes(written)
        )
    }

    /// Reads the authorized keys file again; new connections see the new list, and a key
    /// that is gone can no longer open or resume a session. On error the old list stays.
    pub fn reload(&self) -> Result<usize, String> {
        let keys = AuthorizedKeys::load(&self.0.authorized_keys_path)?;
        let n = keys.len();
        *self.0.authorized_keys.write().unwrap() = keys;
        Ok(n)
    }

    /// Reads every export's size again now (see [`Export::check_size`]); returns how many
    /// grew. Refusals are logged there.
    pub fn check_sizes(&self) -> usize {
        self.0.check_sizes()
    }
}
