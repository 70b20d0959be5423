//! A dst mount's settings and the parts of its life that the keeper ([`crate::keeper`])
//! and its workers ([`crate::worker`]) share: the engine's settings from the mount
//! request, where output goes once mounted, following the export's size, finishing
//! in-flight work and unmounting. Also the background start: dst-mount forks before any
//! thread exists, the child (the keeper) mounts and reports over a pipe, and the parent
//! exits only with that report, so a mount command returns when the mount is usable, or
//! fails with the child's reason.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cipher::Cipher;
use crate::client::core;
use crate::client::engine::{Engine, EngineConfig};
use crate::client::ClientConfig;
use crate::fuse::{self, Tasks};
use crate::keeper;
use crate::keys::{PrivateKey, PublicKey};
use crate::mount_options::MountRequest;
use crate::protocol::Access;

/// The transfer size asked for when none is given; the server may agree to less.
pub const DEFAULT_MAX_TRANSFER: u32 = 1 << 20;

/// Resend and ping settings chosen together (`fail_fast`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub resend_timeout: Duration,
    pub resend_count: u32,
    pub ping_interval: Duration,
}

impl Profile {
    /// How long a transaction waits at most before it fails with EIO when nothing answers.
    pub fn give_up_after(&self) -> Duration {
        core::give_up_after(self.resend_timeout, self.resend_count)
    }
}

/// The default profile: a dead or unreachable export node surfaces as EIO only after
/// 5 s x 13 = 65 s, so a restarted server or a short network outage is ridden out.
pub const DEFAULT_PROFILE: Profile = Profile {
    resend_timeout: EngineConfig::DEFAULT_RESEND_TIMEOUT,
    resend_count: EngineConfig::DEFAULT_RESEND_COUNT,
    ping_interval: EngineConfig::DEFAULT_PING_INTERVAL,
};

/// The `fail_fast` profile, for a member of an array (btrfs RAID1, md, LVM mirrors): I/O
/// to a dead export node fails with EIO after 1 s x 4 = 4 s, a lost connection is noticed
/// within 2 s, and the array carries on degraded instead of stalling for a minute.
pub const FAIL_FAST: Profile = Profile {
    resend_timeout: Duration::from_secs(1),
    resend_count: 3,
    ping_interval: Duration::from_secs(1),
};

/// The engine settings of a request: its options where given, then the profile it chose
/// (`fail_fast`), then the engine's defaults. Explicit resend and ping settings win over
/// the profile, wherever they were given (fstab, `-o` or flags).
pub fn engine_config(req: &MountRequest, key: PrivateKey, server_key: PublicKey) -> EngineConfig {
    let o = &req.options;
    let mut cfg = EngineConfig::new(ClientConfig {
        server: req.source.server.address(),
        export: req.source.export.clone(),
        key,
        server_key,
        cipher: o.cipher.unwrap_or_else(Cipher::preferred),
        access: if o.read_only == Some(true) {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        },
        max_transfer: o.max_transfer.unwrap_or(DEFAULT_MAX_TRANSFER),
        congestion: o.congestion_control.clone().unwrap_or_default(),
    });
    let profile = if o.fail_fast == Some(true) {
        FAIL_FAST
    } else {
        DEFAULT_PROFILE
    };
    cfg.resend_timeout = profile.resend_timeout;
    cfg.resend_count = profile.resend_count;
    cfg.ping_interval = profile.ping_interval;
    if let Some(v) = o.resend_timeout {
        cfg.resend_timeout = v;
    }
    if let Some(v) = o.resend_count {
        cfg.resend_count = v;
    }
    if let Some(v) = o.ping_interval {
        cfg.ping_interval = v;
    }
    if let Some(v) = o.window_requests {
        cfg.window_requests = v;
    }
    if let Some(v) = o.window_bytes {
        cfg.window_bytes = v;
    }
    cfg
}

/// The resend settings in effect, for the log: what an operator needs to know about when
/// an outage turns into I/O errors.
fn resend_summary(cfg: &EngineConfig, fail_fast: bool) -> String {
    let give_up = give_up_after(cfg);
    format!(
        "{} profile: resend timeout {:?}, resend count {}, ping interval {:?}; \
         I/O fails with EIO after {give_up:?} without an answer",
        if fail_fast { "fail-fast" } else { "default" },
        cfg.resend_timeout,
        cfg.resend_count,
        cfg.ping_interval,
    )
}

/// How long a transaction waits at most for an answer under `cfg`.
fn give_up_after(cfg: &EngineConfig) -> Duration {
    core::give_up_after(cfg.resend_timeout, cfg.resend_count)
}

/// Loads the keys a request names; the messages say which option to fix.
pub fn load_keys(req: &MountRequest) -> Result<(PrivateKey, PublicKey), String> {
    let key = req
        .options
        .key
        .as_ref()
        .ok_or("no client key: pass --key FILE or -o key=FILE")?;
    let server_key = req
        .options
        .server_key
        .as_ref()
        .ok_or("no server key to pin: pass --server-key FILE|BASE64 or -o server_key=...")?;
    let key = crate::keys::load_private(key).map_err(|e| e.to_string())?;
    let server_key =
        crate::keys::load_public(server_key).map_err(|e| format!("server key: {e}"))?;
    Ok((key, server_key))
}

