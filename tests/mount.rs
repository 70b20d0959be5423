//! dst-mount end to end, as root with /dev/fuse and loop devices: a real dst-server, a real
//! FUSE mount, loop devices with direct I/O and real filesystems on them, checked against the
//! server's image afterwards. Without root, /dev/fuse, loop devices or the tools a test needs,
//! the test says why and passes without running.
//!
//! Every mount, loop device and process is held by a guard that undoes it on drop, so a
//! failing test leaves nothing behind. Guards are declared in setup order and so dropped in
//! reverse: filesystem, loop device, dst mount, server. The guards for dst mounts and loop
//! devices are shared with other tests, in `common::mount`.

mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::{
    check_files, kill, mount_entry, mounted_type, run, unmount_quietly, wait_until, which,
    write_files, AlignedBuf, DstMount, FsMount, Loop,
};
use common::{allocated_blocks, pattern, Setup};

const MIB: u64 = 1 << 20;

fn mounted_options(dir: &Path) -> String {
    mount_entry(dir).map(|f| f[3].clone()).unwrap_or_default()
}

/// Files of pseudo-random data: (path relative to the filesystem, length, seed).
fn file_set() -> Vec<(String, usize, u64)> {
    let mut files = vec![
        ("empty".to_string(), 0, 1),
        ("one-byte".to_string(), 1, 2),
        ("page".to_string(), 4096, 3),
        ("page-less-one".to_string(), 4095, 4),
        ("dir/a/odd".to_string(), MIB as usize + 3, 5),
        ("dir/big".to_string(), 12 * MIB as usize, 6),
    ];
    for i in 0..10u64 {
        let len = (pattern(8, 100 + i)
            .iter()
            .fold(0usize, |a, b| a * 256 + *b as usize))
            % (3 * MIB as usize);
        files.push((format!("dir/many/f{i}"), len, 10 + i));
    }
    files
}

/// The whole path: a filesystem made and filled through dst-mount and a loop device with
/// direct I/O, then found intact in the server's image.
fn end_to_end(fstype: &str, size: &str, mkfs: &[&str], fsck: &[&str]) {
    let s = Setup::new();
    let mut server = s.server(&["--export", "disk=disk.img", "--create-size", size]);
    let files = file_set();
    {
        let mut m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
        {
            let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
            assert_eq!(lo.sys("loop/dio"), "1", "the loop device uses direct I/O");
            let mut args = mkfs.to_vec();
            args.push(&lo.dev);
            run(mkfs[0], &args[1..]);
            let fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");
            write_files(&fsm.dir, &files);
            run("sync", &["-f", fsm.dir.to_str().unwrap()]);
            check_files(&fsm.dir, &files);
        }
        let status = m.unmount();
        assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    }
    // SIGTERM makes the server fdatasync every export before it exits.
    assert!(server.stop(libc::SIGTERM).success());

    let lo = Loop::attach(&s.path("disk.img"), &["-r"]);
    let mut args = fsck.to_vec();
    args.push(&lo.dev);
    run(fsck[0], &args[1..]);
    let options = if fstype == "xfs" {
        "ro,norecovery"
    } else {
        "ro"
    };
    let fsm = FsMount::mount(&lo.dev, &s.path("image"), options);
    check_files(&fsm.dir, &files);
}

#[test]
fn ext4_end_to_end() {
    require!("losetup", "mkfs.ext4", "e2fsck");
    end_to_end(
        "ext4",
        "256M",
        &["mkfs.ext4", "-q", "-F"],
        &["e2fsck", "-f", "-n"],
    );
}

#[test]
fn xfs_end_to_end() {
    require!("losetup", "mkfs.xfs", "xfs_repair");
    end_to_end(
        "xfs",
        "320M",
        &["mkfs.xfs", "-q", "-f"],
        &["xfs_repair", "-n"],
    );
}

#[test]
fn btrfs_end_to_end() {
    require!("losetup", "mkfs.btrfs", "btrfs");
    end_to_end(
        "btrfs",
        "256M",
        &["mkfs.btrfs", "-q", "-f"],
        &["btrfs", "check", "--readonly"],
    );
}

