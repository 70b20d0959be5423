//! Soak: ext4 on a loop device (direct I/O) over dst-mount, through the fault-injecting
//! test proxy, under a mixed workload from several threads, while a fault schedule kills
//! the server with SIGKILL and restarts it on the same address, cuts connections, stalls
//! and delays them, and drops, duplicates, corrupts and truncates records.
//!
//! At the end: no I/O error and no data error surfaced during the run; the filesystem
//! unmounts and `e2fsck -fn` finds it clean; with the server stopped, its image holds every
//! file as last written (the files fsynced before the last fault among them) and none of
//! the deleted ones; every process, mount, loop device and proxy thread is gone.
//!
//! As root with /dev/fuse, loop devices, losetup, mkfs.ext4 and e2fsck; otherwise it says
//! why and passes without running. 150 seconds by default; `DST_SOAK_SECS` sets the
//! length, and the ignored `soak_long` runs 30 minutes unless `DST_SOAK_SECS` says
//! otherwise:
//!
//! ```text
//! cargo test --release --test soak -- --nocapture                      # 150 s, as in CI
//! DST_SOAK_SECS=600 cargo test --release --test soak -- --nocapture
//! cargo test --release --test soak -- --ignored --nocapture soak_long  # 30 min
//! ```
//!
//! Every resource is held by a guard declared in setup order, so that a failing run tears
//! down in reverse: filesystem, loop device, dst mount, proxy, server. Processes are ended
//! by PID only.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::mount::{kill, mounted_type, output, run, AlignedBuf, DstMount, FsMount, Loop};
use common::proxy::{live_threads, Direction, Fault, Proxy};
use common::{ServerProcess, Setup};
use xxhash_rust::xxh3::xxh3_64;

/// Worker threads, each with its own directory of files.
const THREADS: usize = 3;
/// File names per thread.
const FILES: usize = 24;
const IMAGE_SIZE: &str = "256M";
/// dst-mount's transaction settings: short, so that faults are noticed and recovered from
/// quickly; 20 resends of 1 s outlast the longest fault below (a 4 s stall, or a server
/// down for about 2 s) many times over.
const MOUNT_ARGS: [&str; 6] = [
    "--resend-timeout",
    "1s",
    "--resend-count",
    "20",
    "--ping-interval",
    "1s",
];
/// Each worker writes a file to keep this often ...
const KEEP_EVERY: Duration = Duration::from_secs(2);
/// ... and keeps this many, deleting the oldest to make room.
const KEPT: usize = 200;
/// An operation that takes longer than this means something hangs.
const HANG: Duration = Duration::from_secs(90);

#[test]
fn soak() {
    require!("losetup", "mkfs.ext4", "e2fsck", "mount", "umount");
    soak_for(duration_from_env(150));
}

/// The long run, by hand: `cargo test --release --test soak -- --ignored soak_long`.
#[test]
#[ignore = "30 minutes; run by hand"]
fn soak_long() {
    require!("losetup", "mkfs.ext4", "e2fsck", "mount", "umount");
    soak_for(duration_from_env(30 * 60));
}

fn duration_from_env(default_secs: u64) -> Duration {
    let secs = match std::env::var("DST_SOAK_SECS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("DST_SOAK_SECS={v:?} is not a number of seconds")),
        Err(_) => default_secs,
    };
    Duration::from_secs(secs.max(20))
}

fn soak_for(length: Duration) {
    {
        let s = Setup::new();
        run_soak(&s, length);
    }
    // Every guard has been dropped: nothing of the run may remain.
    let children = children_of(std::process::id());
    assert!(
        children.is_empty(),
        "processes leaked (not reaped): {children:?}"
    );
    println!("soak: no process leaked");
}

