//! The client engine against a real dst-server on 127.0.0.1: concurrent verified
//! workloads, a server killed and restarted, stalls, the window, exactly-once.

mod common;

use std::time::{Duration, Instant};

use common::mount::wait_until;
use common::proxy::{Direction, Fault, Proxy};
use common::workload::{finish, patient, patient_engine, spawn, Workload};
use common::{file_bytes, pattern, Setup};
use dst::client::engine::{Engine, EngineConfig};
use dst::client::ClientConfig;
use dst::protocol::{Access, Op, RequestHeader};

const BLOCK: usize = 64 << 10;

/// `writers` tasks on their own 64 KiB blocks, back to back.
fn workload(writers: u64, blocks_each: u64, rounds: u64, salt: u64) -> Workload {
    Workload {
        salt,
        ..Workload::new(writers, blocks_each, rounds, BLOCK)
    }
}

/// A resend every 200 ms, `resends` times, so that a request fails after about
/// (resends + 1) * 200 ms of silence.
fn impatient(client: ClientConfig, resends: u32, ping: Duration) -> EngineConfig {
    EngineConfig {
        resend_timeout: Duration::from_millis(200),
        resend_count: resends,
        ping_interval: ping,
        ..EngineConfig::new(client)
    }
}

/// A 4 KiB write of `pattern(4096, seed)`, and how long it took to answer.
fn timed_write(engine: &Engine, offset: u64, seed: u64) -> (Result<(), i32>, Duration) {
    let start = Instant::now();
    let r = smol::block_on(engine.write(offset, &pattern(4096, seed), false));
    (r, start.elapsed())
}

#[test]
fn concurrent_workload_lands_on_the_image() {
    let s = Setup::new();
    let server = s.disk("64M", &[]);
    let engine = patient_engine(s.client(&server, "disk", Access::ReadWrite));
    let model = finish(&engine, spawn(&engine, workload(8, 8, 4, 1)));
    model.check(&s.path("disk.img"));
    let stats = engine.stats();
    assert_eq!(stats.failures, 0);
    assert_eq!(stats.in_flight, 0);
    assert!(stats.requests >= 8 * 8 * 4 * 2, "{stats}");
    assert_eq!(stats.bytes_written, (8 * 8 * 4 * BLOCK) as u64);
}

#[test]
fn server_killed_and_restarted_mid_workload_loses_nothing() {
    let s = Setup::new();
    let args = ["--export", "disk=disk.img", "--create-size", "64M"];
    let mut server = s.server(&args);
    let addr = server.addr;
    let engine = patient_engine(s.client(&server, "disk", Access::ReadWrite));
    let run = spawn(&engine, workload(4, 8, 30, 2));
    // Once the workload is under way, the server is killed without warning, and restarted
    // once the engine has seen it go.
    wait_until("writes to be acked", Duration::from_secs(20), || {
        engine.stats().bytes_written >= 4 << 20
    });
    server.stop(libc::SIGKILL);
    wait_until(
        "the engine to see the server go",
        Duration::from_secs(20),
        || !engine.stats().connected,
    );
    let _server = s.server_at(addr, &args);
    let model = finish(&engine, run);
    model.check(&s.path("disk.img"));
    let stats = engine.stats();
    assert!(stats.reconnects >= 1, "{stats}");
    assert_eq!(stats.failures, 0, "{stats}");
}

#[test]
fn stalls_shorter_than_the_resend_budget_never_error_longer_ones_fail_with_eio() {
    let s = Setup::new();
    let server = s.disk("16M", &[]);
    let cfg = impatient(
        s.client(&server, "disk", Access::ReadWrite),
        5, // about 1.2 s in all
        Duration::from_secs(30),
    );
    let engine = smol::block_on(Engine::start(cfg)).unwrap();
    let pause = |d: Duration| {
        common::stop_process(server.pid());
        let resume = server.pid();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            // SAFETY: a signal to the PID of our own child.
            unsafe { libc::kill(resume, libc::SIGCONT) };
        })
    };

    let t = pause(Duration::from_millis(500));
    smol::block_on(engine.write(0, &pattern(4096, 1), false)).expect("a short stall is ridden out");
    t.join().unwrap();
    assert!(engine.stats().resends >= 1, "{}", engine.stats());

    let t = pause(Duration::from_secs(4));
    let (r, took) = timed_write(&engine, 4096, 2);
    assert_eq!(r, Err(libc::EIO));
    assert!(
        took < Duration::from_secs(4),
        "failed once the resends ran out"
    );
    t.join().unwrap();
    // Service resumes after the stall.
    smol::block_on(engine.write(8192, &pattern(4096, 3), false)).unwrap();
    assert!(engine.stats().failures >= 1);
    smol::block_on(engine.close());
}

