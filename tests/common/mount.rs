//! Test support for real mounts, as root with /dev/fuse and loop devices: `dst-mount`
//! processes, loop devices and O_DIRECT buffers, each held by a guard that undoes it on
//! drop, so a failing test leaves nothing behind. Declare guards in setup order; they
//! are dropped in reverse.
//!
//! A test that needs root or tools starts with `require!("tool", ...)`: without them it
//! prints why and returns, passing without running.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use super::wait_until;
use super::{pattern, ServerProcess, Setup};

/// Returns from the test, saying why, unless it runs as root with /dev/fuse, loop
/// devices and every tool named.
#[macro_export]
macro_rules! require {
    ($($tool:expr),* $(,)?) => {
        if let Some(why) = $crate::common::mount::missing(&[$($tool),*]) {
            $crate::common::skip(&why);
            return;
        }
    };
}

/// Why this machine cannot run a test that needs `tools`, if it cannot.
pub fn missing(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} is missing"));
        }
    }
    tools
        .iter()
        .find(|t| which(t).is_none())
        .map(|t| format!("{t} is not installed"))
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/sbin", "/usr/sbin", "/usr/local/sbin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file());
    found
}

/// Runs a command to success; panics with its output otherwise.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn output(program: &str, args: &[&str]) -> Output {
    let path = which(program).unwrap_or_else(|| program.into());
    Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// The fields of the /proc/mounts line of `dir`, the topmost if several.
pub fn mount_entry(dir: &Path) -> Option<Vec<String>> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = dir.to_str().unwrap();
    mounts
        .lines()
        .rev()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[1] == dir)
}

/// The type of what is mounted at `dir`, if anything.
pub fn mounted_type(dir: &Path) -> Option<String> {
    mount_entry(dir).map(|f| f[2].clone())
}

/// Unmounts `dir` if something is mounted there: normally, and lazily if it stays busy.
pub fn unmount_quietly(dir: &Path) {
    for _ in 0..50 {
        if mounted_type(dir).is_none() {
            return;
        }
        let _ = output("umount", &[dir.to_str().unwrap()]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = output("umount", &["-l", dir.to_str().unwrap()]);
}

pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) on a PID this test started.
    unsafe { libc::kill(pid, signal) };
}

/// A `dst-mount --foreground` child; on drop unmounts its directory and ends it by PID.
pub struct DstMount {
    pub child: Child,
    pub dir: PathBuf,
    pub log: Arc<Mutex<String>>,
}

impl DstMount {
    /// Mounts export `disk` of `server` at `dir` with `extra` arguments; waits until mounted.
    pub fn start(s: &Setup, server: &ServerProcess, dir: &Path, extra: &[&str]) -> DstMount {
        Self::start_at(s, server.addr, dir, extra)
    }

    /// Mounts export `disk` from `addr` (a server, or a proxy in front of one).
    pub fn start_at(s: &Setup, addr: SocketAddr, dir: &Path, extra: &[&str]) -> DstMount {
        Self::spawn_at(s, addr, dir, extra).ready()
    }

    /// Waits until the dst-mount spawned is mounted.
    pub fn ready(mut self) -> DstMount {
        wait_until("the mount", Duration::from_secs(20), || {
            self.log().contains("mounted ") || !self.running()
        });
        assert!(self.running(), "dst-mount exited:\n{}", self.log());
        assert_eq!(
            mounted_type(&self.dir).as_deref(),
            Some("fuse.dst"),
            "{}",
            self.log()
        );
        self
    }

    pub fn spawn(s: &Setup, server: &ServerProcess, dir: &Path, extra: &[&str]) -> DstMount {
        Self::spawn_at(s, server.addr, dir, extra)
    }

    pub fn spawn_at(s: &Setup, addr: SocketAddr, dir: &Path, extra: &[&str]) -> DstMount {
        Self::spawn_with_env(s, addr, dir, extra, &[])
    }

