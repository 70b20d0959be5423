//! `dst-mount --upgrade MOUNTPOINT`: finds the mount's keeper through its `.stats`, tells it
//! to replace its worker with the dst-mount now installed (SIGHUP, as `systemctl reload`
//! does), and waits until a new worker serves.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::status::{read_stats, stats_number};

use super::sys;

/// How long a drain and a new worker's start may take before the command gives up
/// waiting (the upgrade itself goes on).
const PATIENCE: Duration = Duration::from_secs(120);

/// Upgrades the worker of the dst mount at `mountpoint`; says what happened.
pub fn upgrade(mountpoint: &Path) -> Result<String, String> {
    let (_, path, stats) = read_stats(mountpoint)?;
    let shown = path.display();
    let (Some(keeper), Some(old)) = (
        stats_number(&stats, "keeper_pid"),
        stats_number(&stats, "worker_pid"),
    ) else {
        return Err(format!(
            "{shown} is served by a dst-mount without a keeper (an older version); \
             unmount and mount it again to run the installed dst-mount"
        ));
    };
    let keeper = u32::try_from(keeper).map_err(|_| format!("{shown}: bad keeper pid"))?;
    let started = Instant::now();
    sys::signal_process(keeper, libc::SIGHUP)
        .map_err(|e| format!("cannot signal the keeper of {shown} (pid {keeper}): {e}"))?;
    while started.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(20));
        // Reading .stats waits while no worker serves, and shows the new one's after.
        let (_, _, now) = read_stats(&path)?;
        match stats_number(&now, "worker_pid") {
            Some(new) if new != old => {
                return Ok(format!(
                    "{shown}: worker {old} drained and replaced by worker {new} in {} ms",
                    started.elapsed().as_millis()
                ))
            }
            _ => continue,
        }
    }
    Err(format!(
        "{shown}: the keeper (pid {keeper}) did not replace worker {old} within {PATIENCE:?}; \
         see its log (a kernel before Linux 6.9 cannot upgrade a mount)"
    ))
}
