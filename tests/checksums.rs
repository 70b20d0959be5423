//! Per-block checksums (`--export NAME=PATH:checksums`) against real dst-server processes:
//! corruption in the image is caught by reads (through the client library, and as root
//! through a real dst-mount's FUSE file and a loop device on it) and by `dst-server scrub`,
//! a server killed mid-workload reports no false corruption, trimmed blocks verify as
//! zeros, and `--repair-table` accepts a legitimate out-of-band change.
//!
//! Throughput with and without checksums is measured by `cargo bench --bench checksums`.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use common::mount::{wait_until, AlignedBuf, DstMount, Loop};
use common::workload::{finish, patient_engine, spawn, Workload};
use common::{connect, file_bytes, pattern, Setup};
use dst::client::ClientError;
use dst::protocol::Access;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Dirty regions of a 64 MiB image are 16 MiB.
const REGION: u64 = 16 * MIB;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(f)
}

/// The number after `label` in a scrub summary.
fn count(summary: &str, label: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{label}' in the summary:\n{summary}"))
}

/// Checks that ok + zero + unverified + corrupt covers the whole 64 MiB image.
fn assert_whole_image(summary: &str) {
    let sum: u64 = ["ok", "zero", "unverified", "corrupt"]
        .iter()
        .map(|l| count(summary, l))
        .sum();
    assert_eq!(sum, 64 * MIB / BLOCK, "{summary}");
}

fn flip_byte(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let b = file_bytes(path, offset, 1)[0];
    f.write_all_at(&[b ^ 0x5a], offset).unwrap();
}

fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u32 {
    match r {
        Err(ClientError::Status(e)) => e,
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[test]
fn a_flipped_byte_fails_reads_of_its_block_and_scrub_reports_it() {
    let s = Setup::new();
    let mut server = s.server(&[
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
    ]);
    server.wait_for_log("checksums on");
    let img = s.path("disk.img");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    let data = pattern(MIB as usize, 1);
    block_on(async {
        c.write(0, &data, false).await.unwrap();
        c.flush().await.unwrap();
        assert!(c.read(0, MIB as u32).await.unwrap() == data);
    });

    flip_byte(&img, 3 * BLOCK + 100);
    block_on(async {
        assert_eq!(status(c.read(3 * BLOCK, 4096).await), libc::EIO as u32);
        assert_eq!(status(c.read(3 * BLOCK + 4000, 10).await), libc::EIO as u32);
        assert_eq!(status(c.read(0, MIB as u32).await), libc::EIO as u32);
        // Untouched blocks, even next to it, still read fine.
        assert_eq!(
            c.read(2 * BLOCK, 4096).await.unwrap(),
            data[2 * BLOCK as usize..3 * BLOCK as usize]
        );
        assert_eq!(
            c.read(4 * BLOCK, 8192).await.unwrap(),
            data[4 * BLOCK as usize..6 * BLOCK as usize]
        );
    });
    server.wait_for_log("block 3 (bytes 12288..16384 of the image) does not match its checksum");

    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 2, "scrub must refuse while the server runs:\n{out}");
    assert!(out.contains("in use"), "{out}");

    drop(c);
    server.stop(libc::SIGTERM);
    assert!(
        server
            .log()
            .contains("3 blocks failed checksum verification"),
        "{}",
        server.log()
    );
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(count(&out, "corrupt"), 1, "{out}");
    assert!(out.contains("(blocks 3)"), "{out}");
    assert_eq!(count(&out, "ok"), 255, "{out}");
    assert_whole_image(&out);
}

/// `len` bytes of `file` at `offset`, read with O_DIRECT (`file` is opened with it), so
/// the read reaches the server rather than a page cache.
fn read_direct(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = AlignedBuf::zeroed(len);
    file.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

fn open_direct(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `failures` counter in a dst mount's `.stats`.
fn mount_failures(m: &DstMount) -> u64 {
    let stats = std::fs::read_to_string(m.dir.join(".stats")).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("failures "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no failures line in .stats:\n{stats}"))
}

/// The whole path, as root: a byte flipped in the server's image fails the next O_DIRECT
/// read of its block through dst-mount's FUSE file and through a loop device (direct I/O)
/// on that file with EIO, while the blocks around it still read fine; scrub reports it.
#[test]
fn a_flipped_byte_fails_reads_through_the_fuse_file_and_a_loop_device() {
    require!("losetup");
    let s = Setup::new();
    let mut server = s.server(&[
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
    ]);
    server.wait_for_log("checksums on");
    let img = s.path("disk.img");
    // Clear of the blocks that udev's probes read when the loop device appears.
    let at = 8 * MIB;
    let bad = at / BLOCK + 3;
    let data = AlignedBuf::new(MIB as usize, 7);
    let block = |b: u64| {
        let start = ((b - at / BLOCK) * BLOCK) as usize;
        &data.as_slice()[start..start + BLOCK as usize]
    };
    let eio = |r: std::io::Result<Vec<u8>>| match r {
        Err(e) => e.raw_os_error(),
        Ok(_) => None,
    };
    {
        let mut m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
        let f = open_direct(&m.file(), true);
        f.write_all_at(data.as_slice(), at).unwrap();
        f.sync_all().unwrap();
        assert!(read_direct(&f, at, MIB as usize).unwrap() == data.as_slice());

        flip_byte(&img, bad * BLOCK + 100);
        let failures = mount_failures(&m);
        assert_eq!(eio(read_direct(&f, bad * BLOCK, 4096)), Some(libc::EIO));
        assert_eq!(
            eio(read_direct(&f, at, MIB as usize)),
            Some(libc::EIO),
            "a large read over the block"
        );
        assert!(mount_failures(&m) > failures, "counted in .stats");
        assert_eq!(
            read_direct(&f, (bad - 1) * BLOCK, 4096).unwrap(),
            block(bad - 1)
        );
        assert_eq!(read_direct(&f, (bad + 1) * BLOCK, 8192).unwrap(), {
            [block(bad + 1), block(bad + 2)].concat()
        });
        assert_eq!(read_direct(&f, 0, 4096).unwrap(), vec![0; 4096]);

        let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
        assert_eq!(lo.sys("loop/dio"), "1", "the loop device uses direct I/O");
        let d = open_direct(Path::new(&lo.dev), false);
        assert_eq!(eio(read_direct(&d, bad * BLOCK, 4096)), Some(libc::EIO));
        assert_eq!(eio(read_direct(&d, at, MIB as usize)), Some(libc::EIO));
        assert_eq!(
            read_direct(&d, (bad - 1) * BLOCK, 4096).unwrap(),
            block(bad - 1)
        );
        assert_eq!(
            read_direct(&d, (bad + 1) * BLOCK, 4096).unwrap(),
            block(bad + 1)
        );
        // Still failing: nothing rewrote or "healed" the block on the way.
        assert_eq!(eio(read_direct(&f, bad * BLOCK, 4096)), Some(libc::EIO));
        drop(d);
        drop(lo);
        drop(f);
        let status = m.unmount();
        assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    }
    server.wait_for_log(&format!(
        "block {bad} (bytes {}..{} of the image) does not match its checksum",
        bad * BLOCK,
        (bad + 1) * BLOCK
    ));
    assert!(server.stop(libc::SIGTERM).success());

    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(count(&out, "corrupt"), 1, "{out}");
    assert!(out.contains(&format!("(blocks {bad})")), "{out}");
    assert_eq!(count(&out, "ok"), 255, "{out}");
    assert_whole_image(&out);
}

/// Writers on their own 64 KiB places spread over all four regions, some unaligned to
/// 4 KiB.
fn workload(writers: u64, rounds: u64) -> Workload {
    Workload {
        place: |n, len| (n % 4) * REGION + (n / 4) * (len as u64 + 512),
        ..Workload::new(writers, 8, rounds, 64 << 10)
    }
}

#[test]
fn kill_9_mid_workload_then_restart_reports_no_false_corruption() {
    let s = Setup::new();
    let args = [
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
        "--checksum-checkpoint",
        "100ms",
    ];
    let mut server = s.server(&args);
    let addr = server.addr;
    let engine = patient_engine(s.client(&server, "disk", Access::ReadWrite));
    let run = spawn(&engine, workload(4, 40));
    // Killed after a few checkpoints' worth of writes.
    wait_until("writes to be acked", Duration::from_secs(20), || {
        engine.stats().bytes_written >= 8 << 20
    });
    server.stop(libc::SIGKILL);

    // The table was left dirty: scrub recovers it and finds nothing corrupt.
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not closed cleanly"), "{out}");
    assert_eq!(count(&out, "corrupt"), 0, "{out}");
    assert_whole_image(&out);

    // Restarted, the server serves the rest of the workload; every read verifies.
    let mut server = s.server_at(addr, &args);
    let model = finish(&engine, run);
    let stats = engine.stats();
    assert!(stats.reconnects >= 1, "{stats}");
    assert_eq!(stats.failures, 0, "{stats}");
    model.check(&s.path("disk.img"));
    server.stop(libc::SIGTERM);
    assert!(!server.log().contains("does not match"), "{}", server.log());
    assert!(server.log().contains("closed cleanly"), "{}", server.log());

    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("not closed cleanly"), "{out}");
    assert_eq!(count(&out, "corrupt"), 0, "{out}");
    assert_eq!(count(&out, "unverified"), 0, "{out}");
    assert_whole_image(&out);
}

/// Whether region `r`'s dirty bit is set in the table on disk (page cache).
fn region_dirty(s: &Setup, r: u64) -> bool {
    file_bytes(&s.path("disk.img.dst-sum"), 1024 + r / 8, 1)[0] & (1 << (r % 8)) != 0
}

#[test]
fn after_a_crash_blocks_changed_in_dirty_regions_are_unverified_and_in_clean_ones_corrupt() {
    // Stands in for a power loss: the image holds data whose checksum never reached
    // the table, in a region being written, and rot in a region that is clean.
    let s = Setup::new();
    let args = [
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
        "--checksum-checkpoint",
        "100ms",
    ];
    let mut server = s.server(&args);
    let img = s.path("disk.img");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        c.write(0, &pattern(8192, 1), false).await.unwrap();
        c.flush().await.unwrap();
    });
    wait_until("region 0 to become clean", Duration::from_secs(10), || {
        !region_dirty(&s, 0)
    });
    block_on(async {
        c.write(REGION, &pattern(8192, 2), false).await.unwrap();
    });
    assert!(
        region_dirty(&s, 1),
        "a write's region is marked dirty before it is acked"
    );
    server.stop(libc::SIGKILL);
    drop(c);

    img_write(&img, REGION + 4096, &pattern(4096, 3)); // "data without its checksum"
    flip_byte(&img, 100); // rot in clean region 0
    let server = s.server_at(server.addr, &args);
    server.wait_for_log("1 blocks changed just before the shutdown");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        assert_eq!(c.read(REGION + 4096, 4096).await.unwrap(), pattern(4096, 3));
        assert_eq!(
            c.read(REGION, 4096).await.unwrap(),
            pattern(8192, 2)[..4096],
            "blocks that match stay verified"
        );
        assert_eq!(status(c.read(0, 4096).await), libc::EIO as u32);
        assert_eq!(c.read(4096, 4096).await.unwrap(), pattern(8192, 1)[4096..]);
        // A rewrite makes the unverified block verified again.
        c.write(REGION + 4096, &pattern(4096, 4), false)
            .await
            .unwrap();
    });
    flip_byte(&img, REGION + 4096 + 9);
    block_on(async {
        assert_eq!(status(c.read(REGION + 4096, 4096).await), libc::EIO as u32);
    });
}

