//! `dst-server status`: a running server's metrics (its `--metrics` endpoint), summed up
//! for people: sessions and connections, the memory budget, refusals, then each export's
//! requests by kind (count, bytes, errors, p99) and each client key's traffic.
//!
//! The summary reads the exposition text that `metrics` writes, so it is pure and tested
//! without a server; `fetch` is the one HTTP GET.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::units::human_bytes;

/// One sample: its name, labels in order, and value.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses `name{k="v",...} value`; `None` for comments and lines it cannot read.
fn parse_line(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some(Sample {
            name: head.to_owned(),
            labels: Vec::new(),
            value,
        });
    };
    let mut labels = Vec::new();
    let mut chars = rest.chars();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), v));
        match chars.next()? {
            ',' => continue,
            '}' => break,
            _ => return None,
        }
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The smallest bucket bound that holds `q` of the observations, in seconds.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

/// The summary of a scrape's text, for people.
pub fn summarise(source: &str, text: &str) -> String {
    let samples: Vec<Sample> = text.lines().filter_map(parse_line).collect();
    let one = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map_or(0.0, |s| s.value)
    };
    let mut out = format!("dst-server at {source}\n");
    out += &format!(
        "  sessions     {} ({} connected)\n  connections  {} ({} in the handshake)\n",
        one("dst_sessions"),
        one("dst_sessions_connected"),
        one("dst_connections"),
        one("dst_handshakes")
    );
    out += &format!(
        "  memory       {} of {}\n",
        human_bytes(one("dst_memory_budget_used_bytes") as u64),
        human_bytes(one("dst_memory_budget_bytes") as u64)
    );
    let refusals: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "dst_refusals_total" && s.value > 0.0)
        .map(|s| format!("{} {}", s.label("reason"), s.value))
        .collect();
    out += &format!(
        "  refusals     {}\n",
        if refusals.is_empty() {
            "none".to_owned()
        } else {
            refusals.join(", ")
        }
    );

    // By export, then by op: requests, errors, bytes, latency buckets.
    #[derive(Default)]
    struct Op {
        requests: f64,
        errors: f64,
        bytes: f64,
        buckets: Vec<(f64, f64)>,
    }
    let mut exports: BTreeMap<&str, BTreeMap<&str, Op>> = BTreeMap::new();
    let mut corrupt: BTreeMap<&str, f64> = BTreeMap::new();
    for s in &samples {
        let export = s.label("export");
        if s.name == "dst_checksum_corrupt_blocks" {
            corrupt.insert(export, s.value);
            continue;
        }
        let kind = match s.name.as_str() {
            "dst_requests_total" => 0,
            "dst_request_errors_total" => 1,
            "dst_request_bytes_total" => 2,
            "dst_request_duration_seconds_bucket" => 3,
            _ => continue,
        };
        let op = exports
            .entry(export)
            .or_default()
            .entry(s.label("op"))
            .or_default();
        match kind {
            0 => op.requests = s.value,
            1 => op.errors = s.value,
            2 => op.bytes = s.value,
            _ => {
                let le = s.label("le").parse().unwrap_or(f64::INFINITY);
                op.buckets.push((le, s.value));
            }
        }
    }
    for (export, ops) in &exports {
        out += &format!("export {export}\n");
        for (name, op) in ops.iter().filter(|(_, op)| op.requests > 0.0) {
            let p99 = quantile(&op.buckets, 0.99).map_or(String::new(), |le| {
                if le.is_finite() {
                    format!(", p99 under {:.2} ms", le * 1e3)
                } else {
                    ", p99 over 10 s".to_owned()
                }
            });
            let bytes = if op.bytes > 0.0 {
                format!(", {}", human_bytes(op.bytes as u64))
            } else {
                String::new()
            };
            out += &format!(
                "  {name:<13}{} requests{bytes}, {} errors{p99}\n",
                op.requests, op.errors
            );
        }
        if ops.values().all(|op| op.requests == 0.0) {
            out += "  no requests yet\n";
        }
        if let Some(n) = corrupt.get(export) {
            out += &format!("  checksums    {n} corrupt blocks\n");
        }
    }
    let mut clients: BTreeMap<(&str, &str), [f64; 4]> = BTreeMap::new();
    for s in &samples {
        let i = match s.name.as_str() {
            "dst_client_requests_total" => 0,
            "dst_client_errors_total" => 1,
            "dst_client_read_bytes_total" => 2,
            "dst_client_written_bytes_total" => 3,
            _ => continue,
        };
        clients
            .entry((s.label("client"), s.label("key")))
            .or_default()[i] = s.value;
    }
    for ((comment, key), [requests, errors, read, written]) in &clients {
        let name = if comment.is_empty() {
            format!("key {key}")
        } else {
            format!("'{}' (key {key})", crate::protocol::printable(comment))
        };
        out += &format!(
            "client {name}\n  {requests} requests, {errors} errors, {} read, {} written\n",
            human_bytes(*read as u64),
            human_bytes(*written as u64)
        );
    }
    out
}

