//! dst-server under hostile or broken peers: floods, oversized frames, limits, revoked
//! keys, a full disk. Other clients keep being served throughout.

#[macro_use]
mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{connect, connect_from, pattern, rss_kib, Setup};
use dst::channel::{self, Cipher, Refusal};
use dst::client::engine::{Engine, EngineConfig};
use dst::client::{ClientError, Connection};
use dst::protocol::{Access, Op, RequestHeader};

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
    let server = s.server(&[
        "--export",
        "disk=disk.img",
        "--create-size",
        "1M",
        "--max-handshakes-per-prefix",
        "8",
        "--handshake-timeout",
        "30s",
    ]);
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
    let server = s.server(&[
        "--export",
        "disk=disk.img",
        "--create-size",
        "1M",
        "--max-connections-per-key",
        "2",
    ]);
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
    std::thread::sleep(Duration::from_millis(200));
    connect(&cfg);
}

#[test]
fn oversized_frame_headers_close_the_connection_without_allocating() {
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "1M"]);
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
    let server = s.server(&[
        "--export",
        "disk=disk.img",
        "--create-size",
        "1M",
        "--session-window",
        "1M",
    ]);
    let proxy = Proxy::start(server.addr);
    let mut cfg = s.client(&server, "disk", Access::ReadOnly);
    cfg.server = proxy.addr().to_string();
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
    let other = dst::keys::generate();
    s.authorize(&format!("{}\n{}\n", s.client_key.public(), other.public()));
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "1M"]);
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
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
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
    assert!(
        server.log().contains("Input/output error"),
        "{}",
        server.log()
    );
    lower_mount.signal(libc::SIGTERM);
    block_on(engine.close());
}