fn img_write(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

#[test]
fn trimmed_and_zeroed_blocks_read_as_zeros_and_verify() {
    let s = Setup::new();
    let mut server = s.server(&[
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
    ]);
    let img = s.path("disk.img");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    let data = pattern(2 * MIB as usize, 1);
    let mut model = data.clone();
    block_on(async {
        for at in [0, MIB as usize] {
            c.write(at as u64, &data[at..at + MIB as usize], false)
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
        c.trim(0, MIB as u32).await.unwrap();
        model[..MIB as usize].fill(0);
        // Unaligned: the blocks at both ends change in part.
        c.write_zeroes(MIB + 1000, 9000).await.unwrap();
        model[MIB as usize + 1000..MIB as usize + 10_000].fill(0);
        c.write(MIB + 20_000, &[7; 100], false).await.unwrap();
        model[MIB as usize + 20_000..MIB as usize + 20_100].fill(7);
        let mut back = c.read(0, MIB as u32).await.unwrap();
        back.extend(c.read(MIB, MIB as u32).await.unwrap());
        assert!(back == model);
        assert_eq!(c.read(5 * BLOCK, 4096).await.unwrap(), vec![0; 4096]);
        c.flush().await.unwrap();
    });
    drop(c);
    server.stop(libc::SIGTERM);
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 0, "{out}");
    // Trimmed: 256 blocks; zeroed whole: block 257 (bytes 1052672..1056768 lie in 1049576..1058576).
    let never_written = 64 * MIB / BLOCK - 512;
    assert_eq!(count(&out, "zero"), never_written + 256 + 1, "{out}");
    assert_eq!(count(&out, "ok"), 255, "{out}");
    assert_whole_image(&out);

    // Something non-zero in a trimmed block is corruption, for reads and for scrub.
    img_write(&img, 5 * BLOCK + 7, &[1]);
    let server = s.server(&["--export", "disk=disk.img:checksums"]);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        assert_eq!(status(c.read(5 * BLOCK, 4096).await), libc::EIO as u32);
        assert_eq!(c.read(4 * BLOCK, 4096).await.unwrap(), vec![0; 4096]);
    });
    drop(c);
    drop(server);
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(blocks 5)"), "{out}");
}

