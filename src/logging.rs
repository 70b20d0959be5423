//! Log output for the binaries (`log` through `env_logger`, levels from `RUST_LOG`).
//!
//! On a terminal or in a file, each line has its time, level and module. When stderr is
//! the journal (systemd sets `JOURNAL_STREAM` to the device and inode of that stream),
//! each line starts with its syslog priority instead (`<3>` for errors … `<7>` for
//! debug) and carries no time of its own: the journal adds one, and `journalctl -p`
//! filters by the priority.

use std::io::Write;

use log::Level;

/// Starts logging at `default_filter` unless `RUST_LOG` says otherwise.
pub fn init(default_filter: &str) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter));
    if stderr_is_journal() {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}: {}",
                priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    builder.init();
}

/// The syslog priority of a level (sd-daemon(3)).
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The device and inode that `JOURNAL_STREAM` names ("DEV:INODE").
pub fn journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Whether stderr is still the stream systemd connected to the journal: a process whose
/// stderr was redirected elsewhere inherits the variable, but not the stream.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(named) = std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|v| journal_stream(&v))
    else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| (m.dev(), m.ino()) == named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
        assert_eq!(priority(Level::Trace), 7);
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(journal_stream("8:12345"), Some((8, 12345)));
        for bad in ["", "8", "8:", ":1", "a:1", "8:1:2", "-1:2"] {
            assert_eq!(journal_stream(bad), None, "{bad:?}");
        }
    }
}
