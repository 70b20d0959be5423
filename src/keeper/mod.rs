//! The keeper: the dst-mount process users start, which owns the mount and its /dev/fuse
//! connection and never serves a request itself. It starts a worker (this executable
//! again, found at the path it was started from, with the same arguments and a control
//! socket, [`WORKER_ENV`]) that connects the engine; then it mounts, answering the
//! kernel's FUSE_INIT with the settings the filesystem wants, and hands the worker the
//! connection. When a worker dies the keeper starts another (with a backoff if they keep
//! dying), and the new one has the kernel resend what the old one left unanswered
//! ([`adopt`]); SIGHUP replaces the worker with the binary now installed, after draining
//! the old one. Unmount and SIGTERM end the worker as a plain mount ends, then the keeper.
//! Without FUSE_NOTIFY_RESEND (Linux before 6.9) a dead worker ends the mount.

mod adopt;
mod control;
mod init;
mod restarts;
mod resume;
mod sys;
pub mod upgrade;
mod watch;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::Session;

pub use adopt::{adopt, request_resend};
pub use control::{worker_control, Adopt, Control, ToKeeper, ToWorker, WORKER_ENV};
pub use restarts::{EXIT_DRAINED, EXIT_FAILED, EXIT_MOUNT_GONE, EXIT_SESSION_ERROR};
pub use resume::KernelInit;

use crate::fuse;
use crate::mount::{unmount, Output, REPORT_READY};
use crate::mount_options::MountRequest;
use crate::service;
use init::InitRecorder;
use restarts::{classify, describe, Backoff, Exit, Next};
use watch::MountWatch;

/// What the keeper waits for.
enum Event {
    Signal(i32),
    /// The kernel ended the FUSE connection: the mount is gone.
    MountGone,
    Message(u32, ToKeeper),
    Exited(u32, Option<i32>, Option<i32>),
}

/// The worker of the moment.
struct Worker {
    pid: u32,
    control: Control,
    serving_since: Option<Instant>,
    adopted: bool,
}

/// What happens next after an event.
enum Flow {
    Continue,
    Done,
}

struct Keeper<'a> {
    source: String,
    mountpoint: PathBuf,
    exe: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    output: Output,
    ready: Option<&'a mut File>,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    session: Option<Session<InitRecorder>>,
    /// Armed while no worker serves.
    watch: Option<MountWatch>,
    kernel: Option<KernelInit>,
    worker: Option<Worker>,
    /// The first worker served: start-up is over.
    started: bool,
    stopping: bool,
    /// The kernel ended the FUSE connection (unmounted).
    mount_gone: bool,
    restarts: u32,
    last_exit: String,
    backoff: Backoff,
    restart_at: Option<Instant>,
    /// The line that says what was mounted, logged once start-up is over.
    mounted: String,
    /// The resend settings in effect, logged after it.
    settings: String,
    /// Since when no worker serves (a restart or upgrade under way).
    paused_since: Option<Instant>,
    /// Since when no worker serves after one died (not drained).
    dead_since: Option<Instant>,
    give_up: Duration,
    upgrading: bool,
}

/// Runs the keeper of the mount `req` asks for until the mount goes away. `settings` is
/// logged once mounted. If no worker serves for `give_up` after one died (none can reach
/// the export node), the mount ends, so that I/O fails as the engine's would after as long. `ready` is the background start's report pipe; without it, the
/// service manager is told instead.
pub fn keep(
    req: &MountRequest,
    settings: &str,
    give_up: Duration,
    ready: Option<&mut File>,
) -> Result<(), String> {
    let mountpoint = req
        .mountpoint
        .canonicalize()
        .map_err(|e| format!("mount point {}: {e}", req.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            mountpoint.display()
        ));
    }
    // Opened before mounting, so that a bad log file fails the mount instead of leaving it
    // without a server.
    let output = Output::open(req.options.log_file.as_deref())?;
    // The path, not /proc/self/exe: an upgrade runs what is installed there now.
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the dst-mount executable: {e}"))?;
    let cwd = std::env::current_dir().map_err(|e| format!("working directory: {e}"))?;
    let (events_tx, events) = mpsc::channel();
    watch_signals(events_tx.clone())?;
    let mut keeper = Keeper {
        source: req.source.to_string(),
        mountpoint,
        exe,
        args: std::env::args_os().skip(1).collect(),
        cwd,
        output,
        ready,
        events_tx,
        events,
        session: None,
        watch: None,
        kernel: None,
        worker: None,
        started: false,
        stopping: false,
        mount_gone: false,
        restarts: 0,
        last_exit: "none".into(),
        backoff: Backoff::default(),
        restart_at: None,
        mounted: String::new(),
        settings: settings.to_string(),
        paused_since: None,
        dead_since: None,
        give_up,
        upgrading: false,
    };
    keeper.worker = Some(keeper.spawn()?);
    let result = keeper.run();
    if let Err(e) = &result {
        // In the background once started, nobody else would see why the mount ended.
        if keeper.started && keeper.ready.is_some() {
            log::error!("{e}");
        }
        keeper.abandon();
    }
    result
}

