//! Crash survival and live upgrade of dst-mount: the keeper holds the mount while the
//! worker serving it is killed with SIGKILL or upgraded, under ext4 on a loop device
//! (direct I/O) on the dst file.
//!
//! - fio writes at random with crc32c verification, one run per event, while the worker is
//!   killed three times at random moments and upgraded once (to a new copy of dst-mount
//!   installed at the path the mount was started from): fio sees no I/O error and no
//!   verify error, e2fsck finds the filesystem clean, and the export node's image is what
//!   the client reads.
//! - A long `cp` onto ext4 and fsync-heavy writers run while the worker is killed three
//!   times: the copy is whole, and every file fsynced is on the export node's image.
//! - While a worker serves, the keeper sleeps: 2000 requests switch its threads fewer than
//!   100 times (none, in practice; it watches for the unmount only while no worker serves).
//!
//! The tests with kills print how long I/O paused across each worker restart (from the kill until a
//! direct read of the file is answered), and p50 and max.
//!
//! As root with /dev/fuse, loop devices, losetup, mkfs.ext4, e2fsck and fio, on Linux 6.9 or
//! later (FUSE_NOTIFY_RESEND); otherwise it says why and passes without running.
//!
//! ```text
//! cargo test --release --test keeper -- --nocapture
//! ```

#[macro_use]
mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::{kill, run, wait_until, AlignedBuf, DstMount, FsMount, Loop};
use common::{expect, notify_socket, pattern, Setup};
use xxhash_rust::xxh3::xxh3_64;

/// As `require!`, and Linux 6.9 or later (FUSE_NOTIFY_RESEND).
macro_rules! require_resend {
    ($($tool:expr),* $(,)?) => {
        require!($($tool),*);
        if let Some(why) = kernel_resends() {
            return common::skip(&why);
        }
    };
}

/// Why this kernel cannot resend requests a dead worker left unanswered (Linux 6.9).
fn kernel_resends() -> Option<String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= (6, 9) => None,
        _ => Some(format!(
            "kernel {} has no FUSE_NOTIFY_RESEND",
            release.trim()
        )),
    }
}

/// Small, seeded and printed: the random moments of a run can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("DST_KEEPER_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("random moments from DST_KEEPER_SEED={seed}");
        Rng(seed | 1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(from + self.0 % (to - from))
    }
}

