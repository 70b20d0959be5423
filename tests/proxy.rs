//! The fault-injecting test proxy itself (tests/common/proxy.rs), between real clients and
//! a real dst-server: each fault does what it says, and the proxy stays usable after it.

mod common;

use std::time::Duration;

use common::proxy::{live_threads, Direction, Fault, Proxy};
use common::{connect, pattern, Setup};
use dst::channel::ChannelError;
use dst::client::{ClientConfig, ClientError, Connection};
use dst::protocol::{Access, Op, RequestHeader};

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(f)
}

/// A server with a 4 MiB export, a proxy in front of it, and a client configuration that
/// goes through the proxy. Read-only where the test does not write, so that a reconnect
/// never races the server's release of the previous read-write session.
fn proxied(s: &Setup, access: Access) -> (common::ServerProcess, Proxy, ClientConfig) {
    let server = s.disk("4M", &[]);
    let proxy = Proxy::start(server.addr);
    let cfg = proxy.route(s.client(&server, "disk", access));
    (server, proxy, cfg)
}

fn ping_header(c: &mut Connection) -> RequestHeader {
    let txid = c.next_txid();
    RequestHeader {
        op: Op::Ping,
        flags: 0,
        txid,
        floor: txid,
        offset: 0,
        length: 0,
    }
}

#[test]
fn forwards_reads_and_writes_untouched() {
    let s = Setup::new();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadWrite);
    let mut c = connect(&cfg);
    block_on(async {
        // Large enough to span several records in both directions.
        c.write(4096, &pattern(300_000, 1), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(c.read(4096, 300_000).await.unwrap(), pattern(300_000, 1));
    });
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.open_connections(), 1);
    // 300 000 bytes take 5 records, plus HELLO or WELCOME.
    assert!(
        proxy.records(Direction::ToServer) >= 6,
        "HELLO and the write's records"
    );
    assert!(
        proxy.records(Direction::ToClient) >= 6,
        "WELCOME and the read's records"
    );
    drop(c);
    proxy.wait_for_open_connections(0);
}

#[test]
fn a_flipped_byte_ends_that_connection_only() {
    let s = Setup::new();
    let (server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    block_on(c.ping()).unwrap();
    let before = proxy.records(Direction::ToServer);
    proxy.set_fault(Fault::FlipByte(Direction::ToServer));
    assert!(
        block_on(c.ping()).is_err(),
        "the server closed the connection"
    );
    assert_eq!(proxy.fault(), Fault::None, "one-shot fault spent");
    assert_eq!(proxy.records(Direction::ToServer), before + 1);
    server.wait_for_log("failed authentication");

    let mut fresh = connect(&cfg);
    block_on(fresh.ping()).unwrap();
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn a_cut_mid_record_closes_the_clients_connection() {
    let s = Setup::new();
    std::fs::write(s.path("disk.img"), pattern(1 << 20, 2)).unwrap();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    proxy.set_fault(Fault::CutMidRecord(Direction::ToClient));
    assert!(block_on(c.read(0, 100_000)).is_err(), "reply cut off");
    assert_eq!(proxy.fault(), Fault::None);
    proxy.wait_for_open_connections(0);

    // Requests cut on their way to the server end the connection too.
    let mut c = connect(&cfg);
    proxy.set_fault(Fault::CutMidRecord(Direction::ToServer));
    assert!(block_on(c.ping()).is_err());
    proxy.wait_for_open_connections(0);

    let mut c = connect(&cfg);
    assert_eq!(
        block_on(c.read(0, 100_000)).unwrap(),
        pattern(1 << 20, 2)[..100_000]
    );
    assert_eq!(proxy.connections(), 3);
}

#[test]
fn refuse_new_fails_connects_while_existing_connections_flow() {
    let s = Setup::new();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    proxy.set_fault(Fault::RefuseNew);
    assert!(block_on(Connection::connect(&cfg, None)).is_err());
    assert_eq!(
        proxy.connections(),
        2,
        "the attempt was accepted, then closed"
    );
    block_on(c.ping()).unwrap();
    proxy.set_fault(Fault::None);
    let mut again = connect(&cfg);
    block_on(again.ping()).unwrap();
    assert_eq!(proxy.open_connections(), 2);
}

#[test]
fn a_stall_holds_a_ping_until_it_is_lifted() {
    let s = Setup::new();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    let before = (
        proxy.records(Direction::ToServer),
        proxy.records(Direction::ToClient),
    );
    proxy.set_fault(Fault::Stall);
    let pinger = std::thread::spawn(move || block_on(c.ping()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pinger.is_finished(), "the ping went through a stall");
    assert_eq!(
        (
            proxy.records(Direction::ToServer),
            proxy.records(Direction::ToClient)
        ),
        before,
        "nothing was forwarded during the stall"
    );
    proxy.set_fault(Fault::None);
    pinger.join().unwrap().unwrap();
}

#[test]
fn a_dropped_reply_desynchronises_the_next_one() {
    let s = Setup::new();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    let replies = proxy.records(Direction::ToClient);
    proxy.set_fault(Fault::DropToClient(1));
    block_on(async {
        let h = ping_header(&mut c);
        c.send(&h, &[]).await.unwrap();
        proxy.wait_for_fault_spent();
        assert_eq!(proxy.records(Direction::ToClient), replies, "reply dropped");
        // The next reply is sealed with the nonce after the dropped one.
        let h = ping_header(&mut c);
        c.send(&h, &[]).await.unwrap();
        let err = c.recv().await.unwrap_err();
        assert!(
            matches!(err, ClientError::Channel(ChannelError::Decrypt)),
            "{err}"
        );
    });
}

#[test]
fn a_duplicated_request_is_rejected_by_the_server() {
    let s = Setup::new();
    let (server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    let before = proxy.records(Direction::ToServer);
    proxy.set_fault(Fault::DuplicateToServer(1));
    // The original may be answered before the copy is rejected; the connection then ends.
    let _ = block_on(c.ping());
    proxy.wait_for_records(Direction::ToServer, before + 2);
    server.wait_for_log("failed authentication");
    assert!(block_on(c.ping()).is_err());
}

#[test]
fn delay_postpones_each_record_and_cut_all_forces_a_reconnect() {
    let s = Setup::new();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let mut c = connect(&cfg);
    proxy.set_fault(Fault::Delay(Duration::from_millis(150)));
    let start = std::time::Instant::now();
    block_on(c.ping()).unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "round trip took {took:?}"
    );
    proxy.set_fault(Fault::None);

    let session = c.info().session;
    proxy.cut_all();
    assert!(block_on(c.ping()).is_err());
    let mut c = block_on(Connection::connect(&cfg, Some(session))).unwrap();
    assert!(c.info().resumed);
    block_on(c.ping()).unwrap();
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn dropping_the_proxy_ends_its_threads_and_connections() {
    let s = Setup::new();
    let (_server, proxy, cfg) = proxied(&s, Access::ReadOnly);
    let port = proxy.addr().port();
    let mut idle = connect(&cfg);
    let mut stalled = connect(&cfg);
    assert_eq!(
        live_threads(port),
        1 + 2 * 4,
        "a listener, four threads a connection"
    );
    proxy.set_fault(Fault::Stall);
    let pinger = std::thread::spawn(move || block_on(stalled.ping()));
    std::thread::sleep(Duration::from_millis(100));

    drop(proxy);
    assert!(pinger.join().unwrap().is_err(), "the stalled ping failed");
    assert!(
        block_on(idle.ping()).is_err(),
        "the idle connection was closed"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while live_threads(port) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy threads outlived it"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
