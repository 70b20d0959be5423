//! Soak of takeovers: dst-mount is killed and started again with the same key, round after
//! round, while the export's disk stalls under writes the killed client left queued and
//! executing on the export node. Each new dst-mount opens a new session that takes over
//! from the old one; the old session's requests must never land after the new one's.
//!
//! Several writer threads write 4 KiB blocks through the mount, each thread its own blocks,
//! so every block's writes are ordered. A write that returned is acked; one that failed
//! because its dst-mount was killed is in doubt, and its block is the first one written
//! through the next dst-mount. At the end every block holds its last acked
//! write, or one of the in-doubt writes after it: never an older one (the old session's
//! write run late) and never anything else. No write fails while no dst-mount is killed.
//!
//! The export's disk is a file on a second dst mount whose server the test stops
//! (SIGSTOP) and continues: I/O on it waits as on a hung disk. As root with /dev/fuse;
//! otherwise it says why and passes without running. `DST_TAKEOVER_ROUNDS` sets the number
//! of takeovers (default 8):
//!
//! ```text
//! cargo test --release --test takeover -- --nocapture
//! ```

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::{kill, output, wait_until, DstMount};
use common::{connect, pattern, Setup};
use dst::protocol::Access;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 256;
const WRITERS: u64 = 4;

/// What a block holds: a write's seed in its first 8 bytes, the pattern of that seed after.
fn block(seed: u64) -> Vec<u8> {
    let mut data = pattern(BLOCK, seed);
    data[..8].copy_from_slice(&seed.to_le_bytes());
    data
}

/// The seed of the write a block holds, or None for anything no writer wrote (zeroes are
/// Some(0) only if the block was never written, which the check tells apart).
fn seed_of(data: &[u8]) -> Option<u64> {
    let seed = u64::from_le_bytes(data[..8].try_into().unwrap());
    (seed == 0 && data.iter().all(|&b| b == 0) || block(seed) == data).then_some(seed)
}

/// One block's writes, oldest first: its seed, and whether it was acked.
type History = Vec<(u64, bool)>;

/// Shared between the test and its writers.
struct Run {
    /// The current dst-mount's file and its generation; None while there is none.
    file: Mutex<Option<(u64, PathBuf)>>,
    /// Set from just before a dst-mount is killed until its successor is up.
    killing: AtomicBool,
    stop: AtomicBool,
    acked: AtomicU64,
    in_doubt: AtomicU64,
    /// Writes that failed while no dst-mount was being killed.
    unexpected: Mutex<Vec<String>>,
}