fn stats(dir: &Path) -> HashMap<String, String> {
    fs::read_to_string(dir.join(".stats"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn worker_pid(dir: &Path) -> u32 {
    stats(dir)["worker_pid"].parse().unwrap()
}

/// Reads the first block of the mount's file with O_DIRECT: answered only once a worker
/// serves.
fn direct_read(file: &Path) {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .unwrap();
    let mut buf = AlignedBuf::zeroed(4096);
    f.read_exact_at(buf.as_mut_slice(), 0).unwrap();
}

/// Kills the serving worker with SIGKILL; returns how long until the mount answered again.
fn kill_worker(m: &DstMount) -> Duration {
    let old = worker_pid(&m.dir);
    assert_ne!(old, m.child.id(), "the worker is not the keeper");
    let killed = Instant::now();
    kill(old as i32, libc::SIGKILL);
    // Gone (reaped by the keeper) before the read, so that the new worker answers it.
    wait_until("the killed worker to go", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{old}")).exists()
    });
    direct_read(&m.file());
    let pause = killed.elapsed();
    let new = worker_pid(&m.dir);
    assert_ne!(new, old, "a new worker serves");
    eprintln!("killed worker {old}: worker {new} answered after {pause:?}");
    pause
}

fn report_pauses(what: &str, pauses: &mut [Duration]) {
    pauses.sort();
    if let (Some(p50), Some(max)) = (
        pauses.get(pauses.len().saturating_sub(1) / 2),
        pauses.last(),
    ) {
        eprintln!(
            "I/O pause across a worker restart ({what}, {} kills): p50 {p50:?}, max {max:?}",
            pauses.len()
        );
    }
}

/// Installs dst-mount at `path` as a package manager would: a new file renamed over the
/// old one, so that a running worker keeps its (now deleted) binary.
fn install(path: &Path) {
    let tmp = path.with_extension("new");
    fs::copy(env!("CARGO_BIN_EXE_dst-mount"), &tmp).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A child process of the test, killed by PID if the test fails before it ends.
struct Guarded(Option<Child>);

impl Guarded {
    fn wait(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fio(file: &Path) -> Guarded {
    let child = Command::new("fio")
        .args([
            "--name=v",
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_backlog=1024",
            "--continue_on_error=none",
            "--verify_state_save=0",
        ])
        .arg(format!("--filename={}", file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio starts");
    Guarded(Some(child))
}

/// Hashes of `len` bytes of `file`, 1 MiB at a time, read with O_DIRECT.
fn hashes(file: &Path, len: u64) -> Vec<u64> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .unwrap();
    let mut buf = AlignedBuf::zeroed(1 << 20);
    (0..len / (1 << 20))
        .map(|i| {
            f.read_exact_at(buf.as_mut_slice(), i << 20).unwrap();
            xxh3_64(buf.as_slice())
        })
        .collect()
}

#[test]
fn fio_verifies_across_worker_kills_and_an_upgrade() {
    require_resend!("losetup", "mkfs.ext4", "e2fsck", "fio");
    let s = Setup::new();
    let mut rng = Rng::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "512M"]);
    let bin = s.path("bin");
    fs::create_dir_all(&bin).unwrap();
    let program = bin.join("dst-mount");
    install(&program);
    let mut m =
        DstMount::spawn_program(&program, &s, server.addr, &s.path("mnt"), &[], &[]).ready();
    assert_eq!(stats(&m.dir)["keeper_pid"], m.child.id().to_string());
    let mut pauses = Vec::new();
    {
        let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
        run("mkfs.ext4", &["-q", &lo.dev]);
        let mut fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");
        for (round, event) in ["kill", "kill", "upgrade", "kill"].iter().enumerate() {
            let started = Instant::now();
            let job = fio(&fsm.dir.join(format!("fio-{round}")));
            std::thread::sleep(rng.millis(200, 2500));
            if *event == "kill" {
                pauses.push(kill_worker(&m));
            } else {
                let old = worker_pid(&m.dir);
                install(&program);
                let exe = fs::read_link(format!("/proc/{old}/exe")).unwrap();
                assert!(exe.to_string_lossy().ends_with(" (deleted)"), "{exe:?}");
                let t = Instant::now();
                let out = Command::new(env!("CARGO_BIN_EXE_dst-mount"))
                    .arg("--upgrade")
                    .arg(&m.dir)
                    .output()
                    .unwrap();
                let said = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "--upgrade: {said}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                eprintln!("upgrade took {:?}: {}", t.elapsed(), said.trim());
                let new = worker_pid(&m.dir);
                assert_ne!(new, old);
                let exe = fs::read_link(format!("/proc/{new}/exe")).unwrap();
                assert_eq!(exe, program, "the new worker runs the installed binary");
            }
            let out = job.wait();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("err= 0"),
                "fio round {round} ({event}) failed:\n{text}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                m.log()
            );
            assert!(
                !text.contains("verify"),
                "fio reported a verify problem:\n{text}"
            );
            eprintln!(
                "fio round {round} ({event}) clean in {:?}",
                started.elapsed()
            );
        }
        let st = stats(&m.dir);
        assert_eq!(st["worker_restarts"], "4");
        assert_eq!(st["worker_last_exit"], "killed by signal 9 (SIGKILL)");
        let log = m.log();
        assert!(log.contains("drained for an upgrade"), "{log}");
        assert!(
            log.matches("killed by signal 9 (SIGKILL)").count() >= 3,
            "every kill is logged with its signal:\n{log}"
        );
        fsm.unmount();
        run("e2fsck", &["-fn", &lo.dev]);
    }
    // The loop device is detached: everything it wrote is acked. The image on the export
    // node is what the client reads.
    let len = fs::metadata(m.file()).unwrap().len();
    assert_eq!(hashes(&m.file(), len), hashes(&s.path("disk.img"), len));
    let status = m.unmount();
    assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    report_pauses("fio", &mut pauses);
}

/// Writes small files, each fsynced (and its directory), until `stop`; the names of those
/// whose fsync returned.
fn fsync_writer(dir: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> Vec<(String, usize, u64)> {
    fs::create_dir_all(&dir).unwrap();
    let parent = File::open(&dir).unwrap();
    let mut done = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("f{i}");
        let len = 4096 + (i as usize % 16) * 4096;
        let mut f = File::create(dir.join(&name)).unwrap();
        f.write_all(&pattern(len, seed + i)).unwrap();
        f.sync_all().unwrap();
        parent.sync_all().unwrap();
        done.push((name, len, seed + i));
        i += 1;
    }
    done
}

#[test]
fn cp_and_fsyncs_survive_worker_kills() {
    require_resend!("losetup", "mkfs.ext4", "e2fsck", "cp");
    let s = Setup::new();
    let mut rng = Rng::new();
    let mut server = s.server(&["--export", "disk=disk.img", "--create-size", "512M"]);
    let source = s.path("source.bin");
    const COPY: usize = 160 << 20;
    fs::write(&source, pattern(COPY, 7)).unwrap();
    let mut m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    let mut pauses = Vec::new();
    let synced: Vec<(String, usize, u64)>;
    {
        let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
        run("mkfs.ext4", &["-q", &lo.dev]);
        let mut fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (dir, stop) = (fsm.dir.join(format!("sync{w}")), stop.clone());
                std::thread::spawn(move || fsync_writer(dir, 1000 * (w + 1), stop))
            })
            .collect();
        let cp = Guarded(Some(
            Command::new("cp")
                .arg(&source)
                .arg(fsm.dir.join("copy.bin"))
                .spawn()
                .unwrap(),
        ));
        for _ in 0..3 {
            std::thread::sleep(rng.millis(300, 1500));
            pauses.push(kill_worker(&m));
        }
        let out = cp.wait();
        assert!(out.status.success(), "cp failed:\n{}", m.log());
        run("sync", &["-f", fsm.dir.to_str().unwrap()]);
        stop.store(true, Ordering::Relaxed);
        let done = Arc::new(Mutex::new(Vec::new()));
        for (w, t) in writers.into_iter().enumerate() {
            let files = t.join().expect("an fsync writer failed");
            eprintln!("fsync writer {w}: {} files fsynced", files.len());
            done.lock().unwrap().extend(
                files
                    .into_iter()
                    .map(|(n, l, s)| (format!("sync{w}/{n}"), l, s)),
            );
        }
        synced = std::mem::take(&mut *done.lock().unwrap());
        assert_eq!(stats(&m.dir)["worker_restarts"], "3");
        fsm.unmount();
    }
    let status = m.unmount();
    assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    assert!(server.stop(libc::SIGTERM).success());
    // On the export node's image: the whole copy and every file whose fsync returned.
    let lo = Loop::attach(&s.path("disk.img"), &["-r"]);
    run("e2fsck", &["-fn", &lo.dev]);
    let image = FsMount::mount(&lo.dev, &s.path("image"), "ro");
    let copy = fs::read(image.dir.join("copy.bin")).unwrap();
    assert!(copy == pattern(COPY, 7), "the copy differs from its source");
    let mut lost = 0;
    for (name, len, seed) in &synced {
        match fs::read(image.dir.join(name)) {
            Ok(data) if data.len() == *len && data == pattern(*len, *seed) => {}
            _ => lost += 1,
        }
    }
    eprintln!("{lost} of {} fsynced files lost", synced.len());
    assert_eq!(lost, 0);
    report_pauses("cp and fsync", &mut pauses);
}

#[test]
fn systemd_hears_of_a_reload_and_a_killed_keeper_leaves_no_worker() {
    require_resend!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let path = s.path("notify");
    let socket = notify_socket(&path);
    let env = [("NOTIFY_SOCKET", path.as_os_str())];
    let mut m = DstMount::spawn_with_env(&s, server.addr, &s.path("mnt"), &[], &env);
    expect(&socket, "READY=1");
    let keeper = m.child.id() as i32;
    // systemctl reload: the worker is replaced, and systemd waits for READY=1 again.
    let old = worker_pid(&m.dir);
    kill(keeper, libc::SIGHUP);
    expect(&socket, "RELOADING=1");
    expect(&socket, "READY=1");
    let worker = worker_pid(&m.dir);
    assert_ne!(worker, old, "a new worker serves after the reload");
    direct_read(&m.file());
    // A keeper killed outright takes its worker with it (parent-death signal).
    kill(keeper, libc::SIGKILL);
    m.wait();
    wait_until(
        "the worker to end with its keeper",
        Duration::from_secs(10),
        || {
            fs::read_to_string(format!("/proc/{worker}/stat"))
                .map_or(true, |st| st.split_whitespace().nth(2) == Some("Z"))
        },
    );
}

#[test]
fn upgrade_refuses_what_is_not_a_dst_mount() {
    let s = Setup::new();
    let out = Command::new(env!("CARGO_BIN_EXE_dst-mount"))
        .arg("--upgrade")
        .arg(s.dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not a dst mount"), "{err}");
}

/// Context switches of every thread of process `pid` so far.
fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

#[test]
fn the_keeper_sleeps_while_a_worker_serves() {
    require!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    let keeper = m.child.id();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.file())
        .unwrap();
    let mut buf = AlignedBuf::zeroed(4096);
    let before = context_switches(keeper);
    const READS: u64 = 2000;
    for i in 0..READS {
        // Each a FUSE request the worker answers.
        file.read_exact_at(buf.as_mut_slice(), (i % 4096) * 4096)
            .unwrap();
    }
    let woken = context_switches(keeper) - before;
    eprintln!("the keeper switched {woken} times during {READS} requests");
    assert!(
        woken < READS / 20,
        "the keeper woke {woken} times during {READS} requests served by its worker"
    );
}

#[test]
fn an_unmount_while_no_worker_serves_ends_the_keeper() {
    require_resend!();
    let s = Setup::new();
    let mut server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let mut m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    let worker = worker_pid(&m.dir);
    // With the export node gone, no new worker can connect, so none serves.
    server.stop(libc::SIGKILL);
    kill(worker as i32, libc::SIGKILL);
    wait_until(
        "a worker to fail to connect",
        Duration::from_secs(10),
        || m.log().contains("could not start"),
    );
    // umount(8) asks the filesystem (statfs) first, which waits for a worker; -l does not.
    run("umount", &["-l", m.dir.to_str().unwrap()]);
    let status = m.wait();
    assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    assert!(m.log().contains("was unmounted"), "{}", m.log());
}

#[test]
fn when_no_worker_can_take_over_io_fails_after_the_give_up_time() {
    require_resend!();
    let s = Setup::new();
    let mut server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    // I/O fails after 2 x 500 ms without an answer.
    let args = ["--resend-timeout", "500ms", "--resend-count", "1"];
    let mut m = DstMount::start(&s, &server, &s.path("mnt"), &args);
    let worker = worker_pid(&m.dir);
    server.stop(libc::SIGKILL);
    kill(worker as i32, libc::SIGKILL);
    let file = m.file();
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&file)
            .and_then(|f| f.read_exact_at(AlignedBuf::zeroed(4096).as_mut_slice(), 0))
    });
    let status = m.wait();
    assert!(!status.success(), "the keeper gave up with an error status");
    let read = reader.join().unwrap();
    assert!(
        read.is_err(),
        "I/O waiting for a worker fails once the keeper gives up"
    );
    eprintln!("gave up after {:?}: {read:?}", started.elapsed());
    assert!(m.log().contains("no worker could take over"), "{}", m.log());
    assert_eq!(
        common::mount::mounted_type(&m.dir),
        None,
        "the mount is gone"
    );
}
