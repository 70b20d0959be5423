//! Test support: keys in a temporary directory and real `dst-server` processes on
//! 127.0.0.1, ended by PID when dropped; `mount` has the guards for real dst mounts and
//! loop devices (as root).

#![allow(dead_code)] // each test binary uses a different part

pub mod mount;
pub mod proxy;
pub mod workload;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dst::cipher::Cipher;
use dst::client::{ClientConfig, Connection};
use dst::keys::PrivateKey;
use dst::protocol::Access;
use dst::socket::Congestion;

/// A test cannot run here for `why`: under `CI=true` that is a failure naming it, since CI
/// is meant to have everything; elsewhere the test is skipped with the reason printed.
pub fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs what the machine lacks: {why}");
    }
    eprintln!("skipped: {why}");
}

/// What the server's line about a closed connection holds.
const CLOSED: &[&str] = &[": connection ", " closed: "];

/// A datagram socket at `path` that listens as systemd's `NOTIFY_SOCKET` does; reads wait
/// 20 s at most.
pub fn notify_socket(path: &Path) -> UnixDatagram {
    let socket = UnixDatagram::bind(path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    socket
}

/// The next notification, as its `KEY=VALUE` lines.
fn next_notice(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("the service manager was notified in time");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits for a notification that has `line`, skipping status updates.
pub fn expect(socket: &UnixDatagram, line: &str) -> Vec<String> {
    loop {
        let got = next_notice(socket);
        if got.iter().any(|l| l == line) {
            return got;
        }
        assert!(
            got.iter().all(|l| l.starts_with("STATUS=")),
            "expected {line}, got {got:?}"
        );
    }
}

/// A directory with a server key pair, a client key pair and an authorized_keys file.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub server_key: PrivateKey,
    pub client_key: PrivateKey,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().expect("temporary directory");
        dst::keys::write_keypair(&dir.path().join("server.key"), false).unwrap();
        dst::keys::write_keypair(&dir.path().join("client.key"), false).unwrap();
        let setup = Setup {
            server_key: dst::keys::load_private(&dir.path().join("server.key")).unwrap(),
            client_key: dst::keys::load_private(&dir.path().join("client.key")).unwrap(),
            dir,
        };
        setup.authorize(&format!("{}\n", setup.client_key.public()));
        setup
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the server's authorized_keys.
    pub fn authorize(&self, text: &str) {
        std::fs::write(self.path("authorized_keys"), text).unwrap();
    }

    /// A second client key, allowed everything the setup's own key is.
    pub fn second_key(&self) -> PrivateKey {
        let other = dst::keys::generate();
        self.authorize(&format!(
            "{}\n{}\n",
            self.client_key.public(),
            other.public()
        ));
        other
    }

    /// A client configuration for `export` on `server`.
    pub fn client(&self, server: &ServerProcess, export: &str, access: Access) -> ClientConfig {
        ClientConfig {
            server: server.addr.to_string(),
            export: export.into(),
            key: self.client_key.clone(),
            server_key: self.server_key.public(),
            cipher: Cipher::ChaChaPoly,
            access,
            max_transfer: 1 << 20,
            congestion: Congestion::default(),
        }
    }

    /// Starts `dst-server` with this setup's keys, listening on a free port, plus `args`.
    pub fn server(&self, args: &[&str]) -> ServerProcess {
        self.server_at("127.0.0.1:0".parse().unwrap(), args)
    }

    /// Starts `dst-server` serving the export `disk` from `disk.img`, created with `size` if
    /// missing, plus `extra` arguments.
    pub fn disk(&self, size: &str, extra: &[&str]) -> ServerProcess {
        self.exports(&["disk"], size, extra)
    }

    /// Starts `dst-server` serving each of `names` from `NAME.img`, created with `size` if
    /// missing, plus `extra` arguments.
    pub fn exports(&self, names: &[&str], size: &str, extra: &[&str]) -> ServerProcess {
        let specs: Vec<String> = names.iter().map(|n| format!("{n}={n}.img")).collect();
        let mut args: Vec<&str> = specs.iter().flat_map(|e| ["--export", e]).collect();
        args.extend(["--create-size", size]);
        args.extend(extra);
        self.server(&args)
    }

    /// Starts `dst-server` listening on `addr`, as a restarted server would.
    pub fn server_at(&self, addr: SocketAddr, args: &[&str]) -> ServerProcess {
        ServerProcess::spawn(self.server_command(addr, args))
    }

    /// Starts `dst-server` with `args`, expecting it to refuse to start: panics if it is
    /// still running after 20 s. Returns its exit status and what it wrote on stderr.
    pub fn refused_start(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut child = self
            .server_command("127.0.0.1:0".parse().unwrap(), args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dst-server starts");
        let mut stderr = String::new();
        let reader = child.stderr.take().unwrap();
        let read = std::thread::spawn(move || {
            let mut reader = reader;
            std::io::Read::read_to_string(&mut reader, &mut stderr).map(|_| stderr)
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dst-server {args:?} started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, read.join().unwrap().unwrap())
    }

    /// Runs `dst-server scrub ARGS` in this setup's directory; returns its exit code and
    /// its output.
    pub fn scrub(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_dst-server"))
            .arg("scrub")
            .args(args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .output()
            .expect("dst-server scrub runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().expect("scrub exited"), text)
    }

    /// The command that starts `dst-server` on `addr` with this setup's keys and `args`.
    pub fn server_command(&self, addr: SocketAddr, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dst-server"));
        cmd.arg("--key")
            .arg(self.path("server.key"))
            .arg("--authorized-keys")
            .arg(self.path("authorized_keys"))
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .current_dir(self.dir.path());
        cmd
    }
}

/// A running `dst-server`; killed and reaped on drop.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts `cmd` (see [`Setup::server_command`]) and waits until it listens.
    pub fn spawn(mut cmd: Command) -> ServerProcess {
        cmd.env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("dst-server starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = ServerProcess {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => server.addr = addr,
            Err(_) => panic!(
                "dst-server did not start listening; its log:\n{}",
                server.log()
            ),
        }
        server
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle`; the log is read by another thread.
    pub fn wait_for_log(&self, needle: &str) {
        self.wait_for_lines(&[needle], 1);
    }

    /// How many lines of the log have every one of `parts`.
    pub fn count_lines(&self, parts: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Waits until the log has `n` lines with every one of `parts`.
    pub fn wait_for_lines(&self, parts: &[&str], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count_lines(parts) < n {
            assert!(
                Instant::now() < deadline,
                "the log never had {n} lines with {parts:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many connections the server has logged as closed.
    pub fn closes(&self) -> usize {
        self.count_lines(CLOSED)
    }

    /// Waits until the server has logged the close of `n` connections in all.
    pub fn wait_for_closes(&self, n: usize) {
        self.wait_for_lines(CLOSED, n);
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` and waits for the process to exit; returns its exit status.
    pub fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of our own child.
        unsafe { libc::kill(self.pid(), signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dst-server did not exit after signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `done`, checking every few milliseconds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `pattern(len, seed)` at `offset` (with FUA if `fua`) and reads it back.
pub fn round_trip(c: &mut Connection, offset: u64, len: usize, seed: u64, fua: bool) {
    smol::block_on(async {
        c.write(offset, &pattern(len, seed), fua).await.unwrap();
        let back = c.read(offset, len as u32).await.unwrap();
        assert!(
            back == pattern(len, seed),
            "{len} bytes at {offset} read back wrong"
        );
    });
}

/// Connects, panicking with the error if that fails.
pub fn connect(cfg: &ClientConfig) -> Connection {
    smol::block_on(Connection::connect(cfg, None)).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// A TCP connection to `to` from the loopback address `from`, such as 127.5.0.2: all of
/// 127.0.0.0/8 is local, so a test can stand for peers in many address prefixes.
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(sock >= 0, "socket: {}", std::io::Error::last_os_error());
    let addr = |a: SocketAddr| {
        let SocketAddr::V4(v4) = a else {
            panic!("IPv4 only")
        };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a descriptor we own, with properly sized addresses.
    unsafe {
        let local = addr(format!("{from}:0").parse().unwrap());
        assert_eq!(
            libc::bind(sock, &local as *const _ as *const libc::sockaddr, len),
            0
        );
        let remote = addr(to);
        assert_eq!(
            libc::connect(sock, &remote as *const _ as *const libc::sockaddr, len),
            0,
            "connect from {from}: {}",
            std::io::Error::last_os_error()
        );
        std::os::fd::FromRawFd::from_raw_fd(sock)
    }
}

/// Raises this process's soft limit on open files to the hard one, for tests that hold
/// many connections.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a properly sized struct of our own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Stops process `pid` with SIGSTOP and waits until every one of its threads has stopped:
/// the signal reaches busy threads a little later, and one still running could answer a
/// request the caller means to stall.
pub fn stop_process(pid: i32) {
    // SAFETY: kill(2) on a PID the caller started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the command name, which is in parentheses.
                let state = stat
                    .rsplit(") ")
                    .next()
                    .and_then(|rest| rest.chars().next());
                matches!(state, Some('T') | Some('t'))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped() {
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Bytes of `path` at `offset`.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// 512-byte blocks allocated to `path`.
pub fn allocated_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks()
}