#[test]
fn repair_table_accepts_a_legitimate_out_of_band_change() {
    let s = Setup::new();
    let mut server = s.server(&[
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
    ]);
    let img = s.path("disk.img");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        c.write(0, &pattern(MIB as usize, 1), false).await.unwrap();
        c.flush().await.unwrap();
    });
    drop(c);
    server.stop(libc::SIGTERM);

    // An administrator restores two blocks from a backup, outside dst.
    img_write(&img, 10 * BLOCK, &pattern(2 * BLOCK as usize, 9));
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!((code, count(&out, "corrupt")), (1, 2), "{out}");

    let (code, out) = s.scrub(&["--export", "disk=disk.img", "--repair-table"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rebuilt checksum table"), "{out}");
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        (count(&out, "corrupt"), count(&out, "ok")),
        (0, 256),
        "{out}"
    );

    let server = s.server(&["--export", "disk=disk.img:checksums"]);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        assert_eq!(
            c.read(10 * BLOCK, 2 * BLOCK as u32).await.unwrap(),
            pattern(2 * BLOCK as usize, 9)
        );
    });
}

/// Starts dst-server on `disk.img:checksums`, expecting it to refuse; returns stderr.
fn refused_start(s: &Setup) -> String {
    refused_export(s, "disk=disk.img:checksums")
}

/// Starts dst-server with `--export EXPORT`, expecting it to refuse; returns stderr.
fn refused_export(s: &Setup, export: &str) -> String {
    let (status, err) = s.refused_start(&["--export", export]);
    assert!(!status.success(), "{err}");
    err
}

#[test]
fn a_table_for_another_image_is_refused_with_the_fix() {
    let s = Setup::new();
    let mut server = s.server(&[
        "--export",
        "disk=disk.img:checksums",
        "--create-size",
        "64M",
    ]);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async { c.write(0, &pattern(4096, 1), false).await.unwrap() });
    server.stop(libc::SIGTERM);

    // A new image of the same size in place of the old one, table left behind.
    std::fs::remove_file(s.path("disk.img")).unwrap();
    let f = std::fs::File::create(s.path("disk.img")).unwrap();
    f.set_len(64 * MIB).unwrap();
    let err = refused_start(&s);
    assert!(err.contains("replaced or copied"), "{err}");
    assert!(err.contains("--repair-table"), "{err}");
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = s.scrub(&["--export", "disk=disk.img", "--repair-table"]);
    assert_eq!(code, 0, "{out}");

    // The same file, shrunk: refused; grown while the server was stopped: the table grows.
    f.set_len(63 * MIB).unwrap();
    let err = refused_start(&s);
    assert!(err.contains("describes an image of"), "{err}");
    f.set_len(65 * MIB).unwrap();
    let mut server = s.server(&["--export", "disk=disk.img:checksums"]);
    server.wait_for_log("grew from 67108864 to 68157440 bytes while the server was stopped");
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
        c.write(65 * MIB - 4096, &pattern(4096, 3), false)
            .await
            .unwrap();
    });
    server.stop(libc::SIGTERM);
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!((code, count(&out, "corrupt")), (0, 0), "{out}");
}

