//! dst-server under hostile or broken peers: floods, oversized frames, limits, revoked
//! keys, a full disk. Other clients keep being served throughout.

#[macro_use]
mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{connect, connect_from, pattern, rss_kib, ServerProcess, Setup};
use dst::channel::{self, Refusal};
use dst::cipher::Cipher;
use dst::client::engine::{Engine, EngineConfig};
use dst::client::{ClientError, Connection};
use dst::protocol::{Access, Op, RequestHeader, FLAG_FUA};

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(f)
}

fn closed_soon(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    matches!(s.read(&mut [0u8; 64]), Ok(0) | Err(_))
}

#[test]
fn a_flood_of_unfinished_handshakes_does_not_lock_out_others() {
    let s = Setup::new();
    let server = s.disk(
        "1M",
        &[
            "--max-handshakes-per-prefix",
            "8",
            "--handshake-timeout",
            "30s",
        ],
    );
    // From another /24 than the client's 127.0.0.1.
    let mut flood: Vec<TcpStream> = (0..40)
        .map(|_| connect_from("127.1.0.2", server.addr))
        .collect();
    // Beyond the per-prefix limit, connections are closed at once.
    let start = Instant::now();
    assert!(closed_soon(flood.last_mut().unwrap()));
    assert!(start.elapsed() < Duration::from_secs(3));
    server.wait_for_log("handshake limit for prefix 127.1.0.0/24: 8 in progress");
    // Another address is served at once.
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(c.ping()).unwrap();
}

#[test]
fn connections_per_key_are_limited() {
    let s = Setup::new();
    let server = s.disk("1M", &["--max-connections-per-key", "2"]);
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    let _a = connect(&cfg);
    let _b = connect(&cfg);
    let err = block_on(Connection::connect(&cfg, None)).err().unwrap();
    assert_eq!(err.errno(), libc::EUSERS, "{err}");
    assert!(
        err.to_string().contains("--max-connections-per-key"),
        "{err}"
    );
    drop(_a);
    server.wait_for_closes(1);
    connect(&cfg);
}

#[test]
fn oversized_frame_headers_close_the_connection_without_allocating() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let stream = block_on(smol::net::TcpStream::connect(server.addr)).unwrap();
    let (mut tx, mut rx) = block_on(channel::connect(
        stream.clone(),
        stream,
        &s.client_key,
        &s.server_key.public(),
        Cipher::ChaChaPoly,
    ))
    .unwrap();
    // A frame that declares 2 GiB: refused from its header.
    block_on(tx.send(&[0x7f, 0xff, 0xff, 0xff, 1])).unwrap();
    let limits = dst::protocol::Limits {
        max_transfer: 1 << 20,
    };
    assert!(
        !matches!(block_on(rx.recv(&limits)), Ok(Some(_))),
        "connection closed"
    );
    server.wait_for_log("over the limit");
    block_on(connect(&s.client(&server, "disk", Access::ReadOnly)).ping()).unwrap();
}

