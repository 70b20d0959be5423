//! What one transaction costs the client, without root or a mount:
//!
//! - `table`: the pure transaction table (`dst::client::table::Table`) alone, in
//!   insert → next_to_send → complete cycles with a fixed number in flight, as ns per
//!   transaction;
//! - `core`: the engine's pure state machine (`dst::client::core::Core`), the table
//!   with admission, durability accounting, link health and counters around it, in
//!   submit → poll_transmit → on_reply cycles, as ns per transaction;
//! - `engine`: the whole engine end to end, against a `dst::server::Server` run in this
//!   process on 127.0.0.1 (TCP, the Noise channel with the cipher a mount would pick, the
//!   server's threads, a sparse 1 GiB image in `TMPDIR`): tasks issuing 4 KiB and 1 MiB
//!   reads and writes, as transactions/s, wall time per transaction (the inverse of the
//!   rate, not latency) and MB/s.
//!
//! Run with `cargo bench --bench engine`; `cargo bench --bench engine -- table` (or
//! `core`, `engine`) runs one part. Each engine workload runs for `DST_BENCH_SECS` seconds
//! (default 5, fractions allowed).

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dst::cipher::Cipher;
use dst::client::core::{self, Core, CoreConfig};
use dst::client::engine::{Engine, EngineConfig};
use dst::client::table::{Table, Tx, Window};
use dst::client::ClientConfig;
use dst::keys::{PrivateKey, PublicKey};
use dst::protocol::{Access, ExportInfo, Op};
use dst::server::auth::AuthorizedKeys;
use dst::server::{Config, Server};
use dst::socket::Congestion;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const IMAGE: u64 = 1 << 30;
/// Transactions a pure part (`table`, `core`) runs through at each queue depth.
const TABLE_CYCLES: u64 = 1_000_000;

fn main() {
    // cargo passes `--bench`; anything else is a filter on the part's name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f));
    if wanted("table") {
        for in_flight in [32, 128] {
            let took = table_cycles(in_flight, TABLE_CYCLES);
            let ns = took.as_secs_f64() * 1e9 / TABLE_CYCLES as f64;
            println!(
                "table   insert+send+complete QD{in_flight:<4} {ns:>8.1} ns/tx  ({TABLE_CYCLES} tx)"
            );
        }
    }
    if wanted("core") {
        for in_flight in [32, 128] {
            let took = core_cycles(in_flight, TABLE_CYCLES);
            let ns = took.as_secs_f64() * 1e9 / TABLE_CYCLES as f64;
            println!(
                "core    submit+send+reply    QD{in_flight:<4} {ns:>8.1} ns/tx  ({TABLE_CYCLES} tx)"
            );
        }
    }
    if wanted("engine") {
        let secs = std::env::var("DST_BENCH_SECS")
            .ok()
            .map(|s| {
                s.parse::<f64>()
                    .expect("DST_BENCH_SECS is a number of seconds")
            })
            .unwrap_or(5.0);
        engine(Duration::from_secs_f64(secs));
    }
}

/// Runs `cycles` transactions through a table, `in_flight` of them at once: each is
/// inserted when the window has room, taken for sending, and completed oldest first once
/// the window is full, as the engine does with replies in order.
fn table_cycles(in_flight: usize, cycles: u64) -> Duration {
    let timeout = Duration::from_secs(5);
    let mut table = Table::new(Window {
        requests: in_flight,
        bytes: 64 << 20,
    });
    let mut ids = VecDeque::with_capacity(in_flight);
    let len = 4 * KIB as u32;
    let start = Instant::now();
    for i in 0..cycles {
        if !table.has_room(len as usize) {
            let id = ids.pop_front().expect("a full table holds some");
            black_box(table.complete(id).expect("still in flight"));
        }
        let now = Instant::now();
        let tx = Tx::new(Op::Read, 0, i * len as u64, len, Vec::new(), now, ());
        ids.push_back(table.insert(tx, timeout));
        black_box(table.next_to_send(now, timeout).expect("just queued"));
    }
    for id in ids {
        black_box(table.complete(id).expect("still in flight"));
    }
    let took = start.elapsed();
    assert!(table.is_empty());
    took
}