/// The mount directory shows one file of the export's size and `.stats`; the namespace and
/// the size cannot change; writes past the end fail like on a block device.
#[test]
fn one_fixed_size_file() {
    require!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "64M"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);

    let mut names: Vec<_> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [".stats", "disk"]);
    let meta = fs::metadata(m.file()).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), 0);

    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error().unwrap();
    assert_eq!(errno(fs::write(m.dir.join("new"), b"x")), libc::EPERM);
    assert_eq!(errno(fs::create_dir(m.dir.join("d"))), libc::EPERM);
    assert_eq!(errno(fs::remove_file(m.file())), libc::EPERM);
    assert_eq!(
        errno(fs::rename(m.file(), m.dir.join("other"))),
        libc::EPERM
    );
    let f = OpenOptions::new().write(true).open(m.file()).unwrap();
    assert_eq!(errno(f.set_len(MIB)), libc::EPERM);
    f.set_len(64 * MIB).unwrap();
    assert_eq!(
        f.write_at(b"x", 64 * MIB).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    // A write across the end is cut at the end.
    assert_eq!(f.write_at(&[7; 100], 64 * MIB - 10).unwrap(), 10);
    f.sync_all().unwrap();
    assert_eq!(
        common::file_bytes(&s.path("disk.img"), 64 * MIB - 10, 10),
        [7; 10]
    );

    // SAFETY: statvfs on a NUL-terminated path into a zeroed struct.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        let path = std::ffi::CString::new(m.dir.to_str().unwrap()).unwrap();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0);
        st
    };
    assert_eq!(st.f_blocks * st.f_frsize, 64 * MIB);
}

/// The numbers of `.stats`; its one text line, how the last worker ended, is left out.
fn read_stats(dir: &Path) -> HashMap<String, u64> {
    let text = fs::read_to_string(dir.join(".stats")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with("worker_last_exit "))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or_else(|| panic!("line {l:?}"));
            (
                k.to_string(),
                v.trim().parse().unwrap_or_else(|_| panic!("line {l:?}")),
            )
        })
        .collect()
}

#[test]
fn stats_counters_move() {
    require!("cat");
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "64M"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);

    let before = read_stats(&m.dir);
    for key in [
        "requests",
        "bytes_written",
        "bytes_read",
        "resends",
        "in_flight",
    ] {
        assert!(before.contains_key(key), "no {key} in {before:?}");
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.file())
        .unwrap();
    let data = AlignedBuf::new(4 * MIB as usize, 9);
    f.write_all_at(data.as_slice(), 0).unwrap();
    f.sync_all().unwrap();
    let after = read_stats(&m.dir);
    assert!(
        after["requests"] > before["requests"],
        "{before:?} -> {after:?}"
    );
    assert!(
        after["bytes_written"] >= before["bytes_written"] + 4 * MIB,
        "{before:?} -> {after:?}"
    );
    // cat reads it too, although the size says 0.
    let text = run("cat", &[m.dir.join(".stats").to_str().unwrap()]);
    assert!(text.contains("bytes_written "), "{text}");
    assert_eq!(
        fs::metadata(m.dir.join(".stats")).unwrap().mode() & 0o777,
        0o444
    );
    assert!(OpenOptions::new()
        .write(true)
        .open(m.dir.join(".stats"))
        .is_err());
}

