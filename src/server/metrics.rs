//! The export node's counters for monitoring, and their Prometheus text exposition
//! (`--metrics`, served by `metrics_endpoint`).
//!
//! Per export and per client key: requests by kind, bytes, errors (by errno per export),
//! latency from a request's arrival to its reply as a histogram. Server-wide: refusals by
//! reason. Gauges (sessions, connections, handshakes, the memory budget, checksum
//! failures) are read when scraped. Counting is relaxed atomics on the request path; an
//! error also takes a lock, and the text is made only when scraped. A client key is
//! named by its `authorized_keys` comment and a fingerprint, never by the key itself.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::admission::Kind;
use crate::keys::PublicKey;
use crate::prometheus::label_value;
use crate::protocol::Op;

/// Upper bounds of the latency buckets, in microseconds; one more bucket is `+Inf`.
const BUCKETS_US: [u64; 15] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// Request kinds, in the order their counters are kept.
const OPS: [Op; 6] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::Ping,
];

/// Refusal reasons, in the order their counters are kept.
const REFUSALS: [Kind; 6] = [
    Kind::Rate,
    Kind::PrefixFull,
    Kind::Evicted,
    Kind::FirstFlight,
    Kind::Timeout,
    Kind::Failed,
];

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Trim => "trim",
        Op::WriteZeroes => "write_zeroes",
        Op::Ping => "ping",
    }
}

fn refusal_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Rate => "rate",
        Kind::PrefixFull => "prefix_full",
        Kind::Evicted => "evicted",
        Kind::FirstFlight => "first_flight_timeout",
        Kind::Timeout => "handshake_timeout",
        Kind::Failed => "handshake_failed",
    }
}

fn op_index(op: Op) -> usize {
    OPS.iter()
        .position(|&o| o == op)
        .expect("every op is listed")
}

#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative; the text is).
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[BUCKETS_US.partition_point(|&b| b < us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

#[derive(Debug, Default)]
struct OpCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Bytes of the successful ones (the range, for trim and write-zeroes).
    bytes: AtomicU64,
    latency: Histogram,
}

/// One export's counters.
#[derive(Debug, Default)]
pub struct ExportCounters {
    ops: [OpCounters; OPS.len()],
    errnos: Mutex<BTreeMap<u32, u64>>,
}

impl ExportCounters {
    /// A request of kind `op` over `length` bytes was answered with `status` after
    /// `latency`.
    pub fn record(&self, op: Op, status: u32, length: u32, latency: Duration) {
        let c = &self.ops[op_index(op)];
        c.requests.fetch_add(1, Relaxed);
        c.latency.observe(latency);
        if status == 0 {
            c.bytes.fetch_add(u64::from(length), Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
            *self.errnos.lock().unwrap().entry(status).or_default() += 1;
        }
    }

    /// Bytes read and written so far by requests that succeeded.
    pub fn moved(&self) -> (u64, u64) {
        let bytes = |op| self.ops[op_index(op)].bytes.load(Relaxed);
        (bytes(Op::Read), bytes(Op::Write))
    }
}

/// One client key's counters.
pub struct ClientCounters {
    /// Its `authorized_keys` comment, possibly empty.
    comment: String,
    /// A fingerprint of the key, so that keys without a comment are told apart.
    fingerprint: String,
    requests: AtomicU64,
    errors: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

impl ClientCounters {
    pub fn record(&self, op: Op, status: u32, length: u32) {
        self.requests.fetch_add(1, Relaxed);
        let moved = match (status, op) {
            (0, Op::Read) => &self.read_bytes,
            (0, Op::Write) => &self.written_bytes,
            (0, _) => return,
            _ => &self.errors,
        };
        let n = if status == 0 { u64::from(length) } else { 1 };
        moved.fetch_add(n, Relaxed);
    }
}

/// A key's fingerprint for labels: a hash, not the key.
pub fn fingerprint(key: &PublicKey) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&key.0))
}

/// Counters of the whole server. Client entries are made for authenticated keys only, so
/// there are at most as many as `authorized_keys` has had lines.
#[derive(Default)]
pub struct Metrics {
    clients: Mutex<HashMap<PublicKey, Arc<ClientCounters>>>,
    refusals: [AtomicU64; REFUSALS.len()],
}

impl Metrics {
    /// The counters of `key`, made on its first session; `comment` names it.
    pub fn client(&self, key: &PublicKey, comment: &str) -> Arc<ClientCounters> {
        self.clients
            .lock()
            .unwrap()
            .entry(*key)
            .or_insert_with(|| {
                Arc::new(ClientCounters {
                    comment: comment.to_owned(),
                    fingerprint: fingerprint(key),
                    requests: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    read_bytes: AtomicU64::new(0),
                    written_bytes: AtomicU64::new(0),
                })
            })
            .clone()
    }

