//! Network RAID, end to end, as root: btrfs RAID1 (data and metadata) over two dst exports
//! served by two `dst-server` processes, each mounted with `dst-mount --fail-fast` and
//! attached as a loop device with direct I/O.
//!
//! - One export node is killed for good: I/O to it fails within seconds, the array carries
//!   on degraded (writes go on, reads return the right data from either mirror), a fresh
//!   node replaces it with `btrfs replace`, and `btrfs scrub` finds every copy good.
//! - One export node is away for a while and comes back at the same address: its dst-mount
//!   reconnects by itself, and `btrfs scrub` copies to it what it missed.
//!
//! Either way every file's checksum is the same before and after, the filesystem passes
//! `btrfs check`, and the member that was rebuilt holds every file on its own (mounted
//! degraded without the other).
//!
//! Without root, /dev/fuse, loop devices or btrfs-progs, the tests say why and pass without
//! running. Every server, mount and loop device is held by a guard that undoes it on drop,
//! so a failing test leaves nothing behind; guards are dropped in reverse order of setup.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::{output, run, unmount_quietly, wait_until, AlignedBuf, DstMount, Loop};
use common::{pattern, ServerProcess, Setup};

const IMAGE_SIZE: &str = "512M";

/// The arguments of an export node that serves `disk` from `IMAGE.img` in the setup's
/// directory, creating it as a sparse image if it is missing.
fn export_args(image: &str) -> Vec<String> {
    [
        "--export",
        &format!("disk={image}.img"),
        "--create-size",
        IMAGE_SIZE,
    ]
    .map(String::from)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// One member of the array: an export node, its dst mount and a loop device on the export's
/// file. Fields drop in declaration order: loop device, then mount, then server.
struct Member {
    dev: Loop,
    mount: DstMount,
    server: ServerProcess,
}

impl Member {
    /// A new export node with a new image `name`.img, mounted with `mount_args` at node-`name`.
    fn start(s: &Setup, name: &str, mount_args: &[&str]) -> Member {
        let server = s.server(&strs(&export_args(name)));
        let mount = DstMount::start(s, &server, &s.path(&format!("node-{name}")), mount_args);
        let dev = Loop::attach(&mount.file(), &["--direct-io=on"]);
        Member { dev, mount, server }
    }
}

/// A mounted btrfs; on drop unmounted (lazily if a dead member keeps it busy), and its
/// devices dropped from the kernel's list of btrfs devices, so that nothing refers to loop
/// devices that are about to be detached.
struct Btrfs {
    dir: PathBuf,
    devices: Vec<String>,
}

impl Btrfs {
    /// mkfs.btrfs -d raid1 -m raid1 over `devices`, mounted at `dir`.
    fn make_raid1(devices: &[&str], dir: &Path) -> Btrfs {
        let mut args = vec!["-q", "-f", "-d", "raid1", "-m", "raid1"];
        args.extend(devices);
        run("mkfs.btrfs", &args);
        let fs = Btrfs::mount(devices, dir, "");
        let df = fs.btrfs(&["filesystem", "df"]);
        assert!(
            df.contains("Data, RAID1") && df.contains("Metadata, RAID1"),
            "{df}"
        );
        fs
    }

    /// Mounts the btrfs of `devices` (the first one names it) with `options`.
    fn mount(devices: &[&str], dir: &Path, options: &str) -> Btrfs {
        fs::create_dir_all(dir).unwrap();
        let mut all: Vec<String> = devices[1..].iter().map(|d| format!("device={d}")).collect();
        if !options.is_empty() {
            all.push(options.to_string());
        }
        let mut args = vec!["-t", "btrfs"];
        let joined = all.join(",");
        if !joined.is_empty() {
            args.extend(["-o", &joined]);
        }
        args.extend([devices[0], dir.to_str().unwrap()]);
        run("mount", &args);
        Btrfs {
            dir: dir.to_path_buf(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn arg(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// `btrfs SUBCOMMAND... MOUNTPOINT` to success; its stdout.
    fn btrfs(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.push(self.arg());
        run("btrfs", &all)
    }

    /// The device id of `dev` in this filesystem, from `btrfs filesystem show`.
    fn devid(&self, dev: &str) -> String {
        let show = self.btrfs(&["filesystem", "show"]);
        show.lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f.first() == Some(&"devid") && f.last() == Some(&dev)).then(|| f[1].to_string())
            })
            .unwrap_or_else(|| panic!("{dev} is not in the filesystem:\n{show}"))
    }

    /// `btrfs device stats` as (device, counter) -> value.
    fn device_stats(&self) -> BTreeMap<(String, String), u64> {
        self.btrfs(&["device", "stats"])
            .lines()
            .filter_map(|line| {
                // [/dev/loop1].write_io_errs    13
                let (key, value) = line.split_once(char::is_whitespace)?;
                let (dev, counter) = key.strip_prefix('[')?.split_once("].")?;
                Some((
                    (dev.to_string(), counter.to_string()),
                    value.trim().parse().ok()?,
                ))
            })
            .collect()
    }

    /// The sum of `btrfs device stats` error counters of `dev`.
    fn errors(&self, dev: &str) -> u64 {
        self.device_stats()
            .iter()
            .filter(|((d, _), _)| d == dev)
            .map(|(_, v)| v)
            .sum()
    }

    /// Writes files (see [`write_files`]) and syncs this filesystem.
    fn write_files(&self, prefix: &str, count: usize, seed: u64) -> Sums {
        let sums = write_files(&self.dir, prefix, count, seed);
        self.sync();
        sums
    }

    fn sync(&self) {
        let dir = File::open(&self.dir).unwrap();
        // SAFETY: syncfs on an open descriptor.
        let synced = unsafe { libc::syncfs(dir.as_raw_fd()) };
        assert_eq!(synced, 0, "syncfs: {}", std::io::Error::last_os_error());
    }

    /// Checksums of every file in `sums`, read back from the disk from both mirrors,
    /// equal `sums`; and no other files exist.
    fn check_files(&self, sums: &Sums, when: &str) {
        let names: Vec<String> = sums.keys().cloned().collect();
        for (mirror, read) in read_sums_from_both_mirrors(self, &names).iter().enumerate() {
            assert_eq!(read, sums, "{when}: reader {mirror}");
        }
        assert_eq!(
            fs::read_dir(&self.dir).unwrap().count(),
            sums.len(),
            "{when}"
        );
    }

    /// Unmounts, now, to success.
    fn unmount(&mut self) {
        run("umount", &[self.arg()]);
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        unmount_quietly(&self.dir);
        for dev in &self.devices {
            let _ = output("btrfs", &["device", "scan", "--forget", dev]);
        }
    }
}

/// xxh3-128 of each file, by name.
type Sums = BTreeMap<String, u128>;

/// Writes `count` files of pseudo-random data (4 KiB to 4 MiB) named `prefix`N; returns the
/// checksums of what was written.
fn write_files(root: &Path, prefix: &str, count: usize, seed: u64) -> Sums {
    let mut sums = Sums::new();
    for i in 0..count {
        let len = (4096usize << (i % 11)).min(4 << 20) + i * 1000;
        let data = pattern(len, seed.wrapping_add(i as u64));
        let name = format!("{prefix}{i}");
        File::create(root.join(&name))
            .unwrap()
            .write_all(&data)
            .unwrap();
        sums.insert(name, xxhash_rust::xxh3::xxh3_128(&data));
    }
    sums
}

/// Reads every file in `names` from the disk, once from a thread with an even and once from
/// one with an odd thread id, dropping the caches before each. btrfs picks the RAID1 mirror
/// to read by the reader's pid (its default read policy), so between them the two readers
/// read from both mirrors.
fn read_sums_from_both_mirrors(fs: &Btrfs, names: &[String]) -> [Sums; 2] {
    let read = |parity: i32| -> Sums {
        for _ in 0..1000 {
            let root = fs.dir.clone();
            let names = names.to_vec();
            let sums = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                if unsafe { libc::gettid() } % 2 != parity {
                    return None;
                }
                let mut sums = Sums::new();
                for name in names {
                    let data = fs::read(root.join(&name))
                        .unwrap_or_else(|e| panic!("reading {name}: {e}"));
                    sums.insert(name, xxhash_rust::xxh3::xxh3_128(&data));
                }
                Some(sums)
            })
            .join()
            .unwrap();
            if let Some(sums) = sums {
                return sums;
            }
        }
        panic!("no thread with a thread id of parity {parity}");
    };
    fs.sync();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let even = read(0);
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let odd = read(1);
    [even, odd]
}

