//! `dst-server --metrics`: Prometheus text that a real parser reads, counters that move
//! as a real client reads and writes (and `dst-server status` says so for people), and an
//! endpoint that answers only `GET /metrics` and survives garbage.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{connect, pattern, ServerProcess, Setup};
use dst::protocol::Access;

/// The status code and body of one request to the endpoint.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (code, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the metrics parse as Prometheus text")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: unexpected value {other:?}"),
    }
}

/// A dst-server with one export and metrics on a free port, and that port's address.
fn with_metrics(s: &Setup) -> (ServerProcess, SocketAddr) {
    let server = s.server(&[
        "--export",
        "disk=disk.img",
        "--create-size",
        "16M",
        "--metrics",
        "127.0.0.1:0",
    ]);
    server.wait_for_log("metrics on http://");
    let addr = server
        .log()
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("the log names the metrics address");
    (server, addr)
}

#[test]
fn counters_move_as_a_client_reads_and_writes() {
    let s = Setup::new();
    s.authorize(&format!("{} # backup host\n", s.client_key.public()));
    let (server, addr) = with_metrics(&s);

    let before = scrape(addr);
    let write = [("export", "disk"), ("op", "write")];
    assert_eq!(value(&before, "dst_requests_total", &write), 0.0);
    assert_eq!(value(&before, "dst_sessions", &[]), 0.0);

    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    for i in 0..3u64 {
        smol::block_on(c.write(i * 4096, &pattern(4096, i), false)).unwrap();
    }
    smol::block_on(c.read(0, 4096)).unwrap();
    // Past the end: an error, counted by errno.
    assert!(smol::block_on(c.read(16 << 20, 4096)).is_err());
    smol::block_on(c.flush()).unwrap();

    let after = scrape(addr);
    let read = [("export", "disk"), ("op", "read")];
    assert_eq!(value(&after, "dst_requests_total", &write), 3.0);
    assert_eq!(value(&after, "dst_request_bytes_total", &write), 12288.0);
    assert_eq!(value(&after, "dst_requests_total", &read), 2.0);
    assert_eq!(value(&after, "dst_request_errors_total", &read), 1.0);
    let einval = libc::EINVAL.to_string();
    assert_eq!(
        value(
            &after,
            "dst_errors_by_errno_total",
            &[("errno", einval.as_str())]
        ),
        1.0
    );
    let flush = [("export", "disk"), ("op", "flush")];
    assert_eq!(value(&after, "dst_requests_total", &flush), 1.0);
    let client = [("client", "backup host")];
    assert_eq!(
        value(&after, "dst_client_written_bytes_total", &client),
        12288.0
    );
    assert_eq!(
        value(&after, "dst_client_read_bytes_total", &client),
        4096.0
    );
    assert_eq!(value(&after, "dst_sessions_connected", &[]), 1.0);
    assert_eq!(value(&after, "dst_connections", &[]), 1.0);
    assert!(value(&after, "dst_memory_budget_used_bytes", &[]) > 0.0);
    // dst-server status: the same, for people.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dst-server"))
        .args(["status", "--metrics", &addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "  sessions     1 (1 connected)\n",
        "  write        3 requests, 12.0 KiB, 0 errors, p99 under ",
        "client 'backup host' (key ",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dst-server"))
        .args(["status", "--metrics", &closed.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is dst-server running with --metrics"),
        "{err}"
    );
    let key = s.client_key.public().to_string();
    let (_, text) = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        !text.contains(&key),
        "the client's key itself is in the metrics"
    );
    // The latency histogram counts every write once.
    let (_, text) = http(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(
        text.contains("dst_request_duration_seconds_count{export=\"disk\",op=\"write\"} 3\n"),
        "{text}"
    );
}

#[test]
fn the_endpoint_answers_only_get_metrics_and_survives_garbage() {
    let s = Setup::new();
    let (_server, addr) = with_metrics(&s);
    assert_eq!(http(addr, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(
        http(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
        )
        .0,
        400
    );
    let huge = vec![b'a'; 64 << 10];
    let mut s1 = TcpStream::connect(addr).unwrap();
    let _ = s1.write_all(&huge);
    // A connection that sends nothing holds no one up.
    let _idle = TcpStream::connect(addr).unwrap();
    scrape(addr);
    assert_eq!(value(&scrape(addr), "dst_sessions", &[]), 0.0);
}