    /// As [`spawn_at`](Self::spawn_at), with `env` added to dst-mount's environment.
    pub fn spawn_with_env(
        s: &Setup,
        addr: SocketAddr,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> DstMount {
        Self::spawn_program(
            Path::new(env!("CARGO_BIN_EXE_dst-mount")),
            s,
            addr,
            dir,
            extra,
            env,
        )
    }

    /// As [`spawn_with_env`](Self::spawn_with_env), running the dst-mount at `program`.
    pub fn spawn_program(
        program: &Path,
        s: &Setup,
        addr: SocketAddr,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> DstMount {
        fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(program)
            .arg("--foreground")
            .arg("--key")
            .arg(s.path("client.key"))
            .arg("--server-key")
            .arg(s.path("server.key.pub"))
            .args(extra)
            .arg(format!("{addr}/disk"))
            .arg(dir)
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dst-mount starts");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        DstMount {
            child,
            dir: dir.to_path_buf(),
            log,
        }
    }

    /// The export's file in the mount.
    pub fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dst-mount did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `umount DIR`, then waits for dst-mount to exit.
    pub fn unmount(&mut self) -> ExitStatus {
        run("umount", &[self.dir.to_str().unwrap()]);
        self.wait()
    }

    pub fn signal(&mut self, signal: i32) -> ExitStatus {
        kill(self.child.id() as i32, signal);
        self.wait()
    }
}

impl Drop for DstMount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            unmount_quietly(&self.dir);
            // Not waiting long: the unmount normally ends it; SIGKILL otherwise.
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        unmount_quietly(&self.dir);
        if std::thread::panicking() {
            eprintln!("dst-mount log:\n{}", self.log());
        }
    }
}

/// A filesystem mounted from a device; unmounted on drop unless [`FsMount::unmount`] did.
pub struct FsMount {
    pub dir: PathBuf,
    mounted: bool,
}

impl FsMount {
    /// `mount -o OPTIONS DEV DIR`.
    pub fn mount(dev: &str, dir: &Path, options: &str) -> FsMount {
        fs::create_dir_all(dir).unwrap();
        run("mount", &["-o", options, dev, dir.to_str().unwrap()]);
        FsMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// `umount DIR`, which must succeed.
    pub fn unmount(&mut self) {
        run("umount", &[self.dir.to_str().unwrap()]);
        self.mounted = false;
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            unmount_quietly(&self.dir);
        }
    }
}

/// Files of pseudo-random data: (path relative to a directory, length, seed).
pub type Files = [(String, usize, u64)];

/// Writes `files` under `root`, making directories as needed, and syncs the filesystem.
pub fn write_files(root: &Path, files: &Files) {
    for (name, len, seed) in files {
        let path = root.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, crate::common::pattern(*len, *seed)).unwrap();
    }
    run("sync", &["-f", root.to_str().unwrap()]);
}

/// Checks that every one of `files` under `root` holds what [`write_files`] wrote.
pub fn check_files(root: &Path, files: &Files) {
    for (name, len, seed) in files {
        let data = fs::read(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(data.len(), *len, "{name}: length");
        assert!(
            data == crate::common::pattern(*len, *seed),
            "{name}: contents differ"
        );
    }
}

/// A loop device; detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    /// `losetup ARGS -f --show FILE`.
    pub fn attach(file: &Path, args: &[&str]) -> Loop {
        let mut all = args.to_vec();
        all.extend(["-f", "--show", file.to_str().unwrap()]);
        let dev = run("losetup", &all).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        Loop { dev }
    }

    /// A value from /sys/block/loopN/.
    pub fn sys(&self, name: &str) -> String {
        let base = self.dev.trim_start_matches("/dev/");
        fs::read_to_string(format!("/sys/block/{base}/{name}"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Detach can fail briefly while a filesystem lets go of the device.
        for _ in 0..50 {
            if output("losetup", &["-d", &self.dev]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev);
    }
}

/// A page-aligned buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is owned; `&mut self` is needed to change it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes of `pattern(len, seed)`; `len` must not be 0.
    pub fn new(len: usize, seed: u64) -> AlignedBuf {
        let mut buf = Self::zeroed(len);
        buf.as_mut_slice().copy_from_slice(&pattern(len, seed));
        buf
    }

    /// `len` zero bytes; `len` must not be 0.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero-sized layout; the pointer is checked and freed in Drop.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `len` initialised bytes, borrowed uniquely through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated with this layout in `zeroed`.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