/// Runs `cycles` transactions through the engine's core as [`table_cycles`] does through
/// the table: submitted, taken for sending, and answered oldest first once the window is
/// full, reading the clock once a transaction.
fn core_cycles(in_flight: usize, cycles: u64) -> Duration {
    let cfg = CoreConfig {
        resend_timeout: EngineConfig::DEFAULT_RESEND_TIMEOUT,
        resend_count: EngineConfig::DEFAULT_RESEND_COUNT,
        ping_interval: EngineConfig::DEFAULT_PING_INTERVAL,
        window: Window {
            requests: in_flight,
            bytes: 64 << 20,
        },
    };
    let info = ExportInfo {
        version: 1,
        export: "disk".into(),
        access: Access::ReadWrite,
        session: [0; 16],
        resumed: false,
        boot_id: "boot".into(),
        size: IMAGE,
        block_size: 4096,
        max_transfer: MIB as u32,
        features: 0,
    };
    let mut core = Core::new(cfg, &info, Instant::now());
    let mut ids = VecDeque::with_capacity(in_flight);
    let mut batch = Vec::with_capacity(1);
    let len = 4 * KIB as u32;
    let start = Instant::now();
    for i in 0..cycles {
        let now = Instant::now();
        if ids.len() == in_flight {
            let id = ids.pop_front().expect("a full window holds some");
            let done = core.on_reply(now, id, 0, len as usize);
            black_box(done.expect("still in flight"));
        }
        let tx = core::request(Op::Read, 0, i * len as u64, len, Vec::new(), now, ());
        core.submit(now, tx).expect("the window has room");
        batch.clear();
        core.poll_transmit(now, &mut batch, usize::MAX);
        ids.push_back(batch[0].0.txid);
        black_box(&batch);
    }
    let now = Instant::now();
    for id in ids {
        black_box(
            core.on_reply(now, id, 0, len as usize)
                .expect("still in flight"),
        );
    }
    let took = start.elapsed();
    assert_eq!(core.stats().in_flight, 0);
    took
}

/// One engine workload: `qd` tasks issuing reads or writes of `len` bytes, at random
/// offsets within the first `span` bytes of the image, or sequentially through all of it.
struct Workload {
    write: bool,
    len: u64,
    qd: u64,
    random: Option<u64>,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        write: true,
        len: 4 * KIB,
        qd: 32,
        random: Some(64 * MIB),
    },
    Workload {
        write: false,
        len: 4 * KIB,
        qd: 32,
        random: Some(64 * MIB),
    },
    Workload {
        write: true,
        len: MIB,
        qd: 8,
        random: None,
    },
    Workload {
        write: false,
        len: MIB,
        qd: 8,
        random: None,
    },
];

fn engine(secs: Duration) {
    let server = LocalServer::start(IMAGE);
    let cfg = server.client_config(Cipher::preferred());
    println!(
        "engine: in-process server on {}, {}, {secs:?} a workload",
        server.addr, cfg.cipher
    );
    let engine =
        smol::block_on(Engine::start(EngineConfig::new(cfg))).expect("the engine connects");
    for w in &WORKLOADS {
        let (count, took) = run(&engine, w, secs);
        let t = took.as_secs_f64();
        let (rate, us, mbs) = (
            count as f64 / t,
            t * 1e6 / count as f64,
            (count * w.len) as f64 / t / 1e6,
        );
        let size = if w.len >= MIB {
            format!("{}MiB", w.len / MIB)
        } else {
            format!("{}KiB", w.len / KIB)
        };
        println!(
            "engine  {:<5} {size:<5} {:<4} QD{:<4} {:>7} tx/s {us:>8.1} µs/tx {mbs:>8.1} MB/s",
            if w.write { "write" } else { "read" },
            if w.random.is_some() { "rand" } else { "seq" },
            w.qd,
            human(rate),
        );
    }
    smol::block_on(engine.close());
}