    pub fn refused(&self, kind: Kind) {
        let i = REFUSALS.iter().position(|&k| k == kind).expect("listed");
        self.refusals[i].fetch_add(1, Relaxed);
    }
}

/// One export as a scrape sees it.
pub struct ExportView<'a> {
    pub name: &'a str,
    pub counters: &'a ExportCounters,
    /// Blocks that failed checksum verification, with `:checksums`.
    pub corrupt_blocks: Option<u64>,
}

/// What a scrape reads at its moment.
pub struct Gauges {
    pub sessions: usize,
    pub sessions_connected: usize,
    pub connections: usize,
    pub handshakes: usize,
    pub budget_in_use: usize,
    pub budget_total: usize,
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition (format 0.0.4) of everything.
pub fn render(exports: &[ExportView], metrics: &Metrics, gauges: &Gauges) -> String {
    let mut out = String::new();
    let per_op = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&OpCounters) -> u64| {
        family(out, name, "counter", help);
        for e in exports {
            for (op, c) in OPS.iter().zip(&e.counters.ops) {
                let _ = writeln!(
                    out,
                    "{name}{{export=\"{}\",op=\"{}\"}} {}",
                    label_value(e.name),
                    op_name(*op),
                    get(c)
                );
            }
        }
    };
    per_op(
        &mut out,
        "dst_requests_total",
        "Requests answered, by kind.",
        &|c| c.requests.load(Relaxed),
    );
    per_op(
        &mut out,
        "dst_request_errors_total",
        "Requests answered with an error.",
        &|c| c.errors.load(Relaxed),
    );
    per_op(
        &mut out,
        "dst_request_bytes_total",
        "Bytes of successful requests (the range, for trim and write_zeroes).",
        &|c| c.bytes.load(Relaxed),
    );
    family(
        &mut out,
        "dst_errors_by_errno_total",
        "counter",
        "Requests answered with an error, by errno.",
    );
    for e in exports {
        for (errno, n) in e.counters.errnos.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "dst_errors_by_errno_total{{export=\"{}\",errno=\"{errno}\"}} {n}",
                label_value(e.name)
            );
        }
    }
    family(
        &mut out,
        "dst_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its reply.",
    );
    for e in exports {
        for (op, c) in OPS.iter().zip(&e.counters.ops) {
            let labels = format!("export=\"{}\",op=\"{}\"", label_value(e.name), op_name(*op));
            let mut count = 0;
            for (i, n) in c.latency.buckets.iter().enumerate() {
                count += n.load(Relaxed);
                let le = BUCKETS_US
                    .get(i)
                    .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
                let _ = writeln!(
                    out,
                    "dst_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {count}"
                );
            }
            let sum = c.latency.sum_us.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "dst_request_duration_seconds_sum{{{labels}}} {sum}");
            let _ = writeln!(
                out,
                "dst_request_duration_seconds_count{{{labels}}} {count}"
            );
        }
    }
    family(
        &mut out,
        "dst_checksum_corrupt_blocks",
        "gauge",
        "Blocks that failed checksum verification since the server started.",
    );
    for e in exports {
        if let Some(n) = e.corrupt_blocks {
            let _ = writeln!(
                out,
                "dst_checksum_corrupt_blocks{{export=\"{}\"}} {n}",
                label_value(e.name)
            );
        }
    }

    let clients = metrics.clients.lock().unwrap();
    let mut clients: Vec<&Arc<ClientCounters>> = clients.values().collect();
    clients.sort_by(|a, b| (&a.comment, &a.fingerprint).cmp(&(&b.comment, &b.fingerprint)));
    let per_client =
        |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ClientCounters) -> u64| {
            family(out, name, "counter", help);
            for c in &clients {
                let _ = writeln!(
                    out,
                    "{name}{{client=\"{}\",key=\"{}\"}} {}",
                    label_value(&c.comment),
                    c.fingerprint,
                    get(c)
                );
            }
        };
    per_client(
        &mut out,
        "dst_client_requests_total",
        "Requests answered, by client key.",
        &|c| c.requests.load(Relaxed),
    );
    per_client(
        &mut out,
        "dst_client_errors_total",
        "Requests answered with an error, by client key.",
        &|c| c.errors.load(Relaxed),
    );
    per_client(
        &mut out,
        "dst_client_read_bytes_total",
        "Bytes read, by client key.",
        &|c| c.read_bytes.load(Relaxed),
    );
    per_client(
        &mut out,
        "dst_client_written_bytes_total",
        "Bytes written, by client key.",
        &|c| c.written_bytes.load(Relaxed),
    );

    family(
        &mut out,
        "dst_refusals_total",
        "counter",
        "Connections refused or handshakes ended, by reason.",
    );
    for (kind, n) in REFUSALS.iter().zip(&metrics.refusals) {
        let _ = writeln!(
            out,
            "dst_refusals_total{{reason=\"{}\"}} {}",
            refusal_name(*kind),
            n.load(Relaxed)
        );
    }
    let gauge = |out: &mut String, name: &str, help: &str, value: usize| {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    };
    gauge(
        &mut out,
        "dst_sessions",
        "Sessions, connected or lingering.",
        gauges.sessions,
    );
    gauge(
        &mut out,
        "dst_sessions_connected",
        "Sessions with a connection now.",
        gauges.sessions_connected,
    );
    gauge(
        &mut out,
        "dst_connections",
        "Authenticated connections.",
        gauges.connections,
    );
    gauge(
        &mut out,
        "dst_handshakes",
        "Connections still in the handshake.",
        gauges.handshakes,
    );
    gauge(
        &mut out,
        "dst_memory_budget_used_bytes",
        "Bytes of the memory budget held, reserves included.",
        gauges.budget_in_use,
    );
    gauge(
        &mut out,
        "dst_memory_budget_bytes",
        "The memory budget (--memory-budget).",
        gauges.budget_total,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            sessions: 3,
            sessions_connected: 2,
            connections: 2,
            handshakes: 1,
            budget_in_use: 4096,
            budget_total: 1 << 20,
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    #[test]
    fn requests_count_by_kind_with_bytes_errors_and_latency() {
        let e = ExportCounters::default();
        e.record(Op::Write, 0, 4096, Duration::from_micros(80));
        e.record(Op::Write, 0, 4096, Duration::from_millis(3));
        e.record(Op::Read, libc::EIO as u32, 4096, Duration::from_micros(10));
        assert_eq!(e.moved(), (0, 8192));
        let m = Metrics::default();
        let views = [ExportView {
            name: "disk",
            counters: &e,
            corrupt_blocks: Some(1),
        }];
        let text = render(&views, &m, &gauges());
        assert!(text.contains("dst_requests_total{export=\"disk\",op=\"write\"} 2\n"));
        assert!(text.contains("dst_request_errors_total{export=\"disk\",op=\"read\"} 1\n"));
        assert!(text.contains("dst_request_bytes_total{export=\"disk\",op=\"write\"} 8192\n"));
        assert!(text.contains("dst_errors_by_errno_total{export=\"disk\",errno=\"5\"} 1\n"));
        // Cumulative buckets: 80 µs is in le=0.0001, 3 ms in le=0.005.
        let write = "dst_request_duration_seconds_bucket{export=\"disk\",op=\"write\"";
        assert!(
            text.contains(&format!("{write},le=\"0.00005\"}} 0\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{write},le=\"0.0001\"}} 1\n")));
        assert!(text.contains(&format!("{write},le=\"0.0025\"}} 1\n")));
        assert!(text.contains(&format!("{write},le=\"0.005\"}} 2\n")));
        assert!(text.contains(&format!("{write},le=\"+Inf\"}} 2\n")));
        assert_eq!(
            line(
                &text,
                "dst_request_duration_seconds_count{export=\"disk\",op=\"write\"}"
            ),
            "dst_request_duration_seconds_count{export=\"disk\",op=\"write\"} 2"
        );
        assert!(text.contains("dst_checksum_corrupt_blocks{export=\"disk\"} 1\n"));
        assert!(text.contains("dst_sessions_connected 2\n"));
    }

    #[test]
    fn clients_are_named_by_comment_and_fingerprint_never_by_key() {
        let key = crate::keys::generate().public();
        let m = Metrics::default();
        let c = m.client(&key, "backup \"host\"\nb");
        c.record(Op::Read, 0, 512);
        c.record(Op::Write, 0, 1024);
        c.record(Op::Write, libc::ENOSPC as u32, 1024);
        assert!(Arc::ptr_eq(&c, &m.client(&key, "other")), "one entry a key");
        m.refused(Kind::Rate);
        let text = render(&[], &m, &gauges());
        let labels = format!(
            "client=\"backup \\\"host\\\"\\nb\",key=\"{}\"",
            fingerprint(&key)
        );
        assert!(
            text.contains(&format!("dst_client_requests_total{{{labels}}} 3\n")),
            "{text}"
        );
        assert!(text.contains(&format!("dst_client_read_bytes_total{{{labels}}} 512\n")));
        assert!(text.contains(&format!(
            "dst_client_written_bytes_total{{{labels}}} 1024\n"
        )));
        assert!(text.contains(&format!("dst_client_errors_total{{{labels}}} 1\n")));
        assert!(text.contains("dst_refusals_total{reason=\"rate\"} 1\n"));
        assert!(
            !text.contains(&key.to_string()),
            "the key itself is in the text"
        );
    }
}