/// SIGTERM while writers keep many writes in flight through a loop device with direct I/O
/// (which submits them asynchronously, so they reach dst-mount in parallel): dst-mount lets the
/// in-flight ones finish and exits 0, and every write acked to a writer is in the server's image.
#[test]
fn terminate_while_writing_loses_no_acked_write() {
    require!("losetup");
    const BLOCK: usize = 256 << 10;
    const BLOCKS: u64 = 64 * MIB / BLOCK as u64;
    const WRITERS: u64 = 8;
    let s = Setup::new();
    let mut server = s.server(&["--export", "disk=disk.img", "--create-size", "64M"]);
    let mut m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    let lo = Loop::attach(&m.file(), &["--direct-io=on"]);

    // Per block: the seed of the last acked write, and those of writes that failed.
    type Log = Arc<Mutex<HashMap<u64, (Option<u64>, Vec<u64>)>>>;
    let log: Log = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (log, acked, dev) = (log.clone(), acked.clone(), lo.dev.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(dev)
                    .unwrap();
                // Bounded, in case the signal never comes.
                for n in 0u64..100_000 {
                    let block = (w + n * WRITERS) % BLOCKS;
                    let seed = (n << 8) | w;
                    let buf = AlignedBuf::new(BLOCK, seed);
                    let result = f.write_all_at(buf.as_slice(), block * BLOCK as u64);
                    let mut log = log.lock().unwrap();
                    let entry = log.entry(block).or_default();
                    if result.is_err() {
                        entry.1.push(seed);
                        return;
                    }
                    entry.0 = Some(seed);
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_until("acked writes", Duration::from_secs(60), || {
        acked.load(Ordering::Relaxed) >= 2 * BLOCKS
    });
    let status = m.signal(libc::SIGTERM);
    for w in writers {
        w.join().unwrap();
    }
    assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    assert!(
        m.log().contains("detaching it lazily"),
        "dst-mount did not unmount the busy mount:\n{}",
        m.log()
    );
    assert_eq!(mounted_type(&m.dir), None);
    drop(lo);
    assert!(server.stop(libc::SIGTERM).success());

    let image = File::open(s.path("disk.img")).unwrap();
    let log = log.lock().unwrap();
    let mut checked = 0;
    for (block, (last_acked, failed)) in log.iter() {
        let Some(last) = last_acked else { continue };
        let mut got = vec![0; BLOCK];
        image.read_exact_at(&mut got, block * BLOCK as u64).unwrap();
        // A write that failed may still have executed; an acked one must be there unless a
        // later (failed) write replaced it.
        let ok = got == pattern(BLOCK, *last) || failed.iter().any(|f| got == pattern(BLOCK, *f));
        assert!(
            ok,
            "block {block}: the acked write {last:#x} is not in the image"
        );
        checked += 1;
    }
    assert_eq!(checked, BLOCKS, "every block was written");
}

/// `--ro` opens the export read-only: data reads back, every way of writing is refused, and
/// losetup falls back to a read-only loop device.
#[test]
fn read_only_mount_refuses_writes() {
    require!("losetup");
    let s = Setup::new();
    let image = s.path("disk.img");
    fs::write(&image, pattern(16 * MIB as usize, 4)).unwrap();
    let server = s.server(&["--export", "disk=disk.img"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &["--ro"]);

    assert_eq!(fs::read(m.file()).unwrap(), pattern(16 * MIB as usize, 4));
    assert_eq!(fs::metadata(m.file()).unwrap().mode() & 0o777, 0o400);
    let err = OpenOptions::new().write(true).open(m.file()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(mounted_options(&m.dir).split(',').any(|o| o == "ro"));

    let lo = Loop::attach(&m.file(), &[]);
    assert_eq!(lo.sys("ro"), "1", "losetup made a read-only device");
    let mut first = vec![0; 4096];
    File::open(&lo.dev).unwrap().read_exact(&mut first).unwrap();
    assert_eq!(first, pattern(16 * MIB as usize, 4)[..4096]);
    drop(lo);
    assert_eq!(fs::read(&image).unwrap(), pattern(16 * MIB as usize, 4));
}

/// fstrim on a filesystem on the loop device punches holes in the server's image.
#[test]
fn fstrim_makes_the_image_sparser() {
    require!("losetup", "mkfs.ext4", "fstrim");
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "256M"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
    // Inode tables and journal written now, not by a background thread during the test.
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &lo.dev,
        ],
    );
    let fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");
    fs::write(fsm.dir.join("big"), pattern(64 * MIB as usize, 1)).unwrap();
    run("sync", &["-f", fsm.dir.to_str().unwrap()]);
    let full = allocated_blocks(&s.path("disk.img"));
    assert!(
        full >= 64 * MIB / 512,
        "the image holds the file: {full} blocks"
    );

    fs::remove_file(fsm.dir.join("big")).unwrap();
    run("sync", &["-f", fsm.dir.to_str().unwrap()]);
    run("fstrim", &[fsm.dir.to_str().unwrap()]);
    let trimmed = allocated_blocks(&s.path("disk.img"));
    assert!(
        trimmed + 48 * MIB / 512 <= full,
        "fstrim freed too little: {full} -> {trimmed} blocks"
    );
    drop(fsm);
    drop(lo);
    drop(m);
}

/// A background mount started the way mount(8) starts it: through `mount.dst` with an
/// fstab-style option string; the helper returns once the mount is ready.
struct BackgroundMount {
    dir: PathBuf,
    log_file: PathBuf,
}

impl BackgroundMount {
    fn pid(&self) -> Option<i32> {
        let log = fs::read_to_string(&self.log_file).ok()?;
        log.split("(pid ").nth(1)?.split(')').next()?.parse().ok()
    }
}

impl Drop for BackgroundMount {
    fn drop(&mut self) {
        let pid = self.pid();
        unmount_quietly(&self.dir);
        if let Some(pid) = pid {
            // It exits once unmounted; make sure.
            let alive = || Path::new(&format!("/proc/{pid}")).exists();
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if alive() {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.dst")
}

fn key_options(s: &Setup) -> String {
    format!(
        "key={},server_key={}",
        s.path("client.key").display(),
        s.path("server.key.pub").display()
    )
}

#[test]
fn mount_helper_mounts_in_the_background() {
    require!("sh");
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let dir = s.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let log_file = s.path("mount.log");
    let bg = BackgroundMount {
        dir: dir.clone(),
        log_file: log_file.clone(),
    };
    // As mount(8) passes an fstab line's options: VFS and userspace ones included.
    let out = Command::new(helper())
        .arg(format!("{}/disk", server.addr))
        .arg(&dir)
        .args(["-o", "rw,_netdev,nofail"])
        .arg("-o")
        .arg(format!(
            "{},resend_timeout=2s,log_file={}",
            key_options(&s),
            log_file.display()
        ))
        .env("DST_MOUNT", env!("CARGO_BIN_EXE_dst-mount"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.dst failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready when the helper returns: no waiting.
    assert_eq!(mounted_type(&dir).as_deref(), Some("fuse.dst"));
    assert!(bg.pid().is_some(), "the log names the daemon's pid");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("disk"))
        .unwrap();
    f.write_all_at(b"hello", 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(common::file_bytes(&s.path("disk.img"), 4096, 5), b"hello");

    let pid = bg.pid().unwrap();
    run("umount", &[dir.to_str().unwrap()]);
    wait_until("the daemon to exit", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
    });
    drop(bg);

    // Unknown options are refused with the list of known ones, before anything is mounted.
    let out = Command::new(helper())
        .arg(format!("{}/disk", server.addr))
        .arg(&dir)
        .args(["-o", &format!("{},colour=blue", key_options(&s))])
        .env("DST_MOUNT", env!("CARGO_BIN_EXE_dst-mount"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown mount option 'colour=blue'"), "{err}");
    assert!(err.contains("resend_timeout="), "{err}");
    assert_eq!(mounted_type(&dir), None);
}

/// `dst-mount MOUNTPOINT` takes source and options from its fstab line.
#[test]
fn dst_mount_reads_its_fstab_line() {
    require!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let dir = s.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let log_file = s.path("mount.log");
    let fstab = s.path("fstab");
    fs::write(
        &fstab,
        format!(
            "# test\n{}/disk {} dst _netdev,ro,{},log_file={} 0 0\n",
            server.addr,
            dir.display(),
            key_options(&s),
            log_file.display()
        ),
    )
    .unwrap();
    let _bg = BackgroundMount {
        dir: dir.clone(),
        log_file,
    };
    let out = Command::new(env!("CARGO_BIN_EXE_dst-mount"))
        .arg(&dir)
        .env("DST_FSTAB", &fstab)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dst-mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mounted_type(&dir).as_deref(), Some("fuse.dst"));
    assert!(mounted_options(&dir).split(',').any(|o| o == "ro"));
    assert_eq!(fs::metadata(dir.join("disk")).unwrap().len(), 16 * MIB);
}

/// `mount -T FSTAB DIR`, with mount.dst where mount(8) looks for it. To put it there without
/// touching the system, this runs in a private mount namespace with a tmpfs over /sbin's
/// directory holding only the helper; the whole check runs inside that namespace.
#[test]
fn mount_command_uses_the_helper() {
    require!("unshare", "mount", "sh");
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let dir = s.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let fstab = s.path("fstab");
    fs::write(
        &fstab,
        format!(
            "{}/disk {} dst _netdev,x-systemd.automount,{} 0 0\n",
            server.addr,
            dir.display(),
            key_options(&s)
        ),
    )
    .unwrap();
    let sbin = fs::canonicalize("/sbin").unwrap();
    let script = format!(
        "set -e
        mount -t tmpfs tmpfs {sbin}
        cp {helper} {sbin}/mount.dst
        mount -T {fstab} {dir}
        trap 'umount {dir} 2>/dev/null || true' EXIT
        ls -a {dir}
        grep ' {dir} ' /proc/self/mounts
        umount {dir}",
        sbin = sbin.display(),
        helper = helper().display(),
        fstab = fstab.display(),
        dir = dir.display(),
    );
    let out = Command::new(which("unshare").unwrap())
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("DST_MOUNT", env!("CARGO_BIN_EXE_dst-mount"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("disk") && text.contains(".stats"), "{text}");
    assert!(text.contains("fuse.dst"), "{text}");
}

/// A mount that cannot happen fails at once with the reason, and leaves nothing mounted.
#[test]
fn unreachable_or_refusing_server_fails_the_mount() {
    require!();
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let dir = s.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let _guard = BackgroundMount {
        dir: dir.clone(),
        log_file: s.path("none"),
    };
    // A port nobody listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let other = dst::keys::generate().public().to_string();
    for (source, server_key, want) in [
        (format!("{closed}/disk"), None, "cannot connect"),
        (
            format!("{}/disk", server.addr),
            Some(other.as_str()),
            "--server-key",
        ),
        (
            format!("{}/nope", server.addr),
            None,
            "no export named 'nope'",
        ),
    ] {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_dst-mount"))
            .arg("--key")
            .arg(s.path("client.key"))
            .arg("--server-key")
            .arg(server_key.map_or(s.path("server.key.pub"), PathBuf::from))
            .arg(&source)
            .arg(&dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{source}: {err}");
        assert!(err.contains(want), "{source}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(mounted_type(&dir), None);
    }
}