#[test]
fn a_ping_flood_that_never_reads_replies_is_throttled_not_buffered() {
    let s = Setup::new();
    let server = s.disk("1M", &["--session-window", "1M"]);
    let proxy = Proxy::start(server.addr);
    let cfg = proxy.route(s.client(&server, "disk", Access::ReadOnly));
    let mut flooder = connect(&cfg);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = sent.clone();
    let flood = std::thread::spawn(move || {
        block_on(async {
            for i in 0..2_000_000u64 {
                let h = RequestHeader {
                    op: Op::Ping,
                    flags: 0,
                    txid: i + 1,
                    floor: 1,
                    offset: 0,
                    length: 0,
                };
                if flooder.send(&h, &[]).await.is_err() {
                    return;
                }
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    });
    // Wait until the flood stops advancing: every buffer on the way is full and the
    // server no longer reads. Without that back-pressure it would run to the end.
    let load = || sent.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = load();
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = load();
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    assert!(
        last < 2_000_000,
        "the server kept reading a flood whose replies were never read"
    );
    // Others are still served while the flood is held back.
    let mut good = connect(&s.client(&server, "disk", Access::ReadOnly));
    block_on(good.ping()).unwrap();
    assert_eq!(load(), last, "the flood is still held back");
    let rss = rss_kib(server.pid());
    assert!(
        rss < 128 * 1024,
        "server resident memory {rss} KiB under the flood"
    );
    proxy.cut_all();
    flood.join().unwrap();
}

#[test]
fn a_key_removed_on_sighup_cannot_connect_again() {
    let s = Setup::new();
    let other = s.second_key();
    let server = s.disk("1M", &[]);
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    let mut existing = connect(&cfg);

    s.authorize(&format!("{}\n", other.public()));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    server.wait_for_log("reloaded authorized keys (1 keys)");
    match block_on(Connection::connect(&cfg, None)) {
        Err(ClientError::Channel(channel::ChannelError::Refused(r, _))) => {
            assert_eq!(r, Refusal::ClientKey)
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    // The connection made before keeps working; the other key is still admitted.
    block_on(existing.ping()).unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.key = other;
    block_on(connect(&cfg2).ping()).unwrap();
}

/// A tmpfs of a few MiB, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        if unsafe { libc::geteuid() } != 0 {
            common::skip("mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            common::skip("mount -t tmpfs failed");
        }
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_on_the_export_node_reaches_the_client_as_enospc() {
    let Some(fs) = SmallFs::mount("2M") else {
        return;
    };
    let s = Setup::new();
    let image = fs.0.path().join("disk.img");
    let export = format!("disk={}", image.display());
    let server = s.server(&["--export", &export, "--create-size", "64M"]);
    let engine = block_on(Engine::start(EngineConfig::new(s.client(
        &server,
        "disk",
        Access::ReadWrite,
    ))))
    .unwrap();
    let mut result = Ok(());
    for i in 0..8u64 {
        result = block_on(engine.write(i << 20, &pattern(1 << 20, i), false));
        if result.is_err() {
            break;
        }
    }
    assert_eq!(
        result,
        Err(libc::ENOSPC),
        "the server's errno, not a hang or EIO"
    );
    // What fit is still readable.
    assert_eq!(
        block_on(engine.read(0, 4096)).unwrap(),
        pattern(1 << 20, 0)[..4096]
    );
    block_on(engine.close());
    drop(server);
}

#[test]
fn a_failing_disk_on_the_export_node_reaches_the_client_as_eio() {
    require!();
    // The export node's "disk" is itself a file on a dst mount (fail-fast) whose own
    // server is then killed: from then on its reads and writes fail with EIO, as a dying
    // disk's would.
    let lower = Setup::new();
    let lower_server = lower.server(&["--export", "disk=lower.img", "--create-size", "16M"]);
    let dir = lower.path("lower-mnt");
    let mut lower_mount =
        common::mount::DstMount::start(&lower, &lower_server, &dir, &["--fail-fast"]);
    let s = Setup::new();
    let export = format!("disk={}", lower_mount.file().display());
    let server = s.server(&["--export", &export]);
    let engine = block_on(Engine::start(EngineConfig::new(s.client(
        &server,
        "disk",
        Access::ReadWrite,
    ))))
    .unwrap();
    block_on(engine.write(0, &pattern(65536, 1), false)).unwrap();
    block_on(engine.flush()).unwrap();

    drop(lower_server); // killed: the upper server's disk now fails
    let start = Instant::now();
    let read = block_on(engine.read(1 << 20, 65536));
    assert_eq!(read.err(), Some(libc::EIO), "a read from the failing disk");
    let write = block_on(engine.write(2 << 20, &pattern(65536, 2), false));
    let flush = block_on(engine.flush());
    assert!(
        write == Err(libc::EIO) || flush == Err(libc::EIO),
        "a write to the failing disk or the flush after it reports EIO: {write:?} {flush:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "errors, not a hang"
    );
    // The client may hear of the error before the server's log line is written.
    server.wait_for_log("Input/output error");
    lower_mount.signal(libc::SIGTERM);
    block_on(engine.close());
}

/// Latencies of 4 KiB reads by a client of another export, one at a time, each after
/// writing the block it reads; every read must return what was written.
fn victim_read_latencies(cfg: &dst::client::ClientConfig, n: u64) -> Vec<Duration> {
    let mut c = connect(cfg);
    (0..n)
        .map(|i| {
            let data = pattern(4096, i);
            block_on(c.write(i * 4096, &data, false)).unwrap();
            let start = Instant::now();
            let read = block_on(c.read(i * 4096, 4096)).unwrap();
            let took = start.elapsed();
            assert_eq!(read, data, "block {i} read back");
            std::thread::sleep(Duration::from_millis(5));
            took
        })
        .collect()
}

/// Sends `request(i)` without end on a connection of its own, draining the replies on
/// another thread, until the returned guard is dropped; counts the replies.
struct Flood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    replies: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stream: dst::channel::Hangup,
}

impl Flood {
    fn start(
        cfg: &dst::client::ClientConfig,
        request: fn(u64) -> (RequestHeader, Vec<u8>),
    ) -> Flood {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let parts = connect(cfg).into_parts();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let replies = std::sync::Arc::new(AtomicU64::new(0));
        let (mut tx, mut rx, limits) = (parts.sender, parts.receiver, parts.limits);
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                block_on(async {
                    let mut buf = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let (h, data) = request(i);
                        buf.clear();
                        dst::protocol::encode_request(&mut buf, &h, &data);
                        if tx.send(&buf).await.is_err() {
                            return;
                        }
                    }
                })
            })
        };
        let receiver = {
            let replies = replies.clone();
            std::thread::spawn(move || {
                block_on(async {
                    while let Ok(Some(_)) = rx.recv(&limits).await {
                        replies.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
        };
        Flood {
            stop,
            replies,
            threads: vec![sender, receiver],
            stream: parts.hangup,
        }
    }

    fn replies(&self) -> u64 {
        self.replies.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn request(op: Op, flags: u8, txid: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        op,
        flags,
        txid,
        floor: txid.saturating_sub(64).max(1),
        offset,
        length,
    }
}

/// Measures a victim's 4 KiB reads (see [`victim_read_latencies`]) while `what` goes on,
/// prints p50, p99 and max as the test's figures, and asserts that the victim was served
/// about as fast as ever: margins far above an unloaded read (well under 1 ms), far below
/// the seconds that a first-in-first-out queue behind a flood gives.
fn assert_victim_served(what: &str, victim: &dst::client::ClientConfig) {
    let mut lat = victim_read_latencies(victim, 200);
    lat.sort();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    let (p50, p99, max) = (at(0.5), at(0.99), *lat.last().unwrap());
    eprintln!("{what}: victim 4 KiB read p50 {p50:?}, p99 {p99:?}, max {max:?}");
    assert!(
        p99 < Duration::from_millis(250) && max < Duration::from_secs(1),
        "{what}: victim p99 {p99:?}, max {max:?}"
    );
}

/// Two tenants on one export node: the flooders' key on export `a`, the victim's on `b`.
fn two_tenants(flooder: &dst::keys::PrivateKey, grant: &str) -> (Setup, ServerProcess) {
    let s = Setup::new();
    s.authorize(&format!(
        "{} exports=b # victim\n{} exports=a {grant} # flooder\n",
        s.client_key.public(),
        flooder.public()
    ));
    let server = s.exports(&["a", "b"], "2G", &[]);
    (s, server)
}

fn flooder_config(
    s: &Setup,
    server: &ServerProcess,
    key: &dst::keys::PrivateKey,
    access: Access,
) -> dst::client::ClientConfig {
    let mut cfg = s.client(server, "a", access);
    cfg.key = key.clone();
    cfg
}

#[test]
fn a_flush_flood_from_a_read_only_key_does_not_slow_another_tenant() {
    let flooder = dst::keys::generate();
    let (s, server) = two_tenants(&flooder, "ro");
    let cfg = flooder_config(&s, &server, &flooder, Access::ReadOnly);
    let floods: Vec<_> = (0..4)
        .map(|_| Flood::start(&cfg, |i| (request(Op::Flush, 0, i, 0, 0), Vec::new())))
        .collect();
    let victim = s.client(&server, "b", Access::ReadWrite);
    assert_victim_served("read-only FLUSH flood", &victim);
    let answered: u64 = floods.iter().map(Flood::replies).sum();
    eprintln!("read-only FLUSH flood: {answered} flushes answered meanwhile");
    assert!(
        answered > 1000,
        "the flood ran: {answered} flushes answered"
    );
}

#[test]
fn a_fua_write_and_read_flood_from_a_read_write_key_does_not_slow_another_tenant() {
    let flooder = dst::keys::generate();
    let (s, server) = two_tenants(&flooder, "");
    let rw = flooder_config(&s, &server, &flooder, Access::ReadWrite);
    let ro = flooder_config(&s, &server, &flooder, Access::ReadOnly);
    let fua = Flood::start(&rw, |i| {
        let h = request(Op::Write, FLAG_FUA, i, (i % 256) * 4096, 4096);
        (h, pattern(4096, i))
    });
    // The same key's read-only session adds 1 MiB reads to its turn.
    let reads = Flood::start(&ro, |i| {
        (
            request(Op::Read, 0, i, (i % 512) << 20, 1 << 20),
            Vec::new(),
        )
    });
    let victim = s.client(&server, "b", Access::ReadWrite);
    assert_victim_served("FUA write + 1 MiB read flood", &victim);
    eprintln!(
        "FUA write flood: {} writes, {} reads answered meanwhile",
        fua.replies(),
        reads.replies()
    );
    assert!(fua.replies() > 50, "the flood ran");
}

#[test]
fn a_write_zeroes_flood_from_a_read_write_key_does_not_slow_another_tenant() {
    let flooder = dst::keys::generate();
    let (s, server) = two_tenants(&flooder, "");
    let rw = flooder_config(&s, &server, &flooder, Access::ReadWrite);
    // 1 GiB each, FUA, alternating between two ranges, as fast as they are answered.
    let zeroes = Flood::start(&rw, |i| {
        let h = request(Op::WriteZeroes, FLAG_FUA, i, (i % 2) << 30, 1 << 30);
        (h, Vec::new())
    });
    let victim = s.client(&server, "b", Access::ReadWrite);
    assert_victim_served("1 GiB WRITE_ZEROES+FUA flood", &victim);
    eprintln!(
        "WRITE_ZEROES flood: {} answered meanwhile",
        zeroes.replies()
    );
    assert!(zeroes.replies() > 10, "the flood ran");
}

#[test]
fn replies_never_read_hold_the_server_to_its_memory_budget() {
    const BUDGET_MIB: u64 = 128;
    // What the server holds besides the budget (see docs/security.md): code, tables and
    // threads, and up to 32 MiB of idle buffers kept for reuse.
    const CONSTANT_MIB: u64 = 48;
    let s = Setup::new();
    let greedy: Vec<_> = (0..2).map(|_| dst::keys::generate()).collect();
    s.authorize(&format!(
        "{} exports=b # victim\n{} exports=a ro\n{} exports=a ro\n",
        s.client_key.public(),
        greedy[0].public(),
        greedy[1].public()
    ));
    let server = s.exports(
        &["a", "b"],
        "256M",
        &["--memory-budget", &format!("{BUDGET_MIB}M")],
    );
    let before = rss_kib(server.pid());
    // Each greedy key: 16 connections, each asking for 64 MiB of reads and reading none.
    let mut held = Vec::new();
    for key in &greedy {
        let mut cfg = s.client(&server, "a", Access::ReadOnly);
        cfg.key = key.clone();
        for _ in 0..16 {
            let Ok(mut c) = block_on(Connection::connect(&cfg, None)) else {
                continue; // refused: the budget has no room for another connection
            };
            for i in 0..64u64 {
                let txid = c.next_txid();
                block_on(c.send(&request(Op::Read, 0, txid, (i % 256) << 20, 1 << 20), &[]))
                    .unwrap();
            }
            held.push(c);
        }
    }
    // The server fills what it may, then stops reading them: watch its RSS settle.
    let mut peak = 0;
    let mut last = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(server.pid());
        peak = peak.max(now);
        if now == last {
            break;
        }
        last = now;
    }
    // Another tenant is still served.
    let victim = s.client(&server, "b", Access::ReadWrite);
    assert_victim_served("greedy readers", &victim);
    peak = peak.max(rss_kib(server.pid()));
    eprintln!(
        "{} greedy connections held; server RSS {} MiB before, peak {} MiB (budget {BUDGET_MIB} MiB)",
        held.len(),
        before >> 10,
        peak >> 10
    );
    assert!(
        held.len() >= 16,
        "the greedy keys got connections: {}",
        held.len()
    );
    assert!(
        peak >> 10 < BUDGET_MIB + CONSTANT_MIB,
        "server RSS {peak} KiB under greedy readers"
    );
}

#[test]
fn sessions_are_capped_per_key_and_lingering_ones_expire_on_their_own() {
    let s = Setup::new();
    let other = s.second_key();
    let server = s.disk(
        "1M",
        &["--max-sessions-per-key", "2", "--session-linger", "2s"],
    );
    // A client that never resumes makes a new session each time: beyond two, its oldest
    // disconnected one goes.
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    // Each connection's session is disconnected before the next one asks.
    for i in 0..4 {
        block_on(connect(&cfg).ping()).unwrap();
        server.wait_for_closes(i + 1);
    }
    server.wait_for_log("evicted for a newer session");
    // Two connected sessions of the key: a third is refused, naming the option.
    // Connected from the moment they are made: the third cannot evict them.
    let (_a, _b) = (connect(&cfg), connect(&cfg));
    let err = block_on(Connection::connect(&cfg, None)).err().unwrap();
    assert_eq!(err.errno(), libc::EUSERS, "{err}");
    assert!(err.to_string().contains("--max-sessions-per-key"), "{err}");
    drop((_a, _b));
    server.wait_for_closes(6);
    // A writer that goes away lets go of the export after the linger time, by itself.
    let writer = connect(&s.client(&server, "disk", Access::ReadWrite));
    drop(writer);
    // It took the place of `_a`'s session; `_b`'s and its own then expire, with no
    // client asking for anything meanwhile.
    server.wait_for_lines(&[" expired"], 2);
    let mut cfg = s.client(&server, "disk", Access::ReadWrite);
    cfg.key = other;
    block_on(connect(&cfg).ping()).unwrap();
}