#[test]
fn in_flight_bytes_never_exceed_the_window() {
    let s = Setup::new();
    let server = s.disk("64M", &[]);
    // Replies held back, so that the writers outpace them and fill the window.
    let proxy = Proxy::start(server.addr);
    proxy.set_fault(Fault::Delay(Duration::from_millis(10)));
    let client = proxy.route(s.client(&server, "disk", Access::ReadWrite));
    let mut cfg = patient(client);
    cfg.window_requests = 8;
    cfg.window_bytes = 1 << 20;
    let engine = smol::block_on(Engine::start(cfg)).unwrap();
    // Far more than the window at once: 256 writes of 256 KiB (64 MiB).
    let tasks: Vec<_> = (0..256u64)
        .map(|i| {
            let engine = engine.clone();
            smol::spawn(async move {
                engine
                    .write(i * (256 << 10), &pattern(256 << 10, i), false)
                    .await
            })
        })
        .collect();
    smol::block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
        engine.close().await;
    });
    let stats = engine.stats();
    assert!(stats.max_in_flight_bytes <= 1 << 20, "{stats}");
    assert!(
        stats.max_in_flight_bytes >= 512 << 10,
        "the window was used: {stats}"
    );
    assert_eq!(stats.bytes_written, 64 << 20);
}

