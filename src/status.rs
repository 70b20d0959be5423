//! A mount's live counters (its `.stats`, see `fuse`) as `dst-mount --status` shows them:
//! for people, aligned with units, or as Prometheus text for node_exporter's textfile
//! collector. Both take counters they do not know by the same rules, so a new counter in
//! `.stats` needs no change here.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::fuse;
use crate::prometheus::label_value;
use crate::units::human_bytes;

/// How `--status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Human,
    Prometheus,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "human" => Ok(Format::Human),
            "prometheus" => Ok(Format::Prometheus),
            _ => Err(format!("unknown format '{s}'; use human or prometheus")),
        }
    }
}

/// `dst-mount --status MOUNTPOINT`: the live counters of a dst mount, in `format`. An
/// error when MOUNTPOINT is not a dst mount, or when its dst-mount no longer serves it.
pub fn status(mountpoint: &Path, format: Format) -> Result<String, String> {
    let (source, path, text) = read_stats(mountpoint)?;
    Ok(match format {
        Format::Human => for_people(&source, &path, &text),
        Format::Prometheus => for_prometheus(&source, &path, &text),
    })
}

/// A dst mount's source, canonical mount point and `.stats` text; an error that says what
/// to do when `mountpoint` is not a dst mount, or when nothing serves it any more.
pub fn read_stats(mountpoint: &Path) -> Result<(String, PathBuf, String), String> {
    let shown = mountpoint.display();
    // A mount whose dst-mount has died cannot be resolved (ENOTCONN): take the path as given.
    let path = mountpoint
        .canonicalize()
        .or_else(|_| std::path::absolute(mountpoint))
        .map_err(|e| format!("{shown}: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("cannot read /proc/self/mounts: {e}"))?;
    let entry = crate::mount_options::find_mount(&mounts, &path)
        .filter(|e| e.fstype == "fuse.dst")
        .ok_or_else(|| format!("{shown} is not a dst mount"))?;
    let stats = path.join(fuse::STATS_NAME);
    let text = std::fs::read_to_string(&stats).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            format!(
                "{shown}: the dst-mount serving {} is gone ({e}); unmount it: umount -l {shown}",
                entry.source
            )
        } else {
            format!("cannot read {}: {e}", stats.display())
        }
    })?;
    Ok((entry.source, path, text))
}

/// The number on `.stats` line `name`, if there is one.
pub fn stats_number(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `.stats` text for people: a heading, then one aligned line per counter with units.
/// Counters it does not know are shown by the same rules (`_us` is a latency, a name with
/// `bytes` or `size` is a size), so new ones need no change here.
pub fn for_people(source: &str, mountpoint: &Path, stats: &str) -> String {
    let rows: Vec<(String, String)> = stats
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| match line.split_once(' ') {
            Some((name, value)) => (label(name), human_value(name, value.trim())),
            None => (line.to_string(), String::new()),
        })
        .collect();
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = format!("{}: {source}\n", mountpoint.display());
    for (label, value) in rows {
        out.push_str(format!("  {label:<width$}  {value}").trim_end());
        out.push('\n');
    }
    out
}

fn label(name: &str) -> String {
    name.strip_suffix("_us").unwrap_or(name).replace('_', " ")
}

fn human_value(name: &str, value: &str) -> String {
    let Ok(n) = value.parse::<u64>() else {
        return value.to_string();
    };
    if name == "connected" {
        return if n == 0 { "no".into() } else { "yes".into() };
    }
    if name.ends_with("_us") {
        return format!("{:.2} ms", n as f64 / 1000.0);
    }
    if name.contains("bytes") || name.contains("size") {
        return human_bytes(n);
    }
    n.to_string()
}

/// Counters of `.stats` that only grow; every other number is a gauge.
const COUNTERS: [&str; 7] = [
    "requests",
    "resends",
    "reconnects",
    "failures",
    "bytes_read",
    "bytes_written",
    "worker_restarts",
];

