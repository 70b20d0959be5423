//! dst-server against real clients on 127.0.0.1: data round trips checked against the
//! image on disk, refusals, hostile connections, and the reply cache.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{allocated_blocks, connect, file_bytes, pattern, round_trip, Setup};
use dst::channel::{ChannelError, Refusal};
use dst::cipher::Cipher;
use dst::client::{ClientError, Connection};
use dst::protocol::{Access, Op, RequestHeader};

const MIB: u64 = 1 << 20;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(f)
}

#[test]
fn writes_reach_the_image_and_read_back() {
    let s = Setup::new();
    let server = s.disk("64M", &[]);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    assert_eq!(c.info().size, 64 * MIB);
    assert_eq!(c.info().export, "disk");
    assert!(!c.info().resumed);

    let writes = [
        (0u64, 4096usize),
        (5 * MIB + 17, 1000),
        (63 * MIB, MIB as usize),
        (8 * MIB, 300_000),
    ];
    block_on(async {
        for (i, (off, len)) in writes.iter().enumerate() {
            c.write(*off, &pattern(*len, i as u64), i % 2 == 0)
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
        for (i, (off, len)) in writes.iter().enumerate() {
            assert_eq!(
                c.read(*off, *len as u32).await.unwrap(),
                pattern(*len, i as u64),
                "read back #{i}"
            );
        }
    });
    for (i, (off, len)) in writes.iter().enumerate() {
        assert_eq!(
            file_bytes(&s.path("disk.img"), *off, *len),
            pattern(*len, i as u64),
            "image #{i}"
        );
    }
}

#[test]
fn trim_punches_a_hole_and_write_zeroes_reads_zero() {
    let s = Setup::new();
    let server = s.disk("64M", &[]);
    let img = s.path("disk.img");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        for i in 0..8u64 {
            c.write(i * MIB, &pattern(MIB as usize, i), false)
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
        let full = allocated_blocks(&img);
        assert!(full >= 8 * MIB / 512, "image holds the data: {full} blocks");

        c.trim(0, 4 * MIB as u32).await.unwrap();
        c.flush().await.unwrap();
        let trimmed = allocated_blocks(&img);
        assert!(
            trimmed <= full - 4 * MIB / 512,
            "trim freed space: {full} -> {trimmed} blocks"
        );
        assert_eq!(c.read(MIB, 4096).await.unwrap(), vec![0; 4096]);

        c.write_zeroes(5 * MIB, MIB as u32).await.unwrap();
        assert_eq!(
            c.read(5 * MIB, MIB as u32).await.unwrap(),
            vec![0; MIB as usize]
        );
        assert_eq!(
            c.read(6 * MIB, 4096).await.unwrap(),
            pattern(MIB as usize, 6)[..4096]
        );
    });
}

fn status(r: Result<impl std::fmt::Debug, ClientError>) -> u32 {
    match r {
        Err(ClientError::Status(e)) => e,
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[test]
fn requests_outside_the_export_are_refused_without_io() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        assert_eq!(status(c.read(MIB, 1).await), libc::EINVAL as u32);
        assert_eq!(
            status(c.write(MIB - 10, &[1; 20], false).await),
            libc::EINVAL as u32
        );
        assert_eq!(
            status(c.trim(u64::MAX - 10, 4096).await),
            libc::EINVAL as u32
        );
        // The connection still serves after refusals.
        c.write(MIB - 10, &[1; 10], false).await.unwrap();
    });
    assert_eq!(
        std::fs::metadata(s.path("disk.img")).unwrap().len(),
        MIB,
        "image did not grow"
    );
}

#[test]
fn read_only_exports_and_keys_refuse_writes() {
    let s = Setup::new();
    std::fs::write(s.path("ro.img"), vec![7u8; 8192]).unwrap();
    let server = s.server(&[
        "--export",
        "ro=ro.img:ro",
        "--export",
        "rw=rw.img",
        "--create-size",
        "1M",
    ]);

    let err = block_on(Connection::connect(
        &s.client(&server, "ro", Access::ReadWrite),
        None,
    ))
    .err()
    .unwrap();
    assert_eq!(err.errno(), libc::EROFS);
    assert!(err.to_string().contains("read-only on the server"), "{err}");

    let mut c = connect(&s.client(&server, "ro", Access::ReadOnly));
    block_on(async {
        assert_eq!(c.read(0, 8192).await.unwrap(), vec![7u8; 8192]);
        assert_eq!(
            status(c.write(0, &[1; 512], false).await),
            libc::EROFS as u32
        );
        assert_eq!(status(c.trim(0, 512).await), libc::EROFS as u32);
    });
    assert_eq!(std::fs::read(s.path("ro.img")).unwrap(), vec![7u8; 8192]);

    // A key marked ro may not open even a writable export read-write.
    s.authorize(&format!("{} ro\n", s.client_key.public()));
    let server = s.server(&["--export", "rw=rw.img"]);
    let err = block_on(Connection::connect(
        &s.client(&server, "rw", Access::ReadWrite),
        None,
    ))
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .contains("read-only (ro) in authorized_keys"),
        "{err}"
    );
    connect(&s.client(&server, "rw", Access::ReadOnly));
}