/// Everything of one run up to and including its checks; prints the figures. Its guards
/// are dropped on return, or on a panic, in reverse order of declaration.
fn run_soak(s: &Setup, length: Duration) {
    let server_args = ["--export", "disk=disk.img", "--create-size", IMAGE_SIZE];
    let mut server = s.server(&server_args);
    let addr = server.addr;
    let proxy = Proxy::start(addr);
    let proxy_port = proxy.addr().port();
    let mut dst = DstMount::start_at(s, proxy.addr(), &s.path("mnt"), &MOUNT_ARGS);
    let lo = Loop::attach(&dst.file(), &["--direct-io=on"]);
    run("mkfs.ext4", &["-q", "-F", &lo.dev]);
    let mut fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");

    let counts = Counts::default();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let dst_pid = dst.child.id() as i32;
    let (models, faults) = std::thread::scope(|scope| {
        // Whatever ends this scope, workers stop and the network heals, so that their
        // current operation can finish and the scope can end.
        let _heal = Heal {
            stop: &stop,
            proxy: &proxy,
        };
        let workers: Vec<_> = (0..THREADS)
            .map(|id| {
                let w = Worker::new(id, fsm.dir.join(format!("t{id}")), &counts, started);
                let stop = &stop;
                scope.spawn(move || w.run(stop))
            })
            .collect();
        let faults = inject_faults(FaultRun {
            s,
            server: &mut server,
            server_args: &server_args,
            addr,
            proxy: &proxy,
            counts: &counts,
            stop: &stop,
            started,
            length,
            dst_pid,
        });
        stop.store(true, Ordering::SeqCst);
        let models: Vec<Model> = workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect();
        (models, faults)
    });
    let faults = faults.unwrap_or_else(|hang| panic!("{hang}\ndst-mount log:\n{}", dst.log()));
    let stats = read_stats(&dst.dir);
    let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    println!(
        "soak: {:.0} s, {THREADS} threads: {counts}",
        started.elapsed().as_secs_f64()
    );
    println!("soak: {faults}");
    println!(
        "soak: dst-mount .stats: reconnects {}, resends {}, failures {}, requests {}",
        stat("reconnects"),
        stat("resends"),
        stat("failures"),
        stat("requests")
    );
    let io_errors = counts.io_errors.load(Ordering::SeqCst);
    println!(
        "soak: during the run: data errors {}, I/O errors {io_errors}",
        counts.data_errors.load(Ordering::SeqCst)
    );

    // Unmount the filesystem, check it through dst, then take dst down cleanly.
    fsm.unmount();
    let fsck = output("e2fsck", &["-f", "-n", &lo.dev]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn {} is not clean ({}):\n{}{}",
        lo.dev,
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    println!("soak: e2fsck -fn {} (through dst) clean", lo.dev);
    drop(lo);
    let status = dst.unmount();
    assert!(status.success(), "dst-mount exit: {status}\n{}", dst.log());
    drop(dst);
    assert!(server.stop(libc::SIGTERM).success(), "{}", server.log());
    drop(proxy);
    assert_eq!(live_threads(proxy_port), 0, "proxy threads left");

    // The export node's image, read directly with the server stopped.
    let image = Loop::attach(&s.path("disk.img"), &["-r"]);
    let img = FsMount::mount(&image.dev, &s.path("image"), "ro");
    let check = check_image(&img.dir, &models, faults.last_start);
    drop(img);
    drop(image);
    let attached = run("losetup", &["-j", s.path("disk.img").to_str().unwrap()]);
    assert!(attached.trim().is_empty(), "loop devices left: {attached}");
    for dir in ["mnt", "fs", "image"] {
        assert_eq!(mounted_type(&s.path(dir)), None, "{dir} is still mounted");
    }

    let data_errors = counts.data_errors.load(Ordering::SeqCst) + check.errors.len() as u64;
    println!(
        "soak: on the image: {} files as last written ({} of them fsynced before the last \
         fault and unchanged since), {} deleted files absent, {} differences",
        check.files,
        check.synced_before_last_fault,
        check.deleted,
        check.errors.len()
    );
    println!("soak: data errors {data_errors}");
    assert!(
        check.errors.is_empty(),
        "the image differs from what was written:\n{}",
        check.errors.join("\n")
    );
    assert_eq!(data_errors, 0, "data errors");
    assert_eq!(io_errors, 0, "I/O errors reached the filesystem's users");
    assert_eq!(stats.get("failures"), Some(&0), "transactions failed");
    if faults.disconnecting > 0 {
        assert!(
            stat("reconnects") > 0,
            "{} faults ended connections, yet dst-mount never reconnected",
            faults.disconnecting
        );
    }
}

/// Stops the workers and clears any fault when the scope that holds it ends, by return or
/// by panic.
struct Heal<'a> {
    stop: &'a AtomicBool,
    proxy: &'a Proxy,
}

