//! Throughput of the encrypted channel, per cipher: 1 MiB WRITE frames encrypted,
//! sent over a Unix socket pair, received and decrypted. Run with `cargo bench --bench channel`.

use std::time::Instant;

use dst::channel::{self, Cipher};
use dst::protocol::{self, Frame, Limits, Op, RequestHeader};
use smol::net::unix::UnixStream;

const FRAME: usize = 1 << 20;
const TOTAL: usize = 2 << 30;

fn main() {
    let server_key = dst::keys::generate();
    let client_key = dst::keys::generate();
    let server_pub = server_key.public();
    for cipher in Cipher::ALL {
        let (a, b) = UnixStream::pair().unwrap();
        let ((tx, _), (_, mut rx, _)) = smol::block_on(async {
            let client = channel::connect(a.clone(), a, &client_key, &server_pub, cipher);
            let server = channel::accept(b.clone(), b, &server_key, &Cipher::ALL, |_| Ok(()));
            let (c, s) = smol::future::zip(client, server).await;
            (c.unwrap(), s.unwrap())
        });
        let mut tx = tx;
        let data = vec![0x5a; FRAME];
        let sender = std::thread::spawn(move || {
            smol::block_on(async {
                let mut buf = Vec::new();
                for i in 0..TOTAL / FRAME {
                    buf.clear();
                    let h = RequestHeader {
                        op: Op::Write,
                        flags: 0,
                        txid: i as u64 + 1,
                        floor: 1,
                        offset: 0,
                        length: FRAME as u32,
                    };
                    protocol::encode_request(&mut buf, &h, &data);
                    tx.send(&buf).await.unwrap();
                }
            })
        });
        let limits = Limits {
            max_transfer: FRAME as u32,
        };
        let start = Instant::now();
        smol::block_on(async {
            for _ in 0..TOTAL / FRAME {
                match rx.recv(&limits).await.unwrap() {
                    Some(Frame::Request(_, d)) => assert_eq!(d.len(), FRAME),
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        sender.join().unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "channel {cipher:<10} {:>8.0} MB/s  (1 MiB writes, encrypt + socket + decrypt)",
            TOTAL as f64 / secs / 1e6
        );
    }
}