fn watch_signals(events: Sender<Event>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

impl Keeper<'_> {
    fn run(&mut self) -> Result<(), String> {
        loop {
            let give_up_at = self.dead_since.map(|t| t + self.give_up);
            let event = match [self.restart_at, give_up_at].into_iter().flatten().min() {
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => self
                    .events
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let flow = match event {
                Ok(Event::Signal(sig)) => self.on_signal(sig)?,
                Ok(Event::MountGone) => self.on_mount_gone(),
                Ok(Event::Message(pid, msg)) if self.is_current(pid) => self.on_message(msg)?,
                Ok(Event::Exited(pid, code, sig)) if self.is_current(pid) => {
                    self.on_exit(code, sig)?
                }
                Ok(_) => Flow::Continue,
                Err(RecvTimeoutError::Timeout)
                    if give_up_at.is_some_and(|at| at <= Instant::now()) =>
                {
                    return Err(format!(
                        "no worker could take over {} for {:?} (the last one {}); \
                         unmounting, so that I/O fails as it would after that long \
                         without an answer",
                        self.mountpoint.display(),
                        self.give_up,
                        self.last_exit
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.restart_at = None;
                    match self.spawn() {
                        Ok(w) => self.worker = Some(w),
                        Err(e) => {
                            let wait = self.backoff.after_death(Duration::ZERO);
                            log::error!("{e}; trying again in {wait:?}");
                            self.restart_at = Some(Instant::now() + wait);
                        }
                    }
                    Flow::Continue
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("the keeper holds a sender"),
            };
            if let Flow::Done = flow {
                return Ok(());
            }
        }
    }

    fn is_current(&self, pid: u32) -> bool {
        self.worker.as_ref().is_some_and(|w| w.pid == pid)
    }

    /// Starts a worker: this executable, the same arguments, the control socket.
    fn spawn(&self) -> Result<Worker, String> {
        let (control, theirs) =
            Control::pair().map_err(|e| format!("cannot make a control socket: {e}"))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            .env(WORKER_ENV, fd.to_string())
            // systemd hears from the keeper only (the main PID).
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null());
        sys::pass_across_exec(&mut cmd, fd);
        let reader = control
            .try_clone()
            .map_err(|e| format!("cannot read the control socket: {e}"))?;
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start a worker ({}): {e}", self.exe.display()))?;
        drop(theirs);
        let pid = child.id();
        let tx = self.events_tx.clone();
        let words = std::thread::Builder::new()
            .name("worker-control".into())
            .spawn(move || {
                while let Ok(Some(msg)) = reader.from_worker() {
                    if tx.send(Event::Message(pid, msg)).is_err() {
                        return;
                    }
                }
            });
        let tx = self.events_tx.clone();
        let waiter = words.and_then(|words| {
            std::thread::Builder::new()
                .name("worker-exit".into())
                .spawn(move || {
                    let (code, sig) = match child.wait() {
                        Ok(status) => (status.code(), status.signal()),
                        Err(_) => (None, None),
                    };
                    // Its last words (why it failed) come before the news of its end.
                    let _ = words.join();
                    let _ = tx.send(Event::Exited(pid, code, sig));
                })
        });
        if let Err(e) = waiter {
            let _ = sys::signal_process(pid, libc::SIGKILL);
            return Err(format!("cannot start a thread: {e}"));
        }
        log::debug!("started worker {pid}: {}", self.exe.display());
        Ok(Worker {
            pid,
            control,
            serving_since: None,
            adopted: false,
        })
    }

    fn on_signal(&mut self, sig: i32) -> Result<Flow, String> {
        if sig == libc::SIGHUP {
            self.upgrade();
            return Ok(Flow::Continue);
        }
        if !self.started {
            return Err(format!("signal {sig} before the mount was ready"));
        }
        if self.stopping {
            return Ok(Flow::Continue);
        }
        self.stopping = true;
        if self.ready.is_none() {
            service::stopping("waiting for the acks of writes in flight");
        }
        log::info!("signal {sig}: unmounting {}", self.mountpoint.display());
        unmount(&self.mountpoint);
        match &self.worker {
            None => return Ok(Flow::Done),
            Some(w) if w.adopted => {
                if let Err(e) = w.control.tell_worker(&ToWorker::Stop, None) {
                    log::warn!("cannot tell worker {} to stop: {e}", w.pid);
                }
            }
            // It serves nothing yet, so nothing is in flight.
            Some(w) => drop(sys::signal_process(w.pid, libc::SIGKILL)),
        }
        Ok(Flow::Continue)
    }

    /// Unmounted: a worker that serves finishes as usual; one that does not yet is
    /// ended, and none is started any more.
    fn on_mount_gone(&mut self) -> Flow {
        self.mount_gone = true;
        self.restart_at = None;
        match &self.worker {
            None => {
                log::info!("{} was unmounted", self.mountpoint.display());
                Flow::Done
            }
            Some(w) if w.adopted => Flow::Continue,
            Some(w) => {
                let _ = sys::signal_process(w.pid, libc::SIGKILL);
                Flow::Continue
            }
        }
    }

    fn on_message(&mut self, msg: ToKeeper) -> Result<Flow, String> {
        match msg {
            ToKeeper::Connected {
                read_only, size, ..
            } => {
                if self.stopping || self.mount_gone {
                    return Ok(Flow::Continue);
                }
                if self.session.is_none() {
                    self.mount(read_only, size)?;
                }
                self.hand_over()
            }
            ToKeeper::Serving => {
                self.served();
                Ok(Flow::Continue)
            }
            ToKeeper::Failed(why) if !self.started => Err(why),
            ToKeeper::Failed(why) => {
                log::error!("{why}");
                Ok(Flow::Continue)
            }
        }
    }

    /// Mounts, answering the kernel's INIT; the first worker connected, so a mount that
    /// cannot be served is never left behind.
    fn mount(&mut self, read_only: bool, size: u64) -> Result<(), String> {
        // SAFETY: plain system call without arguments.
        let root = unsafe { libc::getuid() } == 0;
        let recorded = Arc::new(Mutex::new(None));
        let session = Session::new(
            InitRecorder(recorded.clone()),
            &self.mountpoint,
            &fuse::mount_config(&self.source, read_only, root),
        )
        .map_err(|e| format!("cannot mount at {}: {e}", self.mountpoint.display()))?;
        let kernel = recorded.lock().unwrap().take();
        // While no worker serves, the keeper must see the unmount itself.
        let events = self.events_tx.clone();
        let watch = session.as_fd().try_clone_to_owned().and_then(|fd| {
            MountWatch::start(fd, move || {
                let _ = events.send(Event::MountGone);
            })
        });
        self.session = Some(session);
        self.watch = Some(watch.map_err(|e| format!("cannot watch the FUSE connection: {e}"))?);
        let kernel = kernel.ok_or("the kernel's FUSE_INIT went unseen; report this bug")?;
        if !kernel.can_resend() {
            log::warn!(
                "this kernel (FUSE {}.{}) lacks FUSE_NOTIFY_RESEND: if the worker serving \
                 the mount dies, the mount ends, and --upgrade is refused; crash survival \
                 and live upgrades need Linux 6.9 or later",
                kernel.major,
                kernel.minor
            );
        }
        self.kernel = Some(kernel);
        self.mounted = format!(
            "mounted {} ({size} bytes, {}) at {} (pid {})",
            self.source,
            if read_only { "read-only" } else { "read-write" },
            self.mountpoint.display(),
            std::process::id()
        );
        Ok(())
    }

    /// Sends the worker the FUSE connection.
    fn hand_over(&mut self) -> Result<Flow, String> {
        let (Some(session), Some(kernel), Some(worker)) =
            (&self.session, self.kernel, self.worker.as_mut())
        else {
            return Ok(Flow::Continue);
        };
        let adopt = Adopt {
            kernel,
            keeper_pid: std::process::id(),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            mountpoint: self.mountpoint.clone(),
        };
        match worker
            .control
            .tell_worker(&ToWorker::Adopt(adopt), Some(session.as_fd()))
        {
            Ok(()) => worker.adopted = true,
            // It died meanwhile; its exit comes next.
            Err(e) => log::warn!("cannot hand the mount to worker {}: {e}", worker.pid),
        }
        Ok(Flow::Continue)
    }

    fn served(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        worker.serving_since = Some(Instant::now());
        let pid = worker.pid;
        if let Some(watch) = &self.watch {
            watch.disarm();
        }
        if !self.started {
            self.started = true;
            self.report_ready();
            return;
        }
        self.dead_since = None;
        let paused = self.paused_since.take().map(|t| t.elapsed());
        log::info!(
            "worker {pid} took over {} (restart {}; the last worker: {}); requests waited {:?}",
            self.mountpoint.display(),
            self.restarts,
            self.last_exit,
            paused.unwrap_or_default()
        );
        if std::mem::take(&mut self.upgrading) && self.ready.is_none() {
            service::ready(&format!("upgraded; worker {pid} serves"));
        }
    }

    /// Start-up is over: the background start's caller returns, or systemd hears READY.
    fn report_ready(&mut self) {
        match self.ready.as_deref_mut() {
            Some(report) => {
                // Nothing stays attached to the caller's terminal or pipes.
                self.output.detach_all();
                // Not fatal: the mount works; the parent then says the process ended early.
                let _ = report.write_all(&[REPORT_READY]);
            }
            None => {
                self.output.redirect_stderr();
                service::ready(&format!(
                    "mounted {} at {}",
                    self.source,
                    self.mountpoint.display()
                ));
            }
        }
        // After the redirection: a background mount says nothing on the terminal when it
        // works, and its log file starts with this line.
        log::info!("{}", self.mounted);
        log::info!("{}", self.settings);
    }

    fn on_exit(&mut self, code: Option<i32>, sig: Option<i32>) -> Result<Flow, String> {
        let Some(worker) = self.worker.take() else {
            return Ok(Flow::Continue);
        };
        if let Some(watch) = &self.watch {
            watch.arm();
        }
        let why = describe(code, sig);
        if self.stopping || self.mount_gone {
            log::info!("worker {} ended: {why}", worker.pid);
            return Ok(Flow::Done);
        }
        if !self.started {
            return Err(format!(
                "cannot mount {}: the worker ended before the mount was ready ({why})",
                self.source
            ));
        }
        let exit = classify(code, sig);
        if let Exit::Died(_) = exit {
            log::error!("worker {} {why}", worker.pid);
            self.dead_since.get_or_insert_with(Instant::now);
        }
        let can_resend = self.kernel.is_some_and(|k| k.can_resend());
        let served = worker
            .serving_since
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let wait = match self.backoff.next(&exit, can_resend, served) {
            Next::Exit => {
                log::info!("{} was unmounted", self.mountpoint.display());
                return Ok(Flow::Done);
            }
            Next::EndMount => {
                // Unmounted by abandon(), as after any error.
                log::error!(
                    "this kernel cannot resend what the worker left unanswered (Linux 6.9 \
                     or later can): unmounting {}",
                    self.mountpoint.display()
                );
                return Err(format!("the worker serving {} {why}", self.source));
            }
            Next::Restart(wait) => wait,
        };
        self.restarts += 1;
        self.last_exit = why;
        self.paused_since.get_or_insert_with(Instant::now);
        if !wait.is_zero() {
            log::warn!("starting a new worker in {wait:?}");
        }
        self.restart_at = Some(Instant::now() + wait);
        Ok(Flow::Continue)
    }

    /// SIGHUP: the serving worker drains and exits; the next one runs the binary now at
    /// the keeper's path.
    fn upgrade(&mut self) {
        if self.kernel.is_none() {
            log::warn!("upgrade asked before the mount is there; the worker starting runs it");
            return;
        }
        if !self.kernel.is_some_and(|k| k.can_resend()) {
            log::error!(
                "cannot upgrade the worker: this kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9 \
                 or later); unmount and mount again to run the new dst-mount"
            );
            return;
        }
        match self.worker.as_ref() {
            Some(w) if w.serving_since.is_some() && !self.upgrading => {
                log::info!(
                    "upgrade: worker {} drains; the next one runs {}",
                    w.pid,
                    self.exe.display()
                );
                if self.ready.is_none() {
                    service::reloading();
                }
                match w.control.tell_worker(&ToWorker::Drain, None) {
                    Ok(()) => {
                        self.upgrading = true;
                        self.paused_since = Some(Instant::now());
                    }
                    Err(e) => log::error!("cannot tell worker {} to drain: {e}", w.pid),
                }
            }
            _ => log::warn!(
                "upgrade: no worker serves at the moment; the next one runs {} anyway",
                self.exe.display()
            ),
        }
    }

    /// After an error: no worker stays behind, and a mount made is undone.
    fn abandon(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = sys::signal_process(w.pid, libc::SIGKILL);
        }
        if self.session.is_some() {
            unmount(&self.mountpoint);
        }
    }
}