/// `:checksums=TABLE` keeps the table in TABLE instead of beside the image; the server and
/// scrub (given the same export) use it, and scrub without it says where to look.
#[test]
fn a_table_placed_elsewhere_is_used_by_the_server_and_scrub() {
    let s = Setup::new();
    std::fs::create_dir(s.path("sums")).unwrap();
    let export = "disk=disk.img:checksums=sums/disk.sum";
    let mut server = s.server(&["--export", export, "--create-size", "64M"]);
    server.wait_for_log("checksums on: table sums/disk.sum");
    assert!(s.path("sums/disk.sum").exists());
    assert!(!s.path("disk.img.dst-sum").exists());
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        c.write(0, &pattern(MIB as usize, 1), false).await.unwrap();
        c.flush().await.unwrap();
    });
    flip_byte(&s.path("disk.img"), 7 * BLOCK);
    block_on(async {
        assert_eq!(status(c.read(7 * BLOCK, 4096).await), libc::EIO as u32);
        assert_eq!(
            c.read(8 * BLOCK, 4096).await.unwrap(),
            pattern(MIB as usize, 1)[8 * BLOCK as usize..9 * BLOCK as usize]
        );
    });
    let (code, out) = s.scrub(&["--export", export]);
    assert_eq!(code, 2, "in use by the server:\n{out}");
    assert!(out.contains("sums/disk.sum is in use"), "{out}");
    drop(c);
    server.stop(libc::SIGTERM);

    let (code, out) = s.scrub(&["--export", export]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(blocks 7)"), "{out}");
    assert_whole_image(&out);
    let (code, out) = s.scrub(&["--export", "disk=disk.img"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("disk.img.dst-sum is missing"), "{out}");
    assert!(out.contains(":checksums=TABLE"), "{out}");
    let (code, out) = s.scrub(&["--export", export, "--repair-table"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("rebuilt checksum table sums/disk.sum"),
        "{out}"
    );
    assert!(!s.path("disk.img.dst-sum").exists());

    // A table that is the image itself is refused, before anything is written.
    let before = std::fs::read(s.path("disk.img")).unwrap();
    let err = refused_export(&s, "disk=disk.img:checksums=disk.img");
    assert!(err.contains("is the image itself"), "{err}");
    assert!(std::fs::read(s.path("disk.img")).unwrap() == before);
}

/// A block device (a loop device standing in for a disk) cannot keep its table beside it
/// in /dev: `:checksums` alone is refused with the way to place it, `:checksums=TABLE`
/// works, and corruption on the device is caught by reads and by scrub.
#[test]
fn a_block_device_export_keeps_its_table_where_it_is_told() {
    require!("losetup");
    let s = Setup::new();
    let backing = s.path("backing.img");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let lo = Loop::attach(&backing, &[]);
    let dev = lo.dev.as_str();

    let err = refused_export(&s, &format!("disk={dev}:checksums"));
    assert!(err.contains(&format!("{dev} is a block device")), "{err}");
    assert!(
        err.contains(&format!(
            "--export disk={dev}:checksums=/var/lib/dst/disk.dst-sum"
        )),
        "{err}"
    );
    assert!(!Path::new(&format!("{dev}.dst-sum")).exists());
    let (code, out) = s.scrub(&["--export", &format!("disk={dev}")]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is a block device"), "{out}");

    let table = s.path("disk.sum");
    let export = format!("disk={dev}:checksums={}", table.display());
    let mut server = s.server(&["--export", &export]);
    server.wait_for_log(&format!("checksums on: table {}", table.display()));
    let data = pattern(MIB as usize, 3);
    let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
    block_on(async {
        c.write(4 * MIB, &data, false).await.unwrap();
        c.flush().await.unwrap();
    });
    // Through the device, so the server's reads (through the device's cache) see it.
    let bad = 4 * MIB / BLOCK + 5;
    flip_byte(Path::new(dev), bad * BLOCK + 1);
    block_on(async {
        assert_eq!(status(c.read(bad * BLOCK, 4096).await), libc::EIO as u32);
        assert!(c.read(4 * MIB, 5 * BLOCK as u32).await.unwrap() == data[..5 * BLOCK as usize]);
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
    });
    drop(c);
    server.stop(libc::SIGTERM);
    assert!(!Path::new(&format!("{dev}.dst-sum")).exists());

    let (code, out) = s.scrub(&["--export", &export]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("(blocks {bad})")), "{out}");
    assert_eq!(count(&out, "ok"), 255, "{out}");
    // A new table on a device claims nothing about blocks never written through dst (a
    // device has no holes to find): they start unverified, and this scrub recorded them.
    assert_eq!(count(&out, "unverified"), 64 * MIB / BLOCK - 256, "{out}");
    assert_whole_image(&out);
    let (code, out) = s.scrub(&["--export", &export]);
    assert_eq!((code, count(&out, "unverified")), (1, 0), "{out}");
    assert_eq!(count(&out, "zero"), 64 * MIB / BLOCK - 256, "{out}");
    drop(lo);
}