#[test]
fn exports_outside_a_keys_list_are_refused() {
    let s = Setup::new();
    s.authorize(&format!("{} exports=a\n", s.client_key.public()));
    let server = s.exports(&["a", "b"], "1M", &[]);
    connect(&s.client(&server, "a", Access::ReadWrite));
    let err = block_on(Connection::connect(
        &s.client(&server, "b", Access::ReadWrite),
        None,
    ))
    .err()
    .unwrap();
    assert_eq!(err.errno(), libc::EACCES, "{err}");
    assert!(err.to_string().contains("may not open export 'b'"), "{err}");
    // An export that does not exist is refused the same way: the key learns nothing of
    // what the server exports beyond its own list.
    let err = block_on(Connection::connect(
        &s.client(&server, "nope", Access::ReadWrite),
        None,
    ))
    .err()
    .unwrap();
    assert_eq!(err.errno(), libc::EACCES, "{err}");
    assert!(
        err.to_string().contains("may not open export 'nope'"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("a.img") && !err.to_string().contains(" a,"),
        "{err}"
    );
}

fn refusal(err: ClientError) -> (Refusal, String) {
    match err {
        ClientError::Channel(ChannelError::Refused(r, why)) => (r, why),
        other => panic!("expected a handshake refusal, got {other}"),
    }
}

#[test]
fn wrong_keys_and_ciphers_are_refused_with_their_own_message() {
    let s = Setup::new();
    let server = s.disk("1M", &["--cipher", "chachapoly"]);

    let mut wrong_pin = s.client(&server, "disk", Access::ReadWrite);
    wrong_pin.server_key = dst::keys::generate().public();
    let (r, why) = refusal(
        block_on(Connection::connect(&wrong_pin, None))
            .err()
            .unwrap(),
    );
    assert_eq!(r, Refusal::ServerKey);
    assert!(why.contains("fix the client's --server-key"), "{why}");

    let mut stranger = s.client(&server, "disk", Access::ReadWrite);
    stranger.key = dst::keys::generate();
    let (r, why) = refusal(
        block_on(Connection::connect(&stranger, None))
            .err()
            .unwrap(),
    );
    assert_eq!(r, Refusal::ClientKey);
    assert!(
        why.contains(&stranger.key.public().to_string()) && why.contains("authorized keys"),
        "{why}"
    );

    let mut aes = s.client(&server, "disk", Access::ReadWrite);
    aes.cipher = Cipher::AesGcm;
    let (r, why) = refusal(block_on(Connection::connect(&aes, None)).err().unwrap());
    assert_eq!(r, Refusal::Cipher);
    assert!(
        why.contains("aesgcm is not accepted") && why.contains("chachapoly"),
        "{why}"
    );

    // None of that disturbed the server.
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(c.ping()).unwrap();
}

/// An authorized_keys line with the all-zero key, which would let anyone in without a key.
fn zero_key_line() -> String {
    format!(
        "{} exports=disk # pasted by mistake\n",
        dst::keys::PublicKey([0; 32])
    )
}

#[test]
fn a_weak_key_in_authorized_keys_stops_the_server_naming_the_line() {
    let s = Setup::new();
    s.authorize(&format!(
        "# clients\n{}\n{}",
        s.client_key.public(),
        zero_key_line()
    ));
    let (status, stderr) = s.refused_start(&["--export", "disk=disk.img", "--create-size", "1M"]);
    assert!(!status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("authorized_keys: line 3: ")
            && stderr.contains("is a low-order (weak) key that would let anyone in; remove it"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
}

#[test]
fn a_sighup_reload_with_a_weak_key_keeps_the_old_list() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    // The new list would drop our key and add the all-zero one.
    s.authorize(&zero_key_line());
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    server.wait_for_log("SIGHUP: keeping the old authorized keys");
    assert!(
        server.log().contains("line 1: ") && server.log().contains("low-order (weak) key"),
        "{}",
        server.log()
    );
    block_on(connect(&cfg).ping()).unwrap();
}

#[test]
fn aesgcm_works_when_both_sides_allow_it() {
    let s = Setup::new();
    let server = s.disk("4M", &[]);
    let mut cfg = s.client(&server, "disk", Access::ReadWrite);
    cfg.cipher = Cipher::AesGcm;
    let mut c = connect(&cfg);
    round_trip(&mut c, 4096, 200_000, 3, false);
}

/// A congestion control that is there is used; one that is not stops the side that asked
/// for it, saying where to look.
#[test]
fn congestion_controls_are_used_or_refused_with_where_to_look() {
    let s = Setup::new();
    let (status, err) = s.refused_start(&[
        "--export",
        "disk=disk.img",
        "--create-size",
        "1M",
        "--congestion-control",
        "nosuchcc",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("'nosuchcc'") && err.contains("tcp_available_congestion_control"),
        "{err}"
    );
    assert!(
        !s.path("disk.img").exists(),
        "a refused start created the image"
    );

    // reno is in every kernel with TCP, allowed to every process.
    let server = s.disk("1M", &["--congestion-control", "reno"]);
    let mut cfg = s.client(&server, "disk", Access::ReadWrite);
    cfg.congestion = "nosuchcc".parse().unwrap();
    let err = block_on(Connection::connect(&cfg, None)).err().unwrap();
    assert!(
        err.to_string().contains("tcp_available_congestion_control"),
        "{err}"
    );
    cfg.congestion = "reno".parse().unwrap();
    let mut c = connect(&cfg);
    round_trip(&mut c, 0, 300_000, 5, false);
}

#[test]
fn garbage_and_stalled_peers_do_not_stop_service() {
    let s = Setup::new();
    let server = s.disk("4M", &["--handshake-timeout", "1s"]);

    // Random bytes, a preamble with garbage after it, and a half-sent handshake left hanging.
    let mut garbage = TcpStream::connect(server.addr).unwrap();
    let _ = garbage.write_all(&pattern(10_000, 1));
    let mut bad_hs = TcpStream::connect(server.addr).unwrap();
    let _ = bad_hs.write_all(b"DST\x02\x01\0\0\0\xff\xff");
    let _ = bad_hs.write_all(&pattern(65535, 2));
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled.write_all(b"DST\x02\x01\0\0\0\x00\x60").unwrap();

    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    round_trip(&mut c, 0, 65536, 9, true);

    // The stalled peer is cut off by the handshake timeout.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        stalled.read(&mut buf).unwrap_or(0),
        0,
        "stalled connection closed"
    );
    server.wait_for_log("did not finish the handshake");
}

#[test]
fn malformed_frames_close_only_that_connection() {
    let s = Setup::new();
    let server = s.disk("4M", &["--max-transfer", "64K"]);
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    let mut good = connect(&cfg);
    let mut bad = connect(&cfg);
    assert_eq!(bad.info().max_transfer, 64 << 10);
    block_on(async {
        // A read over the negotiated maximum transfer is a protocol violation.
        let h = RequestHeader {
            op: Op::Read,
            flags: 0,
            txid: 1,
            floor: 1,
            offset: 0,
            length: 1 << 20,
        };
        bad.send(&h, &[]).await.unwrap();
        assert!(bad.recv().await.is_err(), "connection closed");
        good.ping().await.unwrap();
        assert_eq!(good.read(0, 4096).await.unwrap(), vec![0; 4096]);
    });
    server.wait_for_log("over the negotiated maximum transfer");
}

#[test]
fn one_read_write_session_per_export() {
    let s = Setup::new();
    let other_key = s.second_key();
    let server = s.disk("1M", &[]);
    let _first = connect(&s.client(&server, "disk", Access::ReadWrite));

    let mut other = s.client(&server, "disk", Access::ReadWrite);
    other.key = other_key;
    let err = block_on(Connection::connect(&other, None)).err().unwrap();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    assert!(err.to_string().contains("already open read-write"), "{err}");
    let holder = s.client_key.public().to_string();
    assert!(
        !err.to_string().contains(&holder),
        "names the holder: {err}"
    );

    // Read-only sessions alongside are fine.
    other.access = Access::ReadOnly;
    block_on(connect(&other).ping()).unwrap();

    // The same key asking again while its session is connected is refused too.
    let err = block_on(Connection::connect(
        &s.client(&server, "disk", Access::ReadWrite),
        None,
    ))
    .err()
    .unwrap();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
}

#[test]
fn resent_writes_are_answered_not_executed_again() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let cfg = s.client(&server, "disk", Access::ReadWrite);
    let mut c = connect(&cfg);
    let (old, new) = (pattern(4096, 1), pattern(4096, 2));
    let (first, second, read) = (c.next_txid(), c.next_txid(), c.next_txid());
    // Every request keeps the floor at `first`: the client still waits for it.
    let write = |txid| RequestHeader {
        op: Op::Write,
        flags: 0,
        txid,
        floor: first,
        offset: 8192,
        length: 4096,
    };
    let read_back = RequestHeader {
        op: Op::Read,
        flags: 0,
        txid: read,
        floor: first,
        offset: 8192,
        length: 4096,
    };
    block_on(async {
        c.send(&write(first), &old).await.unwrap();
        assert_eq!(c.recv().await.unwrap().0.status, 0);
        c.send(&write(second), &new).await.unwrap();
        assert_eq!(c.recv().await.unwrap().0.status, 0);
        // A late duplicate of the first write is answered from the cache.
        c.send(&write(first), &old).await.unwrap();
        let (reply, _) = c.recv().await.unwrap();
        assert_eq!((reply.txid, reply.status), (first, 0));
        c.send(&read_back, &[]).await.unwrap();
        assert_eq!(c.recv().await.unwrap().1, new);
    });

    // The same after a reconnect that resumes the session.
    let session = c.info().session;
    drop(c);
    let mut c = block_on(Connection::connect(&cfg, Some(session))).unwrap();
    assert!(c.info().resumed, "session resumed");
    block_on(async {
        c.send(&write(first), &old).await.unwrap();
        assert_eq!(c.recv().await.unwrap().0.txid, first);
        c.send(&read_back, &[]).await.unwrap();
        assert_eq!(c.recv().await.unwrap().1, new);
    });
    assert_eq!(file_bytes(&s.path("disk.img"), 8192, 4096), new);
}

#[test]
fn sigterm_finishes_and_syncs() {
    let s = Setup::new();
    let mut server = s.disk("8M", &[]);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(c.write(0, &pattern(MIB as usize, 5), false)).unwrap();
    let status = server.stop(libc::SIGTERM);
    assert!(status.success(), "exit status {status}: {}", server.log());
    server.wait_for_log("all exports synced");
    assert_eq!(
        file_bytes(&s.path("disk.img"), 0, MIB as usize),
        pattern(MIB as usize, 5)
    );
}

#[test]
fn a_disconnected_writer_is_released_after_the_linger_time() {
    let s = Setup::new();
    let other_key = s.second_key();
    let server = s.disk("1M", &["--session-linger", "1s"]);
    let mine = s.client(&server, "disk", Access::ReadWrite);
    drop(connect(&mine));
    server.wait_for_closes(1);

    // The same client, restarted (it lost its session id), takes over at once.
    drop(connect(&mine));
    server.wait_for_closes(2);

    let mut other = mine.clone();
    other.key = other_key;
    let err = block_on(Connection::connect(&other, None)).err().unwrap();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    assert!(err.to_string().contains("disconnected"), "{err}");
    server.wait_for_lines(&["session of client", " expired;"], 1);
    connect(&other);
}

#[test]
fn created_images_and_checksum_tables_are_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let server = s.server(&[
        "--export",
        "disk=disk.img",
        "--export",
        "sums=sums.img:checksums",
        "--create-size",
        "1M",
    ]);
    server.wait_for_log("checksums on");
    for name in ["disk.img", "sums.img", "sums.img.dst-sum"] {
        let mode = std::fs::metadata(s.path(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {:o}\n{}", mode, server.log());
    }
}

#[test]
fn the_server_cannot_dump_core() {
    let s = Setup::new();
    let server = s.disk("1M", &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let values: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "{core}");
    // A non-dumpable process's /proc entries belong to root, which only shows when the tests
    // run as another user (PR_GET_DUMPABLE itself is checked by dst::process's unit test).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::MetadataExt;
        let fd_dir = std::fs::metadata(format!("/proc/{}/fd", server.pid())).unwrap();
        assert_eq!(fd_dir.uid(), 0, "dst-server is still dumpable");
    }
    // What tests read of a server's /proc stays readable.
    assert!(common::rss_kib(server.pid()) > 0);
}