impl Drop for Heal<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.proxy.set_fault(Fault::None);
    }
}

/// PIDs (with their names) whose parent is `pid`, zombies included.
fn children_of(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            found.push(format!("{})", head.trim()));
        }
    }
    found
}

/// The `.stats` counters of a dst mount.
fn read_stats(dir: &Path) -> HashMap<String, u64> {
    let text = fs::read_to_string(dir.join(".stats")).unwrap();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The workload

/// Counters shared by the workers, and their watchdog clocks.
#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    creates: AtomicU64,
    replaces: AtomicU64,
    overwrites: AtomicU64,
    fsyncs: AtomicU64,
    deletes: AtomicU64,
    reads: AtomicU64,
    direct_reads: AtomicU64,
    bytes_written: AtomicU64,
    bytes_verified: AtomicU64,
    data_errors: AtomicU64,
    io_errors: AtomicU64,
    /// Per worker: milliseconds since the start (plus one) at which its current operation
    /// began; 0 while between operations.
    busy_since: [AtomicU64; THREADS],
}

impl Counts {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The longest-running current operation, if one has run longer than `limit`.
    fn hung(&self, started: Instant, limit: Duration) -> Option<(usize, Duration)> {
        let now = started.elapsed().as_millis() as u64 + 1;
        self.busy_since.iter().enumerate().find_map(|(id, since)| {
            let since = since.load(Ordering::SeqCst);
            let busy = Duration::from_millis(now.saturating_sub(since));
            (since != 0 && busy > limit).then_some((id, busy))
        })
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::SeqCst);
        write!(
            f,
            "{} operations ({} creates, {} atomic replaces, {} overwrites, {} fsyncs, {} \
             deletes, {} verified reads of which {} O_DIRECT); {:.1} MiB written, {:.1} MiB \
             read back and verified",
            n(&self.ops),
            n(&self.creates),
            n(&self.replaces),
            n(&self.overwrites),
            n(&self.fsyncs),
            n(&self.deletes),
            n(&self.reads),
            n(&self.direct_reads),
            n(&self.bytes_written) as f64 / (1 << 20) as f64,
            n(&self.bytes_verified) as f64 / (1 << 20) as f64,
        )
    }
}

/// What one worker believes its directory holds.
#[derive(Default)]
struct Model {
    dir: PathBuf,
    files: BTreeMap<String, FileModel>,
    /// Deleted, with the deletion fsynced, and not created again.
    deleted: HashSet<String>,
    /// Names whose state an I/O error left unknown; not checked.
    unknown: HashSet<String>,
}

struct FileModel {
    /// What the file holds, as written (through the page cache) by its worker.
    data: Vec<u8>,
    /// The checksum of `data` at the last successful fsync, and when that fsync returned.
    synced: Option<(u64, Instant)>,
}

/// A small xorshift generator: the workload is pseudo-random but needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`; `n` > 0.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// A file size: mostly small, sometimes up to 2 MiB.
    fn size(&mut self) -> usize {
        match self.below(10) {
            0..=3 => self.below(16 << 10) as usize,
            4..=7 => self.below(256 << 10) as usize,
            _ => self.below(2 << 20) as usize,
        }
    }
}

struct Worker<'a> {
    id: usize,
    rng: Rng,
    model: Model,
    /// Files written once, fsynced and left alone, oldest first, so that some files were
    /// fsynced before the last fault and not touched since; at most [`KEPT`].
    kept: VecDeque<String>,
    kept_total: usize,
    next_keep: Instant,
    counts: &'a Counts,
    started: Instant,
}