/// After the array is unmounted: `btrfs check` passes, then `alone` (a loop device of the
/// array), mounted degraded and read-only with `other` detached and forgotten, holds every
/// file of `sums` on its own.
fn check_unmounted_array(s: &Setup, alone: &Loop, other: Loop, sums: &Sums) {
    let out = output("btrfs", &["check", "--readonly", &alone.dev]);
    assert!(
        out.status.success(),
        "btrfs check found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let other_dev = other.dev.clone();
    drop(other);
    let _ = output("btrfs", &["device", "scan", "--forget", &other_dev]);
    let one = Btrfs::mount(&[&alone.dev], &s.path("alone"), "degraded,ro");
    let show = one.btrfs(&["filesystem", "show"]);
    assert!(
        show.to_lowercase().contains("missing"),
        "the other member is in use:\n{show}"
    );
    one.check_files(sums, "one member alone");
}

/// `dst-mount --status MOUNTPOINT`: exit success, stdout and stderr.
fn status(dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dst-mount"))
        .arg("--status")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value column of `label` in `dst-mount --status` output.
fn status_value<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            let rest = l.trim_start().strip_prefix(label)?;
            rest.starts_with("  ").then(|| rest.trim())
        })
        .unwrap_or_else(|| panic!("no '{label}' in:\n{text}"))
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).unwrap();
    u64::from_le_bytes(seed)
}