/// The path dst-mount takes: requests started from one thread, completions called back
/// from the engine's threads, past a full window.
#[test]
fn started_requests_complete_exactly_once_each_past_a_full_window() {
    const N: u64 = 64;
    const LEN: usize = 64 << 10;
    let s = Setup::new();
    let server = s.disk("16M", &[]);
    // Replies held back, so that most requests find the window full and wait for room.
    let proxy = Proxy::start(server.addr);
    proxy.set_fault(Fault::Delay(Duration::from_millis(5)));
    let client = proxy.route(s.client(&server, "disk", Access::ReadWrite));
    let mut cfg = patient(client);
    cfg.window_requests = 4;
    let engine = smol::block_on(Engine::start(cfg)).unwrap();
    let (done, results) = std::sync::mpsc::channel();
    let collect = |n: u64| -> Vec<(u64, Result<Vec<u8>, i32>)> {
        let mut got: Vec<_> = (0..n)
            .map(|_| results.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        got.sort_by_key(|(i, _)| *i);
        got
    };
    for i in 0..N {
        let done = done.clone();
        engine.start_write(i * LEN as u64, &pattern(LEN, i), false, move |r| {
            done.send((i, r.map(|()| Vec::new()))).unwrap()
        });
    }
    let writes = collect(N);
    assert_eq!(
        writes.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..N).collect::<Vec<_>>()
    );
    assert!(writes.iter().all(|(_, r)| r.is_ok()), "{writes:?}");
    let flushed = done.clone();
    engine.start_flush(move |r| flushed.send((N, r.map(|()| Vec::new()))).unwrap());
    assert!(collect(1)[0].1.is_ok());
    for i in 0..N {
        let done = done.clone();
        engine.start_read(i * LEN as u64, LEN as u32, move |r| {
            done.send((i, r)).unwrap()
        });
    }
    for (i, r) in collect(N) {
        assert!(
            r.unwrap() == pattern(LEN, i),
            "read {i} returned other data"
        );
    }
    // Every completion came once: nothing more arrives.
    assert!(results.recv_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(engine.stats().requests, 2 * N + 1);
    smol::block_on(engine.close());
    let last = (N - 1) * LEN as u64;
    assert!(
        file_bytes(&s.path("disk.img"), last, LEN) == pattern(LEN, N - 1),
        "the image holds the last write"
    );
}

#[test]
fn a_resent_write_never_overtakes_a_newer_one() {
    let s = Setup::new();
    let server = s.disk("16M", &[]);
    let mut c = common::connect(&s.client(&server, "disk", Access::ReadWrite));
    let (old, new) = (pattern(1 << 20, 1), pattern(1 << 20, 2));
    let (a, b) = (c.next_txid(), c.next_txid());
    let write = |txid| RequestHeader {
        op: Op::Write,
        flags: 0,
        txid,
        floor: a,
        offset: 0,
        length: 1 << 20,
    };
    smol::block_on(async {
        // The first copy and its resends arrive while it executes: they join it.
        for _ in 0..20 {
            c.send(&write(a), &old).await.unwrap();
        }
        while c.recv().await.unwrap().0.txid != a {}
        c.send(&write(b), &new).await.unwrap();
        loop {
            let (h, _) = c.recv().await.unwrap();
            if h.txid == b {
                assert_eq!(h.status, 0);
                break;
            }
        }
        // Late copies of the first write, after the newer one completed.
        for _ in 0..5 {
            c.send(&write(a), &old).await.unwrap();
        }
        let read = RequestHeader {
            op: Op::Read,
            flags: 0,
            txid: c.next_txid(),
            floor: a,
            offset: 0,
            length: 1 << 20,
        };
        c.send(&read, &[]).await.unwrap();
        loop {
            let (h, data) = c.recv().await.unwrap();
            if h.txid == read.txid {
                assert!(data == new, "the block holds the newer write");
                break;
            }
        }
    });
    assert!(file_bytes(&s.path("disk.img"), 0, 1 << 20) == new);
}

/// Runs a verified workload through the proxy while `faults` are injected one after
/// another, then checks the image against the model of acked writes.
fn workload_under_faults(faults: &[Fault]) -> dst::client::stats::Stats {
    let s = Setup::new();
    let server = s.disk("64M", &[]);
    let proxy = Proxy::start(server.addr);
    let client = proxy.route(s.client(&server, "disk", Access::ReadWrite));
    let engine = patient_engine(client);
    let run = spawn(&engine, workload(4, 4, 25, 7));
    for fault in faults {
        // Each fault finds the workload going: 1 MiB acked since the one before.
        let mark = engine.stats().bytes_written;
        wait_until(
            "the workload to make progress",
            Duration::from_secs(30),
            || engine.stats().bytes_written >= mark + (1 << 20),
        );
        proxy.set_fault(fault.clone());
        match fault {
            Fault::Stall | Fault::Delay(_) => {
                std::thread::sleep(Duration::from_millis(700));
                proxy.set_fault(Fault::None);
            }
            _ => proxy.wait_for_fault_spent(),
        }
    }
    let model = finish(&engine, run);
    model.check(&s.path("disk.img"));
    let stats = engine.stats();
    assert_eq!(stats.failures, 0, "{stats}");
    stats
}

#[test]
fn every_proxy_fault_in_turn_loses_no_acked_write() {
    let stats = workload_under_faults(&[
        Fault::CutMidRecord(Direction::ToServer),
        Fault::CutMidRecord(Direction::ToClient),
        Fault::Stall,
        Fault::Delay(Duration::from_millis(50)),
        Fault::DropToClient(3),
        Fault::DuplicateToServer(2),
    ]);
    // The two cuts and the duplicated record each end the connection; the stall, the delay
    // and the dropped replies are ridden out by resends, on the same connection or, as
    // timing has it, on a new one.
    assert!(stats.reconnects >= 3, "{stats}");
}

#[test]
fn flipped_bytes_are_caught_and_recovered_by_reconnect_and_resend() {
    let stats = workload_under_faults(&[
        Fault::FlipByte(Direction::ToServer),
        Fault::FlipByte(Direction::ToClient),
        Fault::FlipByte(Direction::ToServer),
    ]);
    assert!(stats.reconnects >= 3, "{stats}");
}

#[test]
fn proxy_stall_longer_than_the_resend_budget_fails_with_eio() {
    let s = Setup::new();
    let server = s.disk("16M", &[]);
    let proxy = Proxy::start(server.addr);
    let client = proxy.route(s.client(&server, "disk", Access::ReadWrite));
    let cfg = impatient(client, 4, Duration::from_millis(200));
    let engine = smol::block_on(Engine::start(cfg)).unwrap();
    proxy.set_fault(Fault::Stall);
    let (r, took) = timed_write(&engine, 0, 1);
    assert_eq!(r, Err(libc::EIO));
    assert!(
        took >= Duration::from_millis(800),
        "failed only after its resends"
    );
    proxy.set_fault(Fault::None);
    smol::block_on(engine.write(0, &pattern(4096, 2), false))
        .expect("service resumes after the stall");
    smol::block_on(engine.close());
}

#[test]
fn a_node_down_longer_than_the_resend_budget_fails_new_requests_at_once() {
    let s = Setup::new();
    let args = ["--export", "disk=disk.img", "--create-size", "16M"];
    let mut server = s.server(&args);
    let addr = server.addr;
    let cfg = impatient(
        s.client(&server, "disk", Access::ReadWrite),
        2, // about 0.6 s in all
        Duration::from_millis(200),
    );
    let engine = smol::block_on(Engine::start(cfg)).unwrap();
    server.stop(libc::SIGKILL);
    // The outage counts from when the engine sees the connection end; a write entered
    // before that would make the second one meet an outage shorter than the budget.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().connected {
        assert!(
            Instant::now() < deadline,
            "the end of the connection unseen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let (r, took) = timed_write(&engine, 0, 1);
    assert_eq!(r, Err(libc::EIO));
    assert!(
        took >= Duration::from_millis(500),
        "the first waits out its resends"
    );
    // Later ones fail at once: nothing is sent for them, nor resent.
    let resends = engine.stats().resends;
    let (r, took) = timed_write(&engine, 0, 2);
    assert_eq!(r, Err(libc::EIO));
    assert_eq!(engine.stats().resends, resends, "{}", engine.stats());
    assert!(
        took < Duration::from_millis(500),
        "failed without waiting out resends: {took:?}"
    );

    // The node comes back: the engine reconnects by itself and requests succeed again.
    let _server = s.server_at(addr, &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while smol::block_on(engine.write(0, &pattern(4096, 3), false)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no reconnect: {}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        smol::block_on(engine.read(0, 4096)).unwrap(),
        pattern(4096, 3)
    );
    smol::block_on(engine.close());
}