impl<'a> Worker<'a> {
    fn new(id: usize, dir: PathBuf, counts: &'a Counts, started: Instant) -> Worker<'a> {
        fs::create_dir_all(&dir).unwrap();
        Worker {
            id,
            rng: Rng(0x5EED_0000 + id as u64 * 7919),
            model: Model {
                dir,
                ..Model::default()
            },
            kept: VecDeque::new(),
            kept_total: 0,
            next_keep: started,
            counts,
            started,
        }
    }

    fn run(mut self, stop: &AtomicBool) -> Model {
        while !stop.load(Ordering::SeqCst) {
            let keep_due = Instant::now() >= self.next_keep;
            let name = match (keep_due, self.kept.front()) {
                (true, Some(oldest)) if self.kept.len() >= KEPT => oldest.clone(),
                (true, _) => format!("k{:05}", self.kept_total),
                (false, _) => format!("f{:02}", self.rng.below(FILES as u64)),
            };
            if self.model.unknown.contains(&name) {
                continue;
            }
            self.counts.busy_since[self.id].store(
                self.started.elapsed().as_millis() as u64 + 1,
                Ordering::SeqCst,
            );
            let exists = self.model.files.contains_key(&name);
            let (what, result) = match self.rng.below(100) {
                _ if keep_due => {
                    self.next_keep = Instant::now() + KEEP_EVERY;
                    if exists {
                        self.kept.pop_front();
                        ("delete", self.delete(&name))
                    } else {
                        self.kept.push_back(name.clone());
                        self.kept_total += 1;
                        ("keep", self.create_small(&name))
                    }
                }
                _ if !exists => ("create", self.create(&name)),
                0..=14 => ("create", self.create(&name)),
                15..=24 => ("replace", self.replace(&name)),
                25..=49 => ("overwrite", self.overwrite(&name)),
                50..=56 => ("delete", self.delete(&name)),
                57..=79 => ("read", self.read(&name, false)),
                _ => ("direct read", self.read(&name, true)),
            };
            self.counts.busy_since[self.id].store(0, Ordering::SeqCst);
            Counts::add(&self.counts.ops, 1);
            if let Err(e) = result {
                Counts::add(&self.counts.io_errors, 1);
                eprintln!(
                    "[{:6.1}s] worker {}: {what} {name}: {e}",
                    self.started.elapsed().as_secs_f64(),
                    self.id
                );
                self.forget(&name);
            }
        }
        self.model
    }

    fn path(&self, name: &str) -> PathBuf {
        self.model.dir.join(name)
    }

    fn forget(&mut self, name: &str) {
        self.model.files.remove(name);
        self.model.deleted.remove(name);
        self.model.unknown.insert(name.to_string());
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.model.dir)?.sync_all()?;
        Counts::add(&self.counts.fsyncs, 1);
        Ok(())
    }

    /// Records `data` as the file's content after `written` bytes went to it; not yet
    /// synced.
    fn wrote(&mut self, name: &str, data: Vec<u8>, written: usize) {
        Counts::add(&self.counts.bytes_written, written as u64);
        self.model.deleted.remove(name);
        let synced = self.model.files.get(name).and_then(|f| f.synced);
        self.model
            .files
            .insert(name.to_string(), FileModel { data, synced });
    }

    /// Records that the file's current content reached stable storage.
    fn synced(&mut self, name: &str) {
        Counts::add(&self.counts.fsyncs, 1);
        let f = self.model.files.get_mut(name).expect("a modelled file");
        f.synced = Some((xxh3_64(&f.data), Instant::now()));
    }

    /// Create (or truncate) and write a whole file, then fsync it and its directory.
    fn create(&mut self, name: &str) -> io::Result<()> {
        let len = self.rng.size();
        self.create_sized(name, len)
    }

    /// Like [`Worker::create`], with at most 64 KiB.
    fn create_small(&mut self, name: &str) -> io::Result<()> {
        let len = self.rng.below(64 << 10) as usize;
        self.create_sized(name, len)
    }

    fn create_sized(&mut self, name: &str, len: usize) -> io::Result<()> {
        let data = self.rng.bytes(len);
        let mut f = File::create(self.path(name))?;
        // Truncated: whatever happens next, the old content is gone.
        self.wrote(name, Vec::new(), 0);
        f.write_all(&data)?;
        self.wrote(name, data, len);
        f.sync_all()?;
        self.sync_dir()?;
        self.synced(name);
        Counts::add(&self.counts.creates, 1);
        Ok(())
    }

