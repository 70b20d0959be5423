//! dst-server among strangers that do not finish, or never start, the handshake: idle
//! connections from many prefixes, replayed first messages, silent peers. A client with a
//! key keeps getting in, quickly; figures are printed (run with --nocapture to see them).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect, connect_from, raise_fd_limit, rss_kib, ServerProcess, Setup};
use dst::client::Connection;
use dst::protocol::Access;

/// Connects and pings from 127.0.0.1; returns how long that took.
fn timed_ping(s: &Setup, server: &ServerProcess) -> Duration {
    let start = Instant::now();
    let mut c = connect(&s.client(server, "disk", Access::ReadOnly));
    smol::block_on(c.ping()).unwrap();
    start.elapsed()
}

/// Whether the server has closed `s`, without waiting.
fn closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    match (&*s).read(&mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Seconds until the server closes `s`, at most `limit`.
fn time_to_close(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    match s.read(&mut [0u8; 64]) {
        Ok(0) => {}
        Ok(n) => panic!("the server sent {n} bytes to a silent peer"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {limit:?}: {e}"),
    }
    start.elapsed()
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn idle_connections_from_many_prefixes_do_not_lock_out_a_client() {
    raise_fd_limit();
    let s = Setup::new();
    // Deadlines long enough that only the handshake table protects the client.
    let server = s.disk(
        "1M",
        &[
            "--first-flight-timeout",
            "60s",
            "--handshake-timeout",
            "60s",
        ],
    );
    let start = Instant::now();
    let idle: Vec<TcpStream> = (1..=64)
        .flat_map(|n| (0..16).map(move |_| format!("127.{n}.0.2")))
        .map(|from| connect_from(&from, server.addr))
        .collect();
    eprintln!(
        "opened {} idle connections from 64 /24s in {:.0?}",
        idle.len(),
        start.elapsed()
    );
    let took = timed_ping(&s, &server);
    eprintln!("connect + ping with 1024 idle connections held: {took:.1?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Evictions are summarised, not logged one by one.
    server.wait_for_log("more handshakes dropped since the last line");
    let log = server.log();
    let lines = lines_with(&log, "handshake dropped") + lines_with(&log, "handshakes dropped");
    let dropped = idle.iter().filter(|c| closed(c)).count();
    eprintln!("{dropped} idle connections closed by the server, in {lines} log lines");
    assert!(dropped >= 1024 - 128, "{dropped} closed");
    assert!(lines <= 4, "{lines} lines about dropped handshakes:\n{log}");
    let rss = rss_kib(server.pid());
    eprintln!("server VmRSS with 1024 idle connections: {} KiB", rss);
    assert!(rss < 128 * 1024, "server resident memory {rss} KiB");
}

/// What a real client sends first, recorded by a listener that answers nothing.
fn record_first_flight(mut cfg: dst::client::ClientConfig) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.server = listener.local_addr().unwrap().to_string();
    let client = std::thread::spawn(move || {
        let _ = smol::block_on(Connection::connect(&cfg, None));
    });
    let (mut conn, _) = listener.accept().unwrap();
    let mut flight = vec![0u8; 10];
    conn.read_exact(&mut flight).unwrap();
    let len = u16::from_be_bytes([flight[8], flight[9]]) as usize;
    flight.resize(10 + len, 0);
    conn.read_exact(&mut flight[10..]).unwrap();
    drop(conn);
    client.join().unwrap();
    flight
}

#[test]
fn a_replayed_first_message_flood_from_one_prefix_is_cut_by_its_bucket() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let flight = record_first_flight(s.client(&server, "disk", Access::ReadOnly));
    let quiet = timed_ping(&s, &server);

    let addr: SocketAddr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut attempts = 0u64;
        while !flooding.load(Ordering::Relaxed) {
            let mut c = connect_from("127.9.0.2", addr);
            let _ = c.write_all(&flight);
            attempts += 1;
        }
        attempts
    });
    std::thread::sleep(Duration::from_millis(500));
    let during = timed_ping(&s, &server);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let attempts = flood.join().unwrap();
    server.wait_for_log("more connections refused since the last line");

    let log = server.log();
    let lines = lines_with(&log, "127.9.0.2");
    eprintln!(
        "connect + ping: {quiet:.1?} quiet, {during:.1?} during a flood of {attempts} replayed \
         first messages in 2s from 127.9.0.0/24; {lines} log lines about the flood"
    );
    assert!(during < Duration::from_secs(1), "{during:?}");
    assert!(
        attempts > 200,
        "only {attempts} attempts: no flood to speak of"
    );
    // The burst, the rate for 2 s and a few summaries at the most.
    assert!(
        lines < 10,
        "{lines} lines for {attempts} attempts:\n{}",
        log.lines()
            .filter(|l| l.contains("127.9.0.2"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The server's answer to a replay of `flight`: its code and message 2.
fn answer_to_replay(server: &ServerProcess, flight: &[u8]) -> Vec<u8> {
    let mut c = connect_from("127.5.0.2", server.addr);
    c.write_all(flight).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = vec![0u8; 3];
    c.read_exact(&mut answer).unwrap();
    let len = u16::from_be_bytes([answer[1], answer[2]]) as usize;
    answer.resize(3 + len, 0);
    c.read_exact(&mut answer[3..]).unwrap();
    answer
}

#[test]
fn a_replayed_first_message_does_not_tell_whether_its_client_is_allowed() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let allowed = record_first_flight(s.client(&server, "disk", Access::ReadOnly));
    let mut stranger = s.client(&server, "disk", Access::ReadOnly);
    stranger.key = dst::keys::generate();
    let refused = record_first_flight(stranger);
    let (a, r) = (
        answer_to_replay(&server, &allowed),
        answer_to_replay(&server, &refused),
    );
    eprintln!(
        "answers to replays: {} bytes (allowed client), {} bytes (stranger)",
        a.len(),
        r.len()
    );
    // Both look like acceptances: code 0 and a message 2 of the same length.
    assert_eq!((a[0], a.len()), (r[0], r.len()));
    assert_eq!(a[0], 0);
}

#[test]
fn connections_that_send_nothing_are_closed_after_the_first_flight_deadline() {
    let s = Setup::new();
    // A handshake timeout far beyond the first-flight deadline, which alone closes these.
    let server = s.disk("1M", &["--handshake-timeout", "60s"]);
    let mut silent = connect_from("127.3.0.2", server.addr);
    let mut partial = connect_from("127.3.0.2", server.addr);
    partial.write_all(b"DST\x02\x01\0\0\0\x00\x60").unwrap();
    let silent_closed = time_to_close(&mut silent, Duration::from_secs(10));
    let partial_closed = time_to_close(&mut partial, Duration::from_secs(10));
    eprintln!(
        "closed after {silent_closed:.1?} (nothing sent), {partial_closed:.1?} (a partial first \
         flight); --first-flight-timeout 2s"
    );
    assert!(
        silent_closed > Duration::from_millis(500),
        "{silent_closed:?}"
    );
    server.wait_for_log("sent no first handshake message within 2s");
}

#[test]
fn max_connections_counts_only_authenticated_connections() {
    let s = Setup::new();
    let server = s.disk(
        "1M",
        &["--max-connections", "2", "--first-flight-timeout", "60s"],
    );
    // Idle strangers, more than --max-connections, do not take the clients' places.
    let _idle: Vec<TcpStream> = (0..8)
        .map(|_| connect_from("127.4.0.2", server.addr))
        .collect();
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    let _a = connect(&cfg);
    let _b = connect(&cfg);
    let err = smol::block_on(Connection::connect(&cfg, None))
        .err()
        .unwrap();
    assert_eq!(err.errno(), libc::EUSERS, "{err}");
    assert!(err.to_string().contains("--max-connections"), "{err}");
    // Once the server has seen one go, another may come.
    let closes = server.closes();
    drop(_a);
    server.wait_for_closes(closes + 1);
    connect(&cfg);
}
