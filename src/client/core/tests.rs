//! Deterministic tests of the engine's core: time is a base `Instant` plus durations.

use super::*;
use crate::client::durability::tests::info;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than the resend budget, so that resend tests see no pings.
const PING: Duration = Duration::from_secs(60);
const RESENDS: u32 = 3;
const MS: Duration = Duration::from_millis(1);

/// A core whose waiters are labels, connected at `t0`.
fn core(t0: Instant) -> Core<&'static str> {
    let cfg = CoreConfig {
        resend_timeout: TIMEOUT,
        resend_count: RESENDS,
        ping_interval: PING,
        window: Window {
            requests: 4,
            bytes: 10_000,
        },
    };
    Core::new(cfg, &info("boot-a", false), t0)
}

fn req(op: Op, len: u32, now: Instant, label: &'static str) -> Request<&'static str> {
    let data = if op == Op::Write {
        vec![7; len as usize]
    } else {
        Vec::new()
    };
    request(op, 0, 0, len, data, now, label)
}

fn submit(c: &mut Core<&'static str>, now: Instant, op: Op, label: &'static str) -> u64 {
    assert!(
        c.submit(now, req(op, 100, now, label)).is_ok(),
        "{label} enters"
    );
    sent(c, now).last().copied().expect("sent at once")
}

/// The txids `poll_transmit` hands out at `now`.
fn sent(c: &mut Core<&'static str>, now: Instant) -> Vec<u64> {
    let mut batch = Vec::new();
    c.poll_transmit(now, &mut batch, usize::MAX);
    batch.iter().map(|(h, _)| h.txid).collect()
}

fn ack(c: &mut Core<&'static str>, now: Instant, txid: u64) -> Result<(), i32> {
    let done = c.on_reply(now, txid, 0, 0).expect("resolves a transaction");
    done.result
}

#[test]
fn the_window_admits_up_to_its_count_and_bytes() {
    let t0 = Instant::now();
    let mut c = core(t0);
    assert!(
        c.submit(t0, req(Op::Write, 50_000, t0, "big")).is_ok(),
        "one fits in an empty window whatever its size"
    );
    assert!(matches!(
        c.submit(t0, req(Op::Read, 10, t0, "r")),
        Err(Blocked::NoRoom(tx)) if tx.waiter.waiter == "r"
    ));
    let big = sent(&mut c, t0)[0];
    ack(&mut c, t0, big).unwrap();
    assert!(matches!(c.submit(t0, req(Op::Read, 6000, t0, "a")), Ok(())));
    assert!(matches!(
        c.submit(t0, req(Op::Write, 5000, t0, "b")),
        Err(Blocked::NoRoom(_))
    ));
    assert!(matches!(
        c.submit(t0, req(Op::Write, 4000, t0, "c")),
        Ok(())
    ));
    assert!(matches!(c.submit(t0, req(Op::Flush, 0, t0, "d")), Ok(())));
    assert!(matches!(c.submit(t0, req(Op::Flush, 0, t0, "e")), Ok(())));
    assert!(
        matches!(
            c.submit(t0, req(Op::Flush, 0, t0, "f")),
            Err(Blocked::NoRoom(_))
        ),
        "four requests at most"
    );
    let s = c.stats();
    assert_eq!((s.requests, s.in_flight, s.in_flight_bytes), (5, 4, 10_000));
    assert_eq!(s.max_in_flight_bytes, 50_000);
}

#[test]
fn an_unacked_request_is_resent_after_each_timeout_then_fails_with_eio() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let id = submit(&mut c, t0, Op::Write, "w");
    let mut now = t0;
    for resend in 1..=RESENDS {
        let tick = c.on_tick(now + TIMEOUT - MS);
        assert!(!tick.send && tick.failed.is_empty(), "not yet due");
        assert_eq!(c.next_wake(), now + TIMEOUT, "wakes at the deadline");
        now += TIMEOUT;
        let tick = c.on_tick(now);
        assert!(tick.send && tick.failed.is_empty(), "resend {resend} due");
        assert_eq!(sent(&mut c, now), vec![id], "the same transaction again");
        assert_eq!(c.stats().resends, resend as u64);
    }
    let tick = c.on_tick(now + TIMEOUT);
    assert_eq!(tick.failed, vec![("w", libc::EIO)], "out of resends");
    assert!(!tick.send);
    let s = c.stats();
    assert_eq!((s.in_flight, s.failures, s.resends), (0, 1, RESENDS as u64));
    assert!(
        c.on_reply(now, id, 0, 0).is_none(),
        "a late ack resolves nothing"
    );
}