    /// Replace a file atomically: write a temporary file, fsync it, rename it over the
    /// name, fsync the directory.
    fn replace(&mut self, name: &str) -> io::Result<()> {
        let len = self.rng.size();
        let data = self.rng.bytes(len);
        let tmp = self.path(&format!("{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(name))?;
        self.wrote(name, data, len);
        self.sync_dir()?;
        self.synced(name);
        Counts::add(&self.counts.replaces, 1);
        Ok(())
    }

    /// Write a range at a random place, maybe past the end; fsync 60% of the time.
    fn overwrite(&mut self, name: &str) -> io::Result<()> {
        let mut data = self.model.files[name].data.clone();
        let offset = self.rng.below(data.len() as u64 + 1) as usize;
        let len = 1 + self.rng.below(64 << 10) as usize;
        let chunk = self.rng.bytes(len);
        let f = OpenOptions::new().write(true).open(self.path(name))?;
        f.write_all_at(&chunk, offset as u64)?;
        if data.len() < offset + len {
            data.resize(offset + len, 0);
        }
        data[offset..offset + len].copy_from_slice(&chunk);
        self.wrote(name, data, len);
        Counts::add(&self.counts.overwrites, 1);
        if self.rng.below(10) < 6 {
            f.sync_all()?;
            self.synced(name);
        }
        Ok(())
    }

    fn delete(&mut self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path(name))?;
        self.model.files.remove(name);
        self.sync_dir()?;
        self.model.deleted.insert(name.to_string());
        Counts::add(&self.counts.deletes, 1);
        Ok(())
    }

    /// Read the whole file and compare it with the model; with `direct`, by O_DIRECT, so
    /// that the bytes come through the loop device and dst, not from the page cache.
    fn read(&mut self, name: &str, direct: bool) -> io::Result<()> {
        let got = if direct {
            read_direct(&self.path(name), self.model.files[name].data.len())?
        } else {
            fs::read(self.path(name))?
        };
        Counts::add(&self.counts.reads, 1);
        if direct {
            Counts::add(&self.counts.direct_reads, 1);
        }
        let want = &self.model.files[name].data;
        if let Some(why) = differs(&got, want) {
            Counts::add(&self.counts.data_errors, 1);
            eprintln!(
                "[{:6.1}s] DATA ERROR: worker {} read {name}{}: {why}",
                self.started.elapsed().as_secs_f64(),
                self.id,
                if direct { " (O_DIRECT)" } else { "" }
            );
            self.forget(name);
        } else {
            Counts::add(&self.counts.bytes_verified, got.len() as u64);
        }
        Ok(())
    }
}

/// Reads a file of about `len` bytes with O_DIRECT into an aligned buffer.
fn read_direct(path: &Path, len: usize) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // A block more than expected, to see bytes that should not be there.
    let mut buf = AlignedBuf::zeroed(len.div_ceil(4096) * 4096 + 4096);
    let mut got = 0;
    loop {
        let n = f.read_at(&mut buf.as_mut_slice()[got..], got as u64)?;
        got += n;
        // Direct reads advance in whole blocks; a partial block is the end of the file.
        if n == 0 || got % 4096 != 0 || got == buf.as_slice().len() {
            break;
        }
    }
    Ok(buf.as_slice()[..got].to_vec())
}

/// Why `got` is not `want`, if it is not.
fn differs(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    Some(format!(
        "{} bytes, expected {}; first difference at {}",
        got.len(),
        want.len(),
        at.map_or("the end".to_string(), |at| format!("byte {at}"))
    ))
}

/// What the image holds, compared with the workers' models.
struct ImageCheck {
    files: usize,
    synced_before_last_fault: usize,
    deleted: usize,
    errors: Vec<String>,
}