impl Run {
    /// The current file, once it belongs to a generation after `seen`.
    fn file_after(&self, seen: u64) -> Option<(u64, File)> {
        while !self.stop.load(Ordering::SeqCst) {
            if let Some((gen, path)) = self.file.lock().unwrap().clone() {
                if gen > seen {
                    match OpenOptions::new().read(true).write(true).open(&path) {
                        Ok(f) => return Some((gen, f)),
                        Err(e) if self.killing.load(Ordering::SeqCst) => drop(e),
                        Err(e) => self.unexpected.lock().unwrap().push(format!("open: {e}")),
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn writer(run: &Run, id: u64) -> BTreeMap<u64, History> {
    let mut history: BTreeMap<u64, History> = BTreeMap::new();
    let mut rng = id * 7919 + 1;
    let mut n = 0u64;
    let Some((mut gen, mut file)) = run.file_after(0) else {
        return history;
    };
    // After a takeover, the block whose write is in doubt is written again first, as a
    // filesystem rewrites what it could not write: the old session's write must not land
    // after it.
    let mut again = None;
    while !run.stop.load(Ordering::SeqCst) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let index = again
            .take()
            .unwrap_or((rng % (BLOCKS / WRITERS)) * WRITERS + id);
        n += 1;
        let seed = (id << 48) | n;
        let result = file.write_all_at(&block(seed), index * BLOCK as u64);
        history
            .entry(index)
            .or_default()
            .push((seed, result.is_ok()));
        match result {
            Ok(()) => {
                run.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                run.in_doubt.fetch_add(1, Ordering::Relaxed);
                let current = run.file.lock().unwrap().as_ref().map(|(g, _)| *g);
                if !run.killing.load(Ordering::SeqCst) && current == Some(gen) {
                    let why = format!("writer {id}: write of block {index} failed: {e}");
                    run.unexpected.lock().unwrap().push(why);
                }
                again = Some(index);
                match run.file_after(gen) {
                    Some(next) => (gen, file) = next,
                    None => break,
                }
            }
        }
    }
    history
}

/// A small deterministic random number generator for the schedule.
struct Schedule(u64);

impl Schedule {
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(from + self.0 % (to - from))
    }
}

#[test]
fn takeovers_while_the_disk_stalls_never_bring_old_data_back() {
    require!();
    let rounds: usize = std::env::var("DST_TAKEOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let lower = Setup::new();
    let lower_server = lower.server(&["--export", "disk=lower.img", "--create-size", "64M"]);
    let mut lower_mount = DstMount::start(&lower, &lower_server, &lower.path("mnt"), &[]);
    let s = Setup::new();
    let export = format!("disk={}", lower_mount.file().display());
    let server = s.server(&["--export", &export]);
    let dir = s.path("mnt");

    let run = Arc::new(Run {
        file: Mutex::new(None),
        killing: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        in_doubt: AtomicU64::new(0),
        unexpected: Mutex::new(Vec::new()),
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| {
            let run = run.clone();
            std::thread::spawn(move || writer(&run, id))
        })
        .collect();
    // Writers are stopped and joined even if a round fails, before the mounts go.
    struct StopWriters(Arc<Run>);
    impl Drop for StopWriters {
        fn drop(&mut self) {
            self.0.stop.store(true, Ordering::SeqCst);
        }
    }
    let stop_writers = StopWriters(run.clone());

    let mut schedule = Schedule(0x5eed);
    let started = Instant::now();
    let mut mount = DstMount::start(&s, &server, &dir, &[]);
    *run.file.lock().unwrap() = Some((1, mount.file()));
    for round in 1..=rounds {
        std::thread::sleep(schedule.millis(300, 1500));
        // The disk hangs with writes on it and behind it; then the client dies.
        common::stop_process(lower_server.pid());
        std::thread::sleep(schedule.millis(100, 400));
        run.killing.store(true, Ordering::SeqCst);
        mount.signal(libc::SIGKILL);
        // The writers still hold files of the dead mount open: detach it lazily.
        output("umount", &["-l", dir.to_str().unwrap()]);
        drop(mount);
        // The disk comes back while, or before, the new client takes over.
        let resume = lower_server.pid();
        let stall = schedule.millis(100, 2500);
        let continued = std::thread::spawn(move || {
            std::thread::sleep(stall);
            kill(resume, libc::SIGCONT);
        });
        mount = DstMount::start(&s, &server, &dir, &[]);
        continued.join().unwrap();
        *run.file.lock().unwrap() = Some((round as u64 + 1, mount.file()));
        run.killing.store(false, Ordering::SeqCst);
        eprintln!(
            "round {round}: took over after a {stall:?} stall; {} writes acked, {} in doubt so far",
            run.acked.load(Ordering::Relaxed),
            run.in_doubt.load(Ordering::Relaxed)
        );
    }
    // The writers go on through the last mount before they stop.
    let acked = run.acked.load(Ordering::Relaxed);
    wait_until(
        "writes through the last mount",
        Duration::from_secs(30),
        || run.acked.load(Ordering::Relaxed) >= acked + 20,
    );
    drop(stop_writers);
    let mut history: BTreeMap<u64, History> = BTreeMap::new();
    for w in writers {
        history.extend(w.join().expect("a writer panicked"));
    }
    mount.unmount();
    eprintln!(
        "{rounds} takeovers in {:?}: {} writes acked, {} in doubt",
        started.elapsed(),
        run.acked.load(Ordering::Relaxed),
        run.in_doubt.load(Ordering::Relaxed)
    );
    let unexpected = run.unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "writes failed with no client killed: {unexpected:?}"
    );

    // Read back through a session of its own, after every writer's has ended.
    let mut c = connect(&s.client(&server, "disk", Access::ReadOnly));
    let mut errors = Vec::new();
    for (&index, writes) in &history {
        let data = smol::block_on(c.read(index * BLOCK as u64, BLOCK as u32)).unwrap();
        let last_acked = writes.iter().rposition(|&(_, ok)| ok);
        let allowed: Vec<u64> = match last_acked {
            Some(i) => writes[i..].iter().map(|&(seed, _)| seed).collect(),
            // Nothing acked: never written, or any of its writes.
            None => std::iter::once(0)
                .chain(writes.iter().map(|&(s, _)| s))
                .collect(),
        };
        match seed_of(&data) {
            Some(seed) if allowed.contains(&seed) => {}
            found => errors.push(format!(
                "block {index}: holds {found:x?}, expected one of {allowed:x?} (writes {writes:x?})"
            )),
        }
    }
    assert!(
        errors.is_empty(),
        "{} blocks wrong:\n{}",
        errors.len(),
        errors.join("\n")
    );
    let log = server.log();
    let fenced = log
        .matches("replaced by a new one of the same client")
        .count()
        + log.matches("expired;").count();
    eprintln!(
        "{} blocks checked; the server fenced {fenced} sessions, waited {} times",
        history.len(),
        log.matches("the new session waited").count()
    );
    assert!(
        fenced >= rounds,
        "the server fenced {fenced} sessions in {rounds} takeovers:\n{log}"
    );
    drop(c);
    lower_mount.signal(libc::SIGTERM);
}