/// Prints a step with the time since `started`.
fn step(started: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
}

#[test]
fn btrfs_raid1_survives_a_dead_export_node_and_is_rebuilt() {
    require!("mkfs.btrfs", "btrfs", "losetup");
    let t0 = Instant::now();
    let s = Setup::new();
    let seed = random_seed();

    step(
        t0,
        "two export nodes, each mounted --fail-fast, each a loop device",
    );
    let a = Member::start(&s, "a", &["--fail-fast"]);
    let mut b = Member::start(&s, "b", &["--fail-fast"]);
    // The replacement, declared here so that it is dropped after the filesystem.
    let c: Member;
    let log = b.mount.log();
    assert!(
        log.contains("fail-fast profile: resend timeout 1s, resend count 3, ping interval 1s"),
        "{log}"
    );

    step(t0, "mkfs.btrfs -d raid1 -m raid1, mount, write files");
    let mut fs = Btrfs::make_raid1(&[&a.dev.dev, &b.dev.dev], &s.path("data"));
    let mut sums = fs.write_files("before-", 12, seed);
    fs.check_files(&sums, "before any failure");
    let dead_devid = fs.devid(&b.dev.dev);

    let (ok, text, err) = status(&b.mount.dir);
    assert!(ok, "dst-mount --status failed: {err}");
    assert_eq!(status_value(&text, "connected"), "yes", "{text}");
    assert!(text.contains(" MiB"), "bytes for people:\n{text}");
    assert!(text.contains(" ms"), "latencies in ms:\n{text}");

    step(t0, "SIGKILL export node B, for good");
    b.server.stop(libc::SIGKILL);

    // The fail-fast profile: I/O to the dead node fails within seconds (1 s x 4), where
    // the default profile would wait 65 s.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(b.mount.file())
        .unwrap();
    let mut buf = AlignedBuf::zeroed(4096);
    let t = Instant::now();
    let err = file
        .read_at(buf.as_mut_slice(), 0)
        .expect_err("a read from a dead export node");
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        waited < Duration::from_secs(15),
        "with --fail-fast a dead node's read should fail in about 4 s, took {waited:?}"
    );
    drop(file);
    step(
        t0,
        &format!("a read from it failed with EIO after {waited:.1?}"),
    );
    let (ok, text, err) = status(&b.mount.dir);
    assert!(ok, "dst-mount --status failed: {err}");
    assert_eq!(status_value(&text, "connected"), "no", "{text}");
    assert_ne!(status_value(&text, "failures"), "0", "{text}");

    // btrfs RAID1 tolerates one failing mirror: a write completes once one copy is
    // written, and the errors on the other are counted in `btrfs device stats`.
    let t = Instant::now();
    sums.extend(fs.write_files("degraded-", 3, seed ^ 0xdead));
    step(
        t0,
        &format!(
            "writes go on: 3 files written and synced in {:.1?}",
            t.elapsed()
        ),
    );
    assert!(
        fs.errors(&b.dev.dev) > 0,
        "no errors counted on the dead member"
    );
    assert_eq!(
        fs.errors(&a.dev.dev),
        0,
        "errors counted on the good member"
    );

    // Stopping the dead node's dst-mount makes I/O to its loop device fail at once
    // (ENOTCONN) instead of after each resend window, so btrfs stops waiting on it: the
    // operator's step once a node is known to be gone.
    let t = Instant::now();
    let exit = b.mount.signal(libc::SIGTERM);
    assert!(exit.success(), "dst-mount: {exit}\n{}", b.mount.log());
    step(
        t0,
        &format!(
            "the dead node's dst-mount exited on SIGTERM after {:.1?}",
            t.elapsed()
        ),
    );
    let (ok, _, err) = status(&b.mount.dir);
    assert!(!ok, "--status on a mount that is gone succeeded");
    assert!(err.contains("not a dst mount"), "{err}");

    step(t0, "reads from both mirrors return the data");
    fs.check_files(&sums, "with node B dead");

    step(
        t0,
        "a fresh node C with a fresh image, mounted -o fail_fast; btrfs replace",
    );
    c = Member::start(&s, "c", &["-o", "fail_fast"]);
    fs.devices.push(c.dev.dev.clone());
    // -r: read only from the good mirror, never from the dead device.
    fs.btrfs(&["replace", "start", "-B", "-r", &dead_devid, &c.dev.dev]);
    let show = fs.btrfs(&["filesystem", "show"]);
    assert_eq!(fs.devid(&c.dev.dev), dead_devid, "{show}");
    assert!(
        !show.contains(&format!("{} ", b.dev.dev)) && !show.contains("missing"),
        "{show}"
    );
    let Member { dev: dead_dev, .. } = b;
    let _ = output("btrfs", &["device", "scan", "--forget", &dead_dev.dev]);
    drop(dead_dev);

    step(t0, "btrfs scrub: every copy of every block checks out");
    fs.btrfs(&["scrub", "start", "-B"]);
    let stats = fs.device_stats();
    assert!(
        stats.values().all(|&v| v == 0),
        "errors after replace and scrub: {stats:?}"
    );
    let df = fs.btrfs(&["filesystem", "df"]);
    assert!(
        !df.contains("Data, single") && !df.contains("Metadata, single"),
        "{df}"
    );
    fs.check_files(&sums, "after the rebuild");

    step(
        t0,
        "unmount; btrfs check; the new member alone holds every file",
    );
    fs.unmount();
    let Member { dev: dev_a, .. } = a;
    check_unmounted_array(&s, &c.dev, dev_a, &sums);
    step(t0, "done");
}