fn check_image(root: &Path, models: &[Model], last_fault: Option<Instant>) -> ImageCheck {
    let mut check = ImageCheck {
        files: 0,
        synced_before_last_fault: 0,
        deleted: 0,
        errors: Vec::new(),
    };
    for (id, model) in models.iter().enumerate() {
        let dir = root.join(format!("t{id}"));
        for (name, f) in &model.files {
            let path = dir.join(name);
            match fs::read(&path) {
                Ok(got) => match differs(&got, &f.data) {
                    None => check.files += 1,
                    Some(why) => check.errors.push(format!("{}: {why}", path.display())),
                },
                Err(e) => check.errors.push(format!("{}: {e}", path.display())),
            }
            let unchanged_since = f
                .synced
                .filter(|(sum, _)| *sum == xxh3_64(&f.data))
                .map(|(_, at)| at);
            if let (Some(at), Some(fault)) = (unchanged_since, last_fault) {
                if at < fault {
                    check.synced_before_last_fault += 1;
                }
            }
        }
        for name in &model.deleted {
            match dir.join(name).try_exists() {
                Ok(false) => check.deleted += 1,
                _ => check.errors.push(format!(
                    "{}: deleted, yet present",
                    dir.join(name).display()
                )),
            }
        }
        // Nothing else may be there, except what an I/O error left unknown.
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let known = model.files.contains_key(&name)
                    || model.unknown.contains(&name)
                    || model.unknown.contains(name.trim_end_matches(".tmp"));
                if !known {
                    check
                        .errors
                        .push(format!("{}: unexpected file", dir.join(&name).display()));
                }
            }
        }
    }
    check
}

// ---------------------------------------------------------------------------------------
// The fault schedule

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// SIGKILL the server, wait a second, start it again on the same address.
    KillRestart,
    /// Close every connection at once.
    Cut,
    /// Forward nothing for 4 seconds.
    Stall,
    /// 300 ms more latency each way for 3 seconds.
    Delay,
    /// Refuse new connections for 2 seconds, after cutting the current ones.
    Refuse,
    /// A flipped ciphertext byte: the receiver rejects the record.
    Flip(Direction),
    /// The connection ends in the middle of a record.
    CutMid(Direction),
    /// Three replies vanish.
    DropReplies,
    /// Two requests arrive twice: the server executes, then rejects the copy.
    Duplicate,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |d: &Direction| match d {
            Direction::ToServer => "to server",
            Direction::ToClient => "to client",
        };
        match self {
            Kind::KillRestart => write!(f, "kill -9 + restart"),
            Kind::Cut => write!(f, "cut"),
            Kind::Stall => write!(f, "stall 4s"),
            Kind::Delay => write!(f, "delay 300ms for 3s"),
            Kind::Refuse => write!(f, "cut + refuse 2s"),
            Kind::Flip(d) => write!(f, "flip byte {}", dir(d)),
            Kind::CutMid(d) => write!(f, "cut mid-record {}", dir(d)),
            Kind::DropReplies => write!(f, "drop 3 replies"),
            Kind::Duplicate => write!(f, "duplicate 2 requests"),
        }
    }
}

impl Kind {
    /// Whether this fault ends the client's connection.
    fn disconnects(self) -> bool {
        !matches!(self, Kind::Stall | Kind::Delay)
    }
}

/// The order faults come in; repeated as long as the run lasts.
const SCHEDULE: [Kind; 12] = [
    Kind::KillRestart,
    Kind::Stall,
    Kind::Flip(Direction::ToServer),
    Kind::Cut,
    Kind::Delay,
    Kind::Flip(Direction::ToClient),
    Kind::KillRestart,
    Kind::CutMid(Direction::ToServer),
    Kind::DropReplies,
    Kind::Duplicate,
    Kind::Refuse,
    Kind::CutMid(Direction::ToClient),
];

struct FaultRun<'a> {
    s: &'a Setup,
    server: &'a mut ServerProcess,
    server_args: &'a [&'a str],
    addr: SocketAddr,
    proxy: &'a Proxy,
    counts: &'a Counts,
    stop: &'a AtomicBool,
    started: Instant,
    length: Duration,
    dst_pid: i32,
}

/// What the schedule did.
#[derive(Default)]
struct Faults {
    by_kind: BTreeMap<String, u64>,
    injected: u64,
    /// One-shot faults that found no traffic to hit within 10 seconds.
    unfired: u64,
    /// Injected faults that end connections.
    disconnecting: u64,
    last_start: Option<Instant>,
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} faults injected:", self.injected)?;
        for (i, (kind, n)) in self.by_kind.iter().enumerate() {
            write!(f, "{} {n} {kind}", if i == 0 { "" } else { "," })?;
        }
        if self.unfired > 0 {
            write!(f, " ({} one-shot faults found no traffic)", self.unfired)?;
        }
        Ok(())
    }
}