/// `GET /metrics` from a server's `--metrics` endpoint.
pub fn fetch(addr: SocketAddr) -> Result<String, String> {
    let fail = |e: std::io::Error| {
        format!(
            "cannot read the metrics at {addr}: {e}; is dst-server running with --metrics {addr}?"
        )
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(fail)?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: dst\r\nConnection: close\r\n\r\n")
        .map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(format!(
            "{addr} did not answer as a dst-server metrics endpoint: {}",
            crate::protocol::printable(response.lines().next().unwrap_or(""))
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::admission::Kind;
    use super::super::metrics::{render, ExportCounters, ExportView, Gauges, Metrics};
    use super::*;
    use crate::protocol::Op;

    #[test]
    fn a_scrape_is_summed_up_for_people() {
        let e = ExportCounters::default();
        for _ in 0..3 {
            e.record(Op::Write, 0, 4096, Duration::from_micros(80));
        }
        e.record(Op::Read, libc::EIO as u32, 4096, Duration::from_secs(20));
        let m = Metrics::default();
        let key = crate::keys::generate().public();
        m.client(&key, "backup \"host\"").record(Op::Write, 0, 4096);
        m.refused(Kind::Rate);
        let views = [ExportView {
            name: "disk",
            counters: &e,
            corrupt_blocks: Some(0),
        }];
        let gauges = Gauges {
            sessions: 3,
            sessions_connected: 2,
            connections: 2,
            handshakes: 0,
            budget_in_use: 1 << 20,
            budget_total: 256 << 20,
        };
        let out = summarise("127.0.0.1:9770", &render(&views, &m, &gauges));
        for want in [
            "dst-server at 127.0.0.1:9770\n",
            "  sessions     3 (2 connected)\n",
            "  memory       1.0 MiB of 256.0 MiB\n",
            "  refusals     rate 1\n",
            "export disk\n",
            "  read         1 requests, 1 errors, p99 over 10 s\n",
            "  write        3 requests, 12.0 KiB, 0 errors, p99 under 0.10 ms\n",
            "  checksums    0 corrupt blocks\n",
            "client 'backup \"host\"' (key ",
            "  1 requests, 0 errors, 0 B read, 4.0 KiB written\n",
        ] {
            assert!(out.contains(want), "no {want:?} in\n{out}");
        }
        assert!(
            !out.contains("flush"),
            "kinds without requests are left out:\n{out}"
        );
    }

    #[test]
    fn lines_with_escaped_labels_parse() {
        let s = parse_line(r#"m{a="x \"y\", z",b="\\n"} 2.5"#).unwrap();
        assert_eq!(s.name, "m");
        assert_eq!(s.label("a"), "x \"y\", z");
        assert_eq!(s.label("b"), "\\n");
        assert_eq!(s.value, 2.5);
        assert_eq!(parse_line("plain 7").unwrap().value, 7.0);
        for bad in ["# HELP m x", "", "m{a=x} 1", "m{a=\"x\" 1", "m nope"] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }
}
