//! What the service manager (systemd) is told about this process, through sd_notify(3):
//! ready, reloading, stopping, a one-line status, and watchdog pings. Without
//! `NOTIFY_SOCKET` (not started by a service manager) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn managed() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn tell(states: &[NotifyState]) {
    // The service manager may be gone (at shutdown); that is no reason to stop serving.
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("cannot notify the service manager: {e}");
    }
}

/// Start-up is done: clients can connect, or the mount is usable.
pub fn ready(status: &str) {
    tell(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The configuration is being read again; [`ready`] follows. systemd from v253 wants the
/// monotonic time with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => tell(&[NotifyState::Reloading, now]),
        Err(_) => tell(&[NotifyState::Reloading]),
    }
}

/// Shutting down: in-flight work is being finished.
pub fn stopping(status: &str) {
    tell(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A one-line summary for `systemctl status`.
pub fn status(line: &str) {
    tell(&[NotifyState::Status(line)]);
}

/// How often to ping the watchdog, if the service manager wants pings (`WatchdogSec=`):
/// half its timeout, as sd_watchdog_enabled(3) advises.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Tells the watchdog this process still works.
pub fn watchdog() {
    tell(&[NotifyState::Watchdog]);
}