/// Injects faults from a few seconds in until shortly before the end, then waits out the
/// quiet end. Returns what it did, or a description of a hang: then dst-mount has been
/// killed so that blocked workers return.
fn inject_faults(mut r: FaultRun<'_>) -> Result<Faults, String> {
    let mut faults = Faults::default();
    let quiet = (r.length / 10).max(Duration::from_secs(15));
    let faults_end = r.started + r.length.saturating_sub(quiet);
    let mut rng = Rng(0xFA17);
    let mut next = r.started + Duration::from_secs(5);
    for kind in SCHEDULE.iter().copied().cycle() {
        r.pause_until(next)?;
        if Instant::now() >= faults_end || r.stop.load(Ordering::SeqCst) {
            break;
        }
        let at = r.started.elapsed().as_secs_f64();
        faults.last_start = Some(Instant::now());
        let fired = r.inject(kind)?;
        println!(
            "[{at:6.1}s] {kind}{}",
            if fired { "" } else { ": no traffic, withdrawn" }
        );
        if fired {
            faults.injected += 1;
            *faults.by_kind.entry(kind.to_string()).or_default() += 1;
            if kind.disconnects() {
                faults.disconnecting += 1;
            }
        } else {
            faults.unfired += 1;
        }
        next = Instant::now() + Duration::from_millis(3000 + rng.below(3000));
    }
    r.pause_until(r.started + r.length)?;
    Ok(faults)
}

impl FaultRun<'_> {
    /// Sleeps until `until`, watching for a hung worker.
    fn pause_until(&self, until: Instant) -> Result<(), String> {
        while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
            if let Some((id, busy)) = self.counts.hung(self.started, HANG) {
                // Unblock the workers: without dst-mount their I/O fails at once.
                kill(self.dst_pid, libc::SIGKILL);
                self.stop.store(true, Ordering::SeqCst);
                return Err(format!(
                    "worker {id}'s operation has not returned in {busy:?}; killed dst-mount"
                ));
            }
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
        Ok(())
    }

    fn pause(&self, d: Duration) -> Result<(), String> {
        self.pause_until(Instant::now() + d)
    }

    /// Injects one fault and waits until it is over; false if a one-shot fault found no
    /// traffic to hit.
    fn inject(&mut self, kind: Kind) -> Result<bool, String> {
        let p = self.proxy;
        match kind {
            Kind::KillRestart => {
                self.server.stop(libc::SIGKILL);
                self.pause(Duration::from_secs(1))?;
                wait_for_port(self.addr);
                *self.server = self.s.server_at(self.addr, self.server_args);
            }
            Kind::Cut => p.cut_all(),
            Kind::Stall => {
                p.set_fault(Fault::Stall);
                let r = self.pause(Duration::from_secs(4));
                p.set_fault(Fault::None);
                r?;
            }
            Kind::Delay => {
                p.set_fault(Fault::Delay(Duration::from_millis(300)));
                let r = self.pause(Duration::from_secs(3));
                p.set_fault(Fault::None);
                r?;
            }
            Kind::Refuse => {
                p.set_fault(Fault::RefuseNew);
                p.cut_all();
                let r = self.pause(Duration::from_secs(2));
                p.set_fault(Fault::None);
                r?;
            }
            Kind::Flip(d) => return self.one_shot(Fault::FlipByte(d)),
            Kind::CutMid(d) => return self.one_shot(Fault::CutMidRecord(d)),
            Kind::DropReplies => return self.one_shot(Fault::DropToClient(3)),
            Kind::Duplicate => return self.one_shot(Fault::DuplicateToServer(2)),
        }
        Ok(true)
    }

    /// Sets a one-shot fault and waits up to 10 seconds for it to fire.
    fn one_shot(&self, fault: Fault) -> Result<bool, String> {
        self.proxy.set_fault(fault);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.proxy.fault() != Fault::None && Instant::now() < deadline {
            self.pause(Duration::from_millis(20))?;
        }
        if self.proxy.fault() == Fault::None {
            return Ok(true);
        }
        self.proxy.set_fault(Fault::None);
        Ok(false)
    }
}

/// Waits until `addr` can be bound again (a killed server's socket is gone).
fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpListener::bind(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} stays in use");
        std::thread::sleep(Duration::from_millis(50));
    }
}
