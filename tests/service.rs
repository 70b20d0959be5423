//! dst under a service manager and a monitoring system: what dst-server and dst-mount
//! tell systemd through `NOTIFY_SOCKET` (a datagram socket the test binds, as systemd
//! would), dst-server's log lines when stderr is the journal (`JOURNAL_STREAM` naming that
//! stream), and a mount's counters as Prometheus text.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::{Child, Stdio};

use common::mount::DstMount;
use common::{expect, notify_socket, Setup};

#[test]
fn the_server_tells_systemd_it_is_ready_reloading_and_stopping() {
    let s = Setup::new();
    let path = s.path("notify");
    let socket = notify_socket(&path);
    let mut cmd = s.server_command(
        "127.0.0.1:0".parse().unwrap(),
        &["--export", "disk=disk.img", "--create-size", "1M"],
    );
    cmd.env("NOTIFY_SOCKET", &path);
    let mut server = common::ServerProcess::spawn(cmd);

    let ready = expect(&socket, "READY=1");
    let status = ready.iter().find(|l| l.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("listening on") && status.contains("1 exports"),
        "{status}"
    );

    common::mount::kill(server.pid(), libc::SIGHUP);
    let reloading = expect(&socket, "RELOADING=1");
    assert!(
        reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd 253 and later want the time with RELOADING: {reloading:?}"
    );
    expect(&socket, "READY=1");

    common::mount::kill(server.pid(), libc::SIGTERM);
    expect(&socket, "STOPPING=1");
    assert!(server.stop(libc::SIGTERM).success());
}

/// A dst-server whose stderr is a pipe the test made, killed by PID when dropped.
struct Piped(Child);

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn on_the_journal_lines_carry_syslog_priorities_and_no_timestamp() {
    let s = Setup::new();
    let (reader, writer) = std::io::pipe().unwrap();
    let meta = std::fs::File::from(std::os::fd::OwnedFd::from(writer.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let mut cmd = s.server_command(
        "127.0.0.1:0".parse().unwrap(),
        &["--export", "disk=disk.img", "--create-size", "1M"],
    );
    cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(writer);
    let server = Piped(cmd.spawn().unwrap());
    // Only the child holds the pipe's write end now: its exit ends the reading.
    drop(cmd);
    let mut lines = BufReader::new(reader).lines().map_while(Result::ok);
    let mut read_until = |needle: &str| {
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return seen;
            }
        }
        panic!("dst-server never logged '{needle}': {seen:?}");
    };
    for line in read_until("listening on") {
        assert!(
            line.starts_with("<6>dst"),
            "not an info line for the journal: {line}"
        );
        assert!(!line.contains("Z "), "a timestamp of its own: {line}");
    }
    // An authorized_keys that does not parse: the reload fails with an error line.
    s.authorize("this is not a key\n");
    common::mount::kill(server.0.id() as i32, libc::SIGHUP);
    let error = read_until("keeping the old authorized keys").pop().unwrap();
    assert!(
        error.starts_with("<3>dst"),
        "not an error line for the journal: {error}"
    );
}

#[test]
fn a_foreground_mount_tells_systemd_when_it_is_mounted_and_when_it_stops() {
    require!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let path = s.path("notify");
    let socket = notify_socket(&path);
    let dir = s.path("mnt");
    let env = [("NOTIFY_SOCKET", path.as_os_str())];
    let mut m = DstMount::spawn_with_env(&s, server.addr, &dir, &[], &env);
    let ready = expect(&socket, "READY=1");
    assert_eq!(
        common::mount::mounted_type(&dir).as_deref(),
        Some("fuse.dst"),
        "READY=1 came before the mount: {ready:?}"
    );
    // SIGTERM unmounts; systemd hears it is stopping.
    m.signal(libc::SIGTERM);
    expect(&socket, "STOPPING=1");
}

#[test]
fn a_mount_s_counters_as_prometheus_text() {
    require!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.file())
        .unwrap()
        .write_all_at(&common::pattern(8192, 1), 0)
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dst-mount"))
        .args([
            "--status",
            m.dir.to_str().unwrap(),
            "--format",
            "prometheus",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("the status parses as Prometheus text");
    let written = scrape
        .samples
        .iter()
        .find(|s| s.metric == "dst_mount_bytes_written_total")
        .unwrap_or_else(|| panic!("no bytes written in\n{text}"));
    assert_eq!(
        written.labels.get("mountpoint"),
        Some(m.dir.canonicalize().unwrap().to_str().unwrap())
    );
    match written.value {
        prometheus_parse::Value::Counter(v) => assert!(v >= 8192.0, "{text}"),
        ref v => panic!("bytes written is not a counter: {v:?}"),
    }
    assert!(text.contains("dst_mount_connected{"), "{text}");
    assert!(text.contains("dst_mount_latency_p99_seconds{"), "{text}");
}