/// Has every thread allocate from one malloc arena; call before any thread exists. The
/// worker's FUSE threads take payload buffers that its reply thread gives back: with an
/// arena per thread, each kept its own freed megabytes, and peak memory under load rose
/// by a third. Large buffers are pooled, so the arena's lock is rarely taken for them.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Mounts and keeps the mount in this process until unmounted or signalled. `cfg` is only
/// described in the log: each worker makes its own from `req`.
pub fn run_foreground(req: &MountRequest, cfg: EngineConfig) -> Result<(), String> {
    let (settings, give_up) = settings(req, cfg);
    keeper::keep(req, &settings, give_up, None)
}

/// What the keeper needs of the engine's settings: the log's line about them, and how
/// long I/O may wait for an answer (also for a worker to take over). The configuration
/// (and its key) is dropped.
fn settings(req: &MountRequest, cfg: EngineConfig) -> (String, Duration) {
    (
        resend_summary(&cfg, req.options.fail_fast == Some(true)),
        give_up_after(&cfg),
    )
}

/// Forks; the child mounts and serves, the parent returns once the mount is ready (Ok) or
/// with the child's error. Must be called while the process has one thread: fork copies
/// only the calling thread, so locks held by others would stay locked in the child.
pub fn run_background(req: &MountRequest, cfg: EngineConfig) -> Result<(), String> {
    let (settings, give_up) = settings(req, cfg);
    let (read_end, write_end) = pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: the process is single-threaded here (see above), so the child may continue
    // running arbitrary code.
    match unsafe { libc::fork() } {
        -1 => Err(format!("cannot fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // Still in the caller's process group until the mount is ready, so that Ctrl-C
            // on a mount command that hangs connecting stops this process too.
            let mut report = File::from(write_end);
            match keeper::keep(req, &settings, give_up, Some(&mut report)) {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    // Every error comes before readiness; the parent prints it.
                    let _ = report.write_all(&[REPORT_ERROR]);
                    let _ = report.write_all(e.as_bytes());
                    std::process::exit(1)
                }
            }
        }
        child => {
            drop(write_end);
            let mut pipe = File::from(read_end);
            let mut first = [0];
            // The child keeps its end open while it serves, so only an error is read to EOF.
            match pipe.read(&mut first) {
                Ok(1) if first[0] == REPORT_READY => Ok(()),
                Ok(1) => {
                    let mut message = Vec::new();
                    let _ = pipe.read_to_end(&mut message);
                    reap(child);
                    Err(String::from_utf8_lossy(&message).into_owned())
                }
                _ => Err(format!(
                    "the background process ended before the mount was ready ({})",
                    reap(child)
                )),
            }
        }
    }
}

pub(crate) const REPORT_READY: u8 = 0;
const REPORT_ERROR: u8 = 1;

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array with two new descriptors, owned from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    unsafe { Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Waits for a child that failed; describes how it ended.
fn reap(pid: libc::pid_t) -> String {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return "exit status unknown".into();
    }
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit status {}", libc::WEXITSTATUS(status))
    }
}

