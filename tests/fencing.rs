//! Fencing across sessions: a session that ends (here, it expires while its export's disk
//! is stalled) can run nothing after the next writer's first request. Its queued requests
//! are cancelled, and the next writer waits until those executing have finished.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::mount::DstMount;
use common::{connect, pattern, Setup};
use dst::protocol::{self, Access, Op, RequestHeader, FLAG_FUA};

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(f)
}

fn request(op: Op, flags: u8, txid: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        op,
        flags,
        txid,
        floor: 1,
        offset,
        length,
    }
}

#[test]
fn an_expired_writer_s_queued_zeroes_never_land_on_the_next_writer_s_data() {
    require!();
    // The export node's disk is a file on a dst mount whose own server the test stops:
    // from then on the export's I/O waits, as on a hung disk, until it is continued.
    let lower = Setup::new();
    let lower_server = lower.server(&["--export", "disk=lower.img", "--create-size", "64M"]);
    let mut lower_mount = DstMount::start(&lower, &lower_server, &lower.path("mnt"), &[]);
    let s = Setup::new();
    let next = s.second_key();
    let export = format!("disk={}", lower_mount.file().display());
    // Small transfers make the fair queue's turns small: a 64 MiB WRITE_ZEROES then waits
    // several turns, and another key's 4 KiB write would overtake it.
    let server = s.server(&[
        "--export",
        &export,
        "--session-linger",
        "1s",
        "--max-transfer",
        "64K",
    ]);

    // The first writer: two FUA writes that hang on the stalled disk, holding both I/O
    // threads, and behind them WRITE_ZEROES of the whole export, all sent at once.
    let parts = connect(&s.client(&server, "disk", Access::ReadWrite)).into_parts();
    let (mut tx, rx) = (parts.sender, parts.receiver);
    common::stop_process(lower_server.pid());
    let mut buf = Vec::new();
    for (txid, offset) in [(1, 1 << 20), (2, 2 << 20)] {
        let h = request(Op::Write, FLAG_FUA, txid, offset, 4096);
        protocol::encode_request(&mut buf, &h, &pattern(4096, txid));
    }
    protocol::encode_request(&mut buf, &request(Op::WriteZeroes, 0, 3, 0, 64 << 20), &[]);
    block_on(tx.send(&buf)).unwrap();
    // Its client goes away and does not come back: the session expires. The server reads
    // what was sent before it sees the end of the stream.
    drop((tx, rx, parts.hangup));
    server.wait_for_log("expired; 1 queued requests cancelled, 2 executing");

    // The next writer, another key. Its session may open only once the first one's
    // writes have finished, so the disk is continued meanwhile.
    let resume = lower_server.pid();
    let continued = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        common::mount::kill(resume, libc::SIGCONT);
    });
    let mut cfg = s.client(&server, "disk", Access::ReadWrite);
    cfg.key = next;
    let started = Instant::now();
    let mut c = connect(&cfg);
    eprintln!("the next writer was admitted after {:?}", started.elapsed());
    continued.join().unwrap();
    let data = pattern(4096, 99);
    block_on(c.write(0, &data, false)).unwrap();
    block_on(c.flush()).unwrap();
    // Whatever the first session had queued would have run once the I/O threads were
    // free, well within this: the data must still be there.
    std::thread::sleep(Duration::from_millis(500));
    let read = block_on(c.read(0, 4096)).unwrap();
    assert!(
        read == data,
        "the next writer's data was overwritten (first bytes {:?})",
        &read[..8]
    );
    let read = block_on(c.read(1 << 20, 4096)).unwrap();
    assert!(
        read == pattern(4096, 1),
        "the first writer's executing FUA write did not finish"
    );
    server.wait_for_log("waited");
    drop(c);
    lower_mount.signal(libc::SIGTERM);
}