#[test]
fn a_deadline_runs_from_submission_without_a_connection() {
    let t0 = Instant::now();
    let mut c = core(t0);
    c.on_lost(t0);
    assert!(c.submit(t0, req(Op::Read, 10, t0, "r")).is_ok());
    assert!(c.on_tick(t0 + TIMEOUT).send, "due, though never sent");
    assert_eq!(sent(&mut c, t0 + TIMEOUT).len(), 1, "queued once");
}

#[test]
fn a_node_down_longer_than_the_resend_budget_fails_new_requests_at_once() {
    let t0 = Instant::now();
    let budget = TIMEOUT * (RESENDS + 1);
    let mut c = core(t0);
    c.on_lost(t0);
    assert!(c
        .submit(t0 + budget, req(Op::Read, 10, t0, "in time"))
        .is_ok());
    assert!(matches!(
        c.submit(t0 + budget + MS, req(Op::Read, 10, t0, "late")),
        Err(Blocked::Failed(libc::EIO, "late"))
    ));
    c.on_connect_failed(t0 + budget);
    assert!(
        matches!(
            c.submit(t0 + budget + MS, req(Op::Read, 10, t0, "still")),
            Err(Blocked::Failed(libc::EIO, _))
        ),
        "failed attempts do not reset the outage"
    );
    c.on_connected(t0 + 2 * budget, &info("boot-a", true))
        .unwrap();
    assert!(c
        .submit(t0 + 2 * budget, req(Op::Read, 10, t0, "up"))
        .is_ok());
}

#[test]
fn reconnects_back_off_doubling_up_to_a_cap() {
    let t0 = Instant::now();
    let mut c = core(t0);
    assert_eq!(c.retry_at(), None, "connected");
    c.on_lost(t0);
    assert!(!c.stats().connected);
    assert_eq!(c.retry_at(), Some(t0), "the first attempt is at once");
    let mut now = t0;
    let mut waits = Vec::new();
    for _ in 0..8 {
        c.on_connect_failed(now);
        let at = c.retry_at().unwrap();
        waits.push(at - now);
        now = at;
    }
    let ms = Duration::from_millis;
    assert_eq!(
        waits,
        [100, 200, 400, 800, 1600, 3200, 5000, 5000]
            .map(ms)
            .to_vec()
    );
    assert_eq!(c.on_connected(now, &info("boot-a", true)), Ok(9));
    let s = c.stats();
    assert!(s.connected);
    assert_eq!(s.reconnects, 1);
}

#[test]
fn an_idle_connection_is_pinged_and_dies_when_the_ping_goes_unanswered() {
    let t0 = Instant::now();
    let mut c = core(t0);
    assert_eq!(c.next_wake(), t0 + TIMEOUT.min(PING));
    let tick = c.on_tick(t0 + PING - MS);
    assert!(!tick.send && tick.dead.is_none());
    let tick = c.on_tick(t0 + PING);
    assert!(
        tick.send && tick.dead.is_none(),
        "idle for an interval: ping"
    );
    assert!(c.wants_send());
    let mut batch = Vec::new();
    c.poll_transmit(t0 + PING, &mut batch, usize::MAX);
    let (h, data) = &batch[0];
    assert_eq!((h.op, h.txid, data.plain_len()), (Op::Ping, PING_TXID, 0));
    assert!(!c.wants_send());
    assert!(c.on_reply(t0 + PING + MS, PING_TXID, 0, 0).is_none());
    assert!(c.on_tick(t0 + 2 * PING).dead.is_none(), "answered");
    assert!(c.on_tick(t0 + 2 * PING + MS).send, "idle again: ping");
    // Waking when the core says, it finds the connection dead right on time.
    let dead_at = loop {
        let at = c.next_wake();
        assert!(at <= t0 + 3 * PING + MS, "never wakes late");
        if c.on_tick(at).dead.is_some() {
            break at;
        }
    };
    assert_eq!(dead_at, t0 + 3 * PING + MS, "no answer within the interval");
    assert!(
        c.on_tick(t0 + 4 * PING).dead.is_none(),
        "declared dead once"
    );
}

