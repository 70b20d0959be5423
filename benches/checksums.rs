//! What per-block checksums (`--export NAME=PATH:checksums`) cost: the same workloads with
//! checksums off and on, alternating, from one run, then a summary with the difference.
//!
//! - `engine`: through the client's transaction engine and a real `dst-server` on
//!   127.0.0.1 (network stack, crypto and all), on a 1 GiB sparse image;
//! - `export`: the export node's own cost, without network or crypto: reads and writes
//!   through the `Checksums` filter over a `FileBackend`, against plain `pread`/`pwrite`
//!   on the same kind of file.
//!
//! Run with `cargo bench --bench checksums`; `cargo bench --bench checksums -- export` (or
//! `engine`) runs one part. Images go to the system's temporary directory (`TMPDIR`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{pattern, Setup};
use dst::client::engine::{Engine, EngineConfig};
use dst::pool::Pool;
use dst::protocol::Access;
use dst::server::backend::file::FileBackend;
use dst::server::backend::Backend;
use dst::server::checksums::{self, Checksums};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1 << 30;
/// Runs of each configuration; they alternate, so drift hits both alike.
const ROUNDS: usize = 5;

/// (part, workload, checksums on) -> (MB/s, IOPS) of each round.
type Results = BTreeMap<(&'static str, &'static str, bool), Vec<(f64, f64)>>;

fn main() {
    // cargo passes `--bench`; anything else is a filter on the part's name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f));
    let mut results = Results::new();
    for round in 0..ROUNDS {
        for sums in [false, true] {
            if wanted("engine") {
                engine_round(sums, round, &mut results);
            }
            if wanted("export") {
                export_round(sums, round, &mut results);
            }
        }
    }
    summary(&results);
}

/// Records and prints one measurement of `ops` operations of `len` bytes taking `took`.
fn record(
    results: &mut Results,
    key: (&'static str, &'static str, bool),
    ops: u64,
    len: u64,
    took: Duration,
) {
    let t = took.as_secs_f64();
    let (mbs, iops) = ((ops * len) as f64 / t / 1e6, ops as f64 / t);
    println!(
        "{:<7} {:<9} {:<10} {mbs:>8.1} MB/s {iops:>9.0} IOPS",
        key.0,
        label(key.2),
        key.1
    );
    results.entry(key).or_default().push((mbs, iops));
}

fn label(sums: bool) -> &'static str {
    if sums {
        "checksums"
    } else {
        "plain"
    }
}

/// Medians per workload, off against on.
fn summary(results: &Results) {
    let median = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let column = |v: &[(f64, f64)]| {
        format!(
            "{:>9.1} MB/s {:>8.0}/s",
            median(v, |r| r.0),
            median(v, |r| r.1)
        )
    };
    println!(
        "\n{:<18} {:>25} {:>25} {:>10}",
        format!("medians of {ROUNDS}"),
        "plain",
        "checksums",
        "difference"
    );
    for ((part, name, sums), plain) in results {
        let Some(on) = results.get(&(*part, *name, true)).filter(|_| !*sums) else {
            continue;
        };
        let change = median(on, |r| r.1) / median(plain, |r| r.1) - 1.0;
        println!(
            "{part:<7} {name:<10} {} {} {:>+9.1}%",
            column(plain),
            column(on),
            change * 100.0
        );
    }
}

/// The workloads through the engine, against a server started for this round.
fn engine_round(sums: bool, round: usize, results: &mut Results) {
    let s = Setup::new();
    let export = if sums {
        "disk=disk.img:checksums"
    } else {
        "disk=disk.img"
    };
    let server = s.server(&["--export", export, "--create-size", "1G"]);
    let engine = smol::block_on(Engine::start(EngineConfig::new(s.client(
        &server,
        "disk",
        Access::ReadWrite,
    ))))
    .expect("the engine connects");
    let mut run = |name: &'static str, ops: u64, len: u64, took: Duration| {
        record(results, ("engine", name, sums), ops, len, took)
    };
    // `qd` tasks share `ops` operations of `len` bytes, sequential or random offsets.
    let parallel = |qd: u64, ops: u64, len: u64, write: bool, random: bool| {
        let start = Instant::now();
        smol::block_on(async {
            let tasks: Vec<_> = (0..qd)
                .map(|q| {
                    let engine = engine.clone();
                    smol::spawn(async move {
                        let data = pattern(len as usize, q + round as u64);
                        let mut x = q.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                        for i in 0..ops / qd {
                            let off = if random {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                (x % (SIZE / len)) * len
                            } else {
                                ((i * qd + q) * len) % SIZE
                            };
                            if write {
                                engine.write(off, &data, false).await.unwrap();
                            } else {
                                engine.read(off, len as u32).await.unwrap();
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
            if write {
                engine.flush().await.unwrap();
            }
        });
        start.elapsed()
    };
    run("seqwrite", 512, MIB, parallel(8, 512, MIB, true, false));
    run("seqread", 512, MIB, parallel(8, 512, MIB, false, false));
    run(
        "randwrite",
        40_000,
        4096,
        parallel(32, 40_000, 4096, true, true),
    );
    run(
        "randread",
        40_000,
        4096,
        parallel(32, 40_000, 4096, false, true),
    );
    let start = Instant::now();
    smol::block_on(async {
        let data = pattern(4096, 5);
        for i in 0..1000u64 {
            engine
                .write((i * 7919 % (SIZE / 4096)) * 4096, &data, false)
                .await
                .unwrap();
            engine.flush().await.unwrap();
        }
    });
    run("syncwrite", 1000, 4096, start.elapsed());
    smol::block_on(engine.close());
}

/// The workloads on the export node's file, with or without its checksum table.
fn export_round(sums: bool, round: usize, results: &mut Results) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(SIZE).unwrap();
    let table = sums.then(|| {
        Checksums::open(
            "bench",
            Box::new(FileBackend::open(&path, false).unwrap()),
            &checksums::sidecar_path(&path),
            Some(Duration::from_secs(5)),
        )
        .unwrap()
    });
    // As the server's: reads take their buffers from it, and give them back.
    let pool = Pool::new(64 << 20);
    let mut time = |name: &'static str, ops: u64, len: u64, op: &dyn Fn(u64)| {
        let start = Instant::now();
        for i in 0..ops {
            op(i);
        }
        record(results, ("export", name, sums), ops, len, start.elapsed());
    };
    let big = pattern(MIB as usize, 1 + round as u64);
    let small = pattern(4096, 2 + round as u64);
    let random = |i: u64| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % (SIZE / 4096) * 4096;
    let write = |off: u64, data: &[u8]| match &table {
        Some(t) => t.write(off, data, false).unwrap(),
        None => f.write_all_at(data, off).unwrap(),
    };
    let read = |off: u64, len: usize| match &table {
        Some(t) => pool.put(t.read(off, len, &pool).unwrap()),
        None => {
            let mut buf = vec![0; len];
            f.read_exact_at(&mut buf, off).unwrap();
        }
    };
    time("seqwrite", 512, MIB, &|i| write(i * MIB, &big));
    time("seqread", 512, MIB, &|i| read(i * MIB, MIB as usize));
    time("randwrite", 100_000, 4096, &|i| write(random(i), &small));
    time("randread", 100_000, 4096, &|i| read(random(i), 4096));
    time("syncwrite", 500, 4096, &|i| {
        write(random(i + 7), &small);
        f.sync_data().unwrap();
    });
}
