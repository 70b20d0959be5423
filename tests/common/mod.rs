//! Test support: keys in a temporary directory and real `dst-server` processes on
//! 127.0.0.1, ended by PID when dropped; `mount` has the guards for real dst mounts and
//! loop devices (as root).

#![allow(dead_code)] // each test binary uses a different part

pub mod mount;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dst::channel::Cipher;
use dst::client::{ClientConfig, Connection};
use dst::keys::PrivateKey;
use dst::protocol::Access;
use dst::socket::Congestion;

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

    /// Starts `dst-server` listening on `addr`, as a restarted server would.
    pub fn server_at(&self, addr: SocketAddr, args: &[&str]) -> ServerProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dst-server"));
        cmd.arg("--key")
            .arg(self.path("server.key"))
            .arg("--authorized-keys")
            .arg(self.path("authorized_keys"))
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .current_dir(self.dir.path());
        ServerProcess::spawn(cmd)
    }
}

/// A running `dst-server`; killed and reaped on drop.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl ServerProcess {
    fn spawn(mut cmd: Command) -> ServerProcess {
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said '{needle}':\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// Connects, panicking with the error if that fails.
pub fn connect(cfg: &ClientConfig) -> Connection {
    smol::block_on(Connection::connect(cfg, None)).unwrap_or_else(|e| panic!("connect: {e}"))
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