#[test]
fn replies_keep_a_busy_connection_from_being_pinged() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let mut now = t0;
    for _ in 0..10 {
        now += PING / 2;
        let id = submit(&mut c, now, Op::Read, "r");
        ack(&mut c, now, id).unwrap();
        let tick = c.on_tick(now + MS);
        assert!(!tick.send && tick.dead.is_none());
    }
}

#[test]
fn a_flush_covers_exactly_the_writes_acked_before_it() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let w1 = submit(&mut c, t0, Op::Write, "w1");
    ack(&mut c, t0, w1).unwrap();
    let f = submit(&mut c, t0, Op::Flush, "f");
    let w2 = submit(&mut c, t0, Op::Write, "w2");
    ack(&mut c, t0, w2).unwrap();
    ack(&mut c, t0, f).unwrap();
    // w2 was acked after the flush entered, so it is not known to be durable: a
    // reboot now loses it, and the next flush says so.
    c.on_lost(t0);
    c.on_connected(t0, &info("boot-b", false)).unwrap();
    let f = submit(&mut c, t0, Op::Flush, "f2");
    assert_eq!(ack(&mut c, t0, f), Err(libc::EIO));
    assert_eq!(c.stats().failures, 1);
    let f = submit(&mut c, t0, Op::Flush, "f3");
    assert_eq!(ack(&mut c, t0, f), Ok(()), "reported once");
}

#[test]
fn only_a_reboot_with_unflushed_changes_fails_the_next_flush() {
    let t0 = Instant::now();
    let reboot = |write: bool, flush: bool, new: ExportInfo| {
        let mut c = core(t0);
        if write {
            let w = submit(&mut c, t0, Op::Write, "w");
            ack(&mut c, t0, w).unwrap();
        }
        if flush {
            let f = submit(&mut c, t0, Op::Flush, "f");
            ack(&mut c, t0, f).unwrap();
        }
        c.on_lost(t0);
        c.on_connected(t0, &new).unwrap();
        let f = submit(&mut c, t0, Op::Flush, "after");
        ack(&mut c, t0, f)
    };
    assert_eq!(reboot(true, false, info("boot-b", false)), Err(libc::EIO));
    assert_eq!(reboot(true, true, info("boot-b", false)), Ok(()), "flushed");
    assert_eq!(
        reboot(false, false, info("boot-b", false)),
        Ok(()),
        "no changes"
    );
    assert_eq!(
        reboot(true, false, info("boot-a", false)),
        Ok(()),
        "same boot: a process restart keeps the page cache"
    );
    assert_eq!(reboot(true, false, info("boot-b", true)), Ok(()), "resumed");
}

#[test]
fn a_fresh_session_gets_every_unacked_transaction_again_in_order() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let ids: Vec<_> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|l| submit(&mut c, t0, Op::Write, l))
        .collect();
    ack(&mut c, t0, ids[1]).unwrap();
    c.on_lost(t0);
    let mut fresh = info("boot-a", false);
    fresh.session = [9; 16];
    c.on_connected(t0 + MS, &fresh).unwrap();
    assert_eq!(
        c.session(),
        [9; 16],
        "the next reconnect resumes the new one"
    );
    let mut batch = Vec::new();
    c.poll_transmit(t0 + MS, &mut batch, usize::MAX);
    let txids: Vec<_> = batch.iter().map(|(h, _)| h.txid).collect();
    assert_eq!(txids, vec![ids[0], ids[2], ids[3]]);
    assert!(batch.iter().all(|(h, _)| h.floor == ids[0]));
    assert!(
        batch.iter().all(|(_, d)| d.plain_len() == 100),
        "with their data"
    );
}

#[test]
fn a_batch_stops_at_its_byte_limit() {
    let t0 = Instant::now();
    let mut c = core(t0);
    for l in ["a", "b", "c"] {
        c.submit(t0, req(Op::Write, 100, t0, l)).unwrap();
    }
    let mut batch = Vec::new();
    c.poll_transmit(t0, &mut batch, 150);
    assert_eq!(batch.len(), 2, "the second crosses the limit");
    assert!(c.wants_send());
}