/// Whenever the export grows, makes the kernel take the data file's new size: its cached
/// attributes are dropped, then the file is looked at, so that the kernel asks for them
/// again and a loop device on the file finds the new size (`losetup -c`). On a thread of
/// its own, since the FUSE thread answers that look; it lives as long as the process.
pub(crate) fn follow_size(
    engine: &Engine,
    notifier: fuser::Notifier,
    file: PathBuf,
) -> Result<(), String> {
    let engine = engine.clone();
    std::thread::Builder::new()
        .name("resize".into())
        .spawn(move || {
            let mut known = engine.size();
            loop {
                known = smol::block_on(engine.resized(known));
                if let Err(e) = fuse::invalidate_size(&notifier) {
                    log::warn!("cannot tell the kernel the new size {known}: {e}");
                }
                match std::fs::metadata(&file) {
                    Ok(m) => log::info!("{} now has {} bytes", file.display(), m.len()),
                    Err(e) => log::debug!("{}: {e}", file.display()),
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the resize thread: {e}"))
}

/// Ends requests, then transactions: no request is started any more (those that arrive fail
/// with EIO), the running ones reply, and the engine waits for the acks of what it sent.
pub(crate) async fn finish(tasks: &Arc<Tasks>, engine: &Engine) {
    let running = tasks.running();
    if running > 0 {
        log::info!("waiting for {running} requests in progress");
    }
    tasks.stop().await;
    engine.close().await;
    log::info!("all transactions finished; exiting");
}

/// Unmounts after a signal. A mount still in use (a loop device on the file) is detached
/// lazily: its name goes away at once, and users of open descriptors get errors once this
/// process has exited, rather than the unmount failing and the signal doing nothing.
pub(crate) fn unmount(mountpoint: &Path) {
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 on a NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        return;
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) => {
            log::warn!(
                "{} is busy (a loop device or process still uses it); detaching it lazily",
                mountpoint.display()
            );
            // SAFETY: as above.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                log::error!(
                    "cannot detach {}: {}",
                    mountpoint.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        // Not root: fusermount3 is the setuid helper that may unmount a user's FUSE mount.
        Some(libc::EPERM) => {
            let ok = ["fusermount3", "fusermount"].iter().any(|bin| {
                std::process::Command::new(bin)
                    .args(["-u", "-z", "-q"])
                    .arg(mountpoint)
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !ok {
                log::error!(
                    "cannot unmount {}: fusermount3 -u failed",
                    mountpoint.display()
                );
            }
        }
        _ => log::error!("cannot unmount {}: {err}", mountpoint.display()),
    }
}

/// Where the output goes once mounted: /dev/null for stdin and stdout, and for stderr the log
/// file or, in the background, /dev/null.
pub(crate) struct Output {
    null: File,
    log: Option<File>,
}

impl Output {
    pub(crate) fn open(log_file: Option<&Path>) -> Result<Output, String> {
        let null = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| format!("cannot open /dev/null: {e}"))?;
        let log = match log_file {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok(Output { null, log })
    }

    /// Leaves the caller's session (its terminal's hangup and job control no longer reach
    /// this process), terminal or pipes, and the working directory, which would otherwise stay
    /// busy for as long as the mount lives.
    pub(crate) fn detach_all(&self) {
        // SAFETY: plain system call; fails harmlessly if already a session leader.
        unsafe { libc::setsid() };
        let err = self.log.as_ref().unwrap_or(&self.null);
        // SAFETY: dup2 onto the standard descriptors, which stay open.
        unsafe {
            libc::dup2(self.null.as_raw_fd(), 0);
            libc::dup2(self.null.as_raw_fd(), 1);
            libc::dup2(err.as_raw_fd(), 2);
        }
        let _ = std::env::set_current_dir("/");
    }

    /// In the foreground, only a log file given replaces stderr.
    pub(crate) fn redirect_stderr(&self) {
        if let Some(log) = &self.log {
            // SAFETY: dup2 onto stderr, which stays open.
            unsafe { libc::dup2(log.as_raw_fd(), 2) };
        }
    }
}

/// Where the fstab is: /etc/fstab, or `DST_FSTAB` (for tests and unusual systems).
pub fn fstab_path() -> PathBuf {
    std::env::var_os("DST_FSTAB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/fstab"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount_options::{resolve, Invocation};

    fn config(args: &[&str]) -> EngineConfig {
        let mut inv = Invocation {
            positional: vec!["node1/disk".into(), "/mnt/r".into()],
            ..Invocation::default()
        };
        inv.option_strings = args.iter().map(|s| s.to_string()).collect();
        let req = resolve(inv, || unreachable!()).unwrap();
        let key = crate::keys::generate();
        let server_key = crate::keys::generate().public();
        engine_config(&req, key, server_key)
    }

    fn profile(cfg: &EngineConfig) -> Profile {
        Profile {
            resend_timeout: cfg.resend_timeout,
            resend_count: cfg.resend_count,
            ping_interval: cfg.ping_interval,
        }
    }

    #[test]
    fn a_weak_server_key_is_refused_as_option_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        crate::keys::write_keypair(&key, false).unwrap();
        let zero = PublicKey([0; 32]).to_string();
        let weak_file = dir.path().join("weak.pub");
        std::fs::write(&weak_file, format!("{zero}\n")).unwrap();
        for server_key in [zero.clone(), weak_file.display().to_string()] {
            let mut inv = Invocation {
                positional: vec!["node1/disk".into(), "/mnt/r".into()],
                ..Invocation::default()
            };
            inv.option_strings = vec![format!("key={},server_key={server_key}", key.display())];
            let req = resolve(inv, || unreachable!()).unwrap();
            let err = load_keys(&req).unwrap_err();
            assert!(
                err.starts_with("server key: ") && err.contains("is a low-order (weak) key"),
                "{err}"
            );
        }
    }

    #[test]
    fn profiles() {
        assert_eq!(profile(&config(&[])), DEFAULT_PROFILE);
        assert_eq!(DEFAULT_PROFILE.give_up_after(), Duration::from_secs(65));
        assert_eq!(profile(&config(&["fail_fast"])), FAIL_FAST);
        assert_eq!(FAIL_FAST.give_up_after(), Duration::from_secs(4));
    }

    #[test]
    fn explicit_settings_win_over_the_profile() {
        // From any layer: here the profile comes later than the explicit setting.
        let cfg = config(&["resend_count=7", "fail_fast,ping_interval=300ms"]);
        assert_eq!(cfg.resend_timeout, FAIL_FAST.resend_timeout);
        assert_eq!(cfg.resend_count, 7);
        assert_eq!(cfg.ping_interval, Duration::from_millis(300));
        let cfg = config(&["resend_timeout=10s"]);
        assert_eq!(cfg.resend_timeout, Duration::from_secs(10));
        assert_eq!(cfg.resend_count, DEFAULT_PROFILE.resend_count);
    }
}