/// Transactions done by `w` in about `secs`, and the wall time until the last was acked.
/// Writes are flushed afterwards, outside the time, so the next workload starts clean.
fn run(engine: &Engine, w: &Workload, secs: Duration) -> (u64, Duration) {
    let requests = engine.stats().requests;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + secs;
    smol::block_on(async {
        let tasks: Vec<_> = (0..w.qd)
            .map(|_| {
                let (engine, next) = (engine.clone(), next.clone());
                let (write, len, random) = (w.write, w.len, w.random);
                smol::spawn(async move {
                    let data = vec![0x5a; len as usize];
                    while Instant::now() < deadline {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let offset = match random {
                            Some(span) => {
                                (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % (span / len) * len
                            }
                            None => n * len % IMAGE,
                        };
                        if write {
                            engine.write(offset, &data, false).await.unwrap();
                        } else {
                            let data = engine.read(offset, len as u32).await.unwrap();
                            assert_eq!(data.len() as u64, len);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
    let took = start.elapsed();
    let count = next.load(Ordering::Relaxed);
    let stats = engine.stats();
    assert_eq!(
        stats.requests - requests,
        count,
        "one transaction an operation"
    );
    assert_eq!(
        (stats.resends, stats.failures),
        (0, 0),
        "nothing resent or failed"
    );
    if w.write {
        smol::block_on(engine.flush()).unwrap();
    }
    (count, took)
}

/// 42100.0 as "42.1k".
fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// A `dst::server::Server` on 127.0.0.1, on a thread of its own, exporting a sparse image
/// as `disk` from a temporary directory; stopped, and the directory removed, on drop.
struct LocalServer {
    addr: SocketAddr,
    server_key: PublicKey,
    client_key: PrivateKey,
    stop: Option<smol::channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Removed when dropped, after `drop` has stopped the server.
    _dir: tempfile::TempDir,
}

impl LocalServer {
    fn start(size: u64) -> LocalServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = dst::keys::generate();
        let client_key = dst::keys::generate();
        let server_key = key.public();
        let image = dir.path().join("disk.img");
        let cfg = Config {
            key,
            authorized_keys: AuthorizedKeys::parse(&format!("{}\n", client_key.public())).unwrap(),
            authorized_keys_path: dir.path().join("authorized_keys"),
            exports: vec![format!("disk={}", image.display()).parse().unwrap()],
            create_size: Some(size),
            listen: "127.0.0.1:0".parse().unwrap(),
            ciphers: Cipher::ALL.to_vec(),
            max_transfer: Config::DEFAULT_MAX_TRANSFER,
            first_flight_timeout: Config::DEFAULT_FIRST_FLIGHT_TIMEOUT,
            handshake_timeout: Config::DEFAULT_HANDSHAKE_TIMEOUT,
            session_linger: Config::DEFAULT_SESSION_LINGER,
            max_sessions_per_key: Config::DEFAULT_MAX_SESSIONS_PER_KEY,
            max_sessions: Config::DEFAULT_MAX_SESSIONS,
            session_window: Config::DEFAULT_SESSION_WINDOW,
            session_requests: Config::DEFAULT_SESSION_REQUESTS,
            memory_budget: Config::DEFAULT_MEMORY_BUDGET,
            memory_per_key: Config::DEFAULT_MEMORY_BUDGET / 4,
            max_connections: Config::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_key: Config::DEFAULT_MAX_CONNECTIONS_PER_KEY,
            max_handshakes: Config::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_prefix: Config::DEFAULT_MAX_HANDSHAKES_PER_PREFIX,
            congestion: Congestion::default(),
            metrics: None,
        };
        let server = smol::block_on(Server::bind(cfg)).expect("the server starts");
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("dst-server".into())
            .spawn(move || {
                // Stops when the sender is dropped.
                let stop = async move {
                    let _ = stopped.recv().await;
                };
                smol::block_on(server.run(stop)).expect("the server runs");
            })
            .unwrap();
        LocalServer {
            addr,
            server_key,
            client_key,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn client_config(&self, cipher: Cipher) -> ClientConfig {
        ClientConfig {
            server: self.addr.to_string(),
            export: "disk".into(),
            key: self.client_key.clone(),
            server_key: self.server_key,
            cipher,
            access: Access::ReadWrite,
            max_transfer: MIB as u32,
            congestion: Congestion::default(),
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
