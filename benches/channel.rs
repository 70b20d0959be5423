//! Throughput of the encrypted channel, per cipher: 1 MiB WRITE frames encrypted (the
//! payload from its own buffer, as clients send it), sent over a Unix socket pair,
//! received and decrypted, either into the receiver's buffer (`recv`) or straight into
//! pooled payload buffers (`recv_owned`, as the server receives writes). Run with
//! `cargo bench --bench channel`.

use std::time::Instant;

use dst::channel::{self, OwnedFrame};
use dst::cipher::Cipher;
use dst::pool::Pool;
use dst::protocol::{self, Frame, Head, Limits, Op, RequestHeader};
use smol::net::unix::UnixStream;

const FRAME: usize = 1 << 20;
const TOTAL: usize = 2 << 30;

fn main() {
    for cipher in Cipher::ALL {
        for owned in [false, true] {
            let mb_s = run(cipher, owned);
            let how = if owned { "recv_owned" } else { "recv" };
            println!(
                "channel {cipher:<10} {how:<10} {mb_s:>8.0} MB/s  (1 MiB writes, encrypt + socket + decrypt)"
            );
        }
    }
}

/// MB/s through one channel.
fn run(cipher: Cipher, owned: bool) -> f64 {
    let server_key = dst::keys::generate();
    let client_key = dst::keys::generate();
    let server_pub = server_key.public();
    let (a, b) = UnixStream::pair().unwrap();
    let ((mut tx, _), (_, mut rx, _)) = smol::block_on(async {
        let client = channel::connect(a.clone(), a, &client_key, &server_pub, cipher);
        let server = channel::accept(b.clone(), b, &server_key, &Cipher::ALL, |_| Ok(()));
        let (c, s) = smol::future::zip(client, server).await;
        (c.unwrap(), s.unwrap())
    });
    let data = vec![0x5a; FRAME];
    let sender = std::thread::spawn(move || {
        smol::block_on(async {
            let mut head = Vec::new();
            for i in 0..TOTAL / FRAME {
                head.clear();
                let h = RequestHeader {
                    op: Op::Write,
                    flags: 0,
                    txid: i as u64 + 1,
                    floor: 1,
                    offset: 0,
                    length: FRAME as u32,
                };
                protocol::encode_request_head(&mut head, &h, data.len());
                tx.send_parts(&[&head, &data]).await.unwrap();
            }
        })
    });
    let limits = Limits {
        max_transfer: FRAME as u32,
    };
    let pool = Pool::new(8 << 20);
    let start = Instant::now();
    smol::block_on(async {
        for _ in 0..TOTAL / FRAME {
            if owned {
                match rx.recv_owned(&limits, &pool).await.unwrap() {
                    Some(OwnedFrame {
                        head: Head::Request(_),
                        payload,
                    }) => {
                        assert_eq!(payload.len(), FRAME);
                        pool.put(payload);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            } else {
                match rx.recv(&limits).await.unwrap() {
                    Some(Frame::Request(_, d)) => assert_eq!(d.len(), FRAME),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    });
    sender.join().unwrap();
    TOTAL as f64 / start.elapsed().as_secs_f64() / 1e6
}