#[test]
fn a_grown_export_is_taken_at_its_new_size() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let size = c.size();
    assert!(!c.on_resize(size), "the same size is no news");
    assert!(c.on_resize(size * 2));
    assert!(!c.on_resize(size), "a smaller size is ignored");
    assert_eq!((c.size(), c.stats().size), (size * 2, size * 2));
    // Grown again while disconnected: the reconnect takes the new size.
    submit(&mut c, t0, Op::Write, "w");
    c.on_lost(t0);
    let mut grown = info("boot-a", true);
    grown.size = size * 3;
    assert!(c.on_connected(t0 + MS, &grown).is_ok());
    assert_eq!(c.size(), size * 3);
    assert_eq!(sent(&mut c, t0 + MS).len(), 1, "the write goes out again");
}

#[test]
fn a_changed_export_fails_everything_from_then_on() {
    let t0 = Instant::now();
    let mut c = core(t0);
    submit(&mut c, t0, Op::Write, "w");
    c.on_lost(t0);
    let mut other = info("boot-a", true);
    other.size /= 2;
    assert_eq!(c.on_connected(t0, &other), Err(vec![("w", libc::EIO)]));
    assert!(matches!(
        c.submit(t0, req(Op::Read, 10, t0, "r")),
        Err(Blocked::Failed(libc::EIO, _))
    ));
}

#[test]
fn an_error_status_reaches_the_waiter_and_counts_as_a_failure() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let id = submit(&mut c, t0, Op::Read, "r");
    let done = c.on_reply(t0 + MS, id, libc::ENOSPC as u32, 0).unwrap();
    assert_eq!((done.waiter, done.result), ("r", Err(libc::ENOSPC)));
    let s = c.stats();
    assert_eq!((s.failures, s.bytes_read, s.latency.count()), (1, 0, 1));
}

#[test]
fn closing_waits_for_what_is_in_flight_then_refuses() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let id = submit(&mut c, t0, Op::Read, "r");
    c.close();
    assert!(!c.finished(), "one in flight");
    assert!(c.submit(t0, req(Op::Read, 10, t0, "more")).is_ok());
    ack(&mut c, t0, id).unwrap();
    ack(&mut c, t0, id + 1).unwrap();
    assert!(c.finished());
    assert!(matches!(
        c.submit(t0, req(Op::Read, 10, t0, "late")),
        Err(Blocked::Failed(libc::ESHUTDOWN, "late"))
    ));
}

#[test]
fn a_request_entered_as_sent_counts_in_the_window_and_is_resent_with_what_was_attached() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let sealing = |label| {
        let mut tx = req(Op::Write, 100, t0, label);
        tx.data = Arc::new(Payload::Sealing);
        tx
    };
    let h = c.submit_sent(t0, sealing("w")).unwrap();
    assert_eq!((h.op, h.length, h.floor), (Op::Write, 100, h.txid));
    assert!(sent(&mut c, t0).is_empty(), "its submitter sends it");
    c.attach(h.txid, Payload::Plain(vec![3; 100])).unwrap();
    for label in ["b", "c", "d"] {
        c.submit_sent(t0, sealing(label)).unwrap();
    }
    assert!(matches!(
        c.submit_sent(t0, sealing("e")),
        Err(Blocked::NoRoom(_))
    ));

    // Unacked past its deadline: resent, with the payload attached.
    let t1 = t0 + TIMEOUT + MS;
    assert!(c.on_tick(t1).send);
    let mut batch = Vec::new();
    c.poll_transmit(t1, &mut batch, usize::MAX);
    assert_eq!(batch.len(), 4);
    assert_eq!(batch[0].0.txid, h.txid);
    assert!(matches!(&*batch[0].1, Payload::Plain(d) if d[..] == [3; 100]));

    // Resolved, it takes no payload attached late: that comes back to be recycled.
    assert_eq!(ack(&mut c, t1, h.txid), Ok(()));
    assert!(matches!(
        c.attach(h.txid, Payload::Plain(vec![1])),
        Err(Payload::Plain(d)) if d == [1]
    ));
}