/// The `.stats` text in the Prometheus text format, labelled with the mount's source and
/// mount point: `dst_mount_NAME_total` for counters, `_seconds` for `_us` latencies.
pub fn for_prometheus(source: &str, mountpoint: &Path, stats: &str) -> String {
    let labels = format!(
        "source=\"{}\",mountpoint=\"{}\"",
        label_value(source),
        label_value(&mountpoint.display().to_string())
    );
    let mut out = String::new();
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        let (Ok(n), true) = (
            value.trim().parse::<u64>(),
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        ) else {
            continue;
        };
        let (metric, kind, value) = if COUNTERS.contains(&name) {
            (format!("dst_mount_{name}_total"), "counter", n.to_string())
        } else if let Some(stem) = name.strip_suffix("_us") {
            let seconds = n as f64 / 1e6;
            (
                format!("dst_mount_{stem}_seconds"),
                "gauge",
                seconds.to_string(),
            )
        } else {
            (format!("dst_mount_{name}"), "gauge", n.to_string())
        };
        out.push_str(&format!(
            "# TYPE {metric} {kind}\n{metric}{{{labels}}} {value}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_aligned_with_units() {
        let stats =
            "connected 0\nsize 21474836480\nin_flight 3\nin_flight_bytes 12288\nrequests 398\n\
                     bytes_written 46710784\nlatency_p50_us 294911\nlatency_max_us 440\n\
                     some_future_counter 7\nnovalue\nfuse_in_progress 4\n";
        let out = for_people("node1:7700/disk", Path::new("/mnt/r"), stats);
        let want = "\
/mnt/r: node1:7700/disk
  connected            no
  size                 20.0 GiB
  in flight            3
  in flight bytes      12.0 KiB
  requests             398
  bytes written        44.5 MiB
  latency p50          294.91 ms
  latency max          0.44 ms
  some future counter  7
  novalue
  fuse in progress     4
";
        assert_eq!(out, want);
    }

    #[test]
    fn prometheus_text_has_counters_gauges_and_seconds() {
        let stats = "connected 1\nrequests 398\nbytes_written 4096\nlatency_p99_us 1500\n\
                     novalue\nBad-Name 3\nsome_future_gauge x\nworker_restarts 2\n\
                     worker_last_exit killed by signal 9 (SIGKILL)\n";
        let out = for_prometheus("node1:7700/disk", Path::new("/mnt/a \"b\""), stats);
        let labels = r#"{source="node1:7700/disk",mountpoint="/mnt/a \"b\""}"#;
        let want = format!(
            "# TYPE dst_mount_connected gauge\ndst_mount_connected{labels} 1\n\
             # TYPE dst_mount_requests_total counter\ndst_mount_requests_total{labels} 398\n\
             # TYPE dst_mount_bytes_written_total counter\n\
             dst_mount_bytes_written_total{labels} 4096\n\
             # TYPE dst_mount_latency_p99_seconds gauge\n\
             dst_mount_latency_p99_seconds{labels} 0.0015\n\
             # TYPE dst_mount_worker_restarts_total counter\n\
             dst_mount_worker_restarts_total{labels} 2\n"
        );
        assert_eq!(out, want);
    }

    #[test]
    fn stats_numbers_are_found_by_name() {
        let stats = "worker_pid 12\nkeeper_pid 11\nworker_pid_x 3\nworker_last_exit none\n";
        assert_eq!(stats_number(stats, "worker_pid"), Some(12));
        assert_eq!(stats_number(stats, "keeper_pid"), Some(11));
        assert_eq!(stats_number(stats, "worker_last_exit"), None);
        assert_eq!(stats_number(stats, "worker"), None);
    }

    #[test]
    fn formats_are_named() {
        assert_eq!("prometheus".parse(), Ok(Format::Prometheus));
        assert_eq!("human".parse(), Ok(Format::Human));
        assert!("json"
            .parse::<Format>()
            .unwrap_err()
            .contains("human or prometheus"));
    }
}