#[test]
fn btrfs_raid1_member_back_from_an_outage_is_caught_up_by_scrub() {
    require!("mkfs.btrfs", "btrfs", "losetup");
    let t0 = Instant::now();
    let s = Setup::new();
    let seed = random_seed();

    step(
        t0,
        "two export nodes, each mounted --fail-fast; btrfs RAID1",
    );
    let a = Member::start(&s, "a", &["--fail-fast"]);
    let mut b = Member::start(&s, "b", &["--fail-fast"]);
    let mut fs = Btrfs::make_raid1(&[&a.dev.dev, &b.dev.dev], &s.path("data"));
    let mut sums = fs.write_files("before-", 8, seed);

    step(t0, "node B away (SIGKILL); writes go on without it");
    let addr = b.server.addr;
    b.server.stop(libc::SIGKILL);
    sums.extend(fs.write_files("outage-", 3, seed ^ 0xa3a7));
    assert!(
        fs.errors(&b.dev.dev) > 0,
        "no errors counted on the member away"
    );

    step(
        t0,
        "node B back at the same address, with its image; dst-mount reconnects",
    );
    b.server = s.server_at(addr, &strs(&export_args("b")));
    wait_until("the reconnect", Duration::from_secs(60), || {
        b.mount.log().contains("reconnected to")
    });
    let (ok, text, err) = status(&b.mount.dir);
    assert!(ok, "dst-mount --status failed: {err}");
    assert_eq!(status_value(&text, "connected"), "yes", "{text}");
    let t = Instant::now();
    sums.extend(fs.write_files("after-", 3, seed ^ 0xbac));
    step(
        t0,
        &format!(
            "writes reach both members again: synced in {:.1?}",
            t.elapsed()
        ),
    );

    step(
        t0,
        "btrfs scrub copies what B missed; a second scrub finds nothing",
    );
    fs.btrfs(&["scrub", "start", "-B"]);
    fs.btrfs(&["device", "stats", "-z"]);
    fs.btrfs(&["scrub", "start", "-B"]);
    let stats = fs.device_stats();
    assert!(
        stats.values().all(|&v| v == 0),
        "errors after the scrub: {stats:?}"
    );
    fs.check_files(&sums, "after the scrub");

    step(t0, "unmount; btrfs check; member B alone holds every file");
    fs.unmount();
    let Member { dev: dev_a, .. } = a;
    check_unmounted_array(&s, &b.dev, dev_a, &sums);
    step(t0, "done");
}

/// `--status` refuses what is not a dst mount, and needs no root for that.
#[test]
fn status_refuses_what_is_not_a_dst_mount() {
    for dir in ["/", "/no/such/dir"] {
        let (ok, out, err) = status(Path::new(dir));
        assert!(!ok, "--status {dir} succeeded: {out}");
        assert!(err.contains("is not a dst mount"), "{err}");
    }
}
