//! Growing an export online, as root with /dev/fuse and loop devices: the server's image
//! made larger under a mounted ext4, xfs or btrfs (SIGHUP, or the server's own periodic look), the
//! FUSE file following, the loop device and the filesystem grown in place, data written past
//! the old end and found again after a remount; the same with a checksum table, which grows
//! with the image and verifies clean afterwards; an export that is itself a loop device,
//! grown; and a shrink refused. Without root or the
//! tools, a test says why and passes without running. And on the wire, without root: a
//! client that announced RESIZE is told, an older one is not, and both go on working.
//!
//! Guards are declared in setup order and so dropped in reverse: filesystem, loop device,
//! dst mount, server.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::mount::{check_files, kill, run, wait_until, write_files, DstMount, FsMount, Loop};
use common::{connect, pattern, Setup};
use dst::client::Connection;
use dst::protocol::{features, Access};

const MIB: u64 = 1 << 20;
/// Long enough for the server's periodic look (every 5 s) and a loaded machine.
const FOLLOW: Duration = Duration::from_secs(30);

/// The `size` line of the mount's `.stats`.
fn stats_size(m: &DstMount) -> u64 {
    let stats = fs::read_to_string(m.dir.join(".stats")).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("size "))
        .unwrap_or_else(|| panic!("no size in .stats:\n{stats}"))
        .parse()
        .unwrap()
}

/// How a filesystem is made, grown and checked.
struct Kind {
    /// The export's size before it grows, in MiB (mkfs.xfs wants at least 300).
    old_mib: u64,
    mkfs: &'static [&'static str],
    /// Grows the mounted filesystem to its device: given the device and the mount point.
    grow: fn(&str, &Path),
    fsck: &'static [&'static str],
    /// Whether the server is sent SIGHUP, or left to find the new size on its own.
    sighup: bool,
    /// What follows `disk=disk.img` in the export's spec, e.g. `:checksums`.
    suffix: &'static str,
}

/// A filesystem on a loop device on the dst file, filled; the image grown to 640 MiB; the FUSE file, the loop device and the filesystem follow, online; a file larger
/// than the old export is written, checked clean and read back after a remount.
fn grow_online(kind: Kind) {
    let (old, new) = (kind.old_mib * MIB, 640 * MIB);
    let s = Setup::new();
    let size = format!("{}M", kind.old_mib);
    let export = format!("disk=disk.img{}", kind.suffix);
    let mut server = s.server(&["--export", &export, "--create-size", &size]);
    let before: Vec<(String, usize, u64)> = (0..4)
        .map(|i| (format!("before{i}"), (3 * MIB + i * 4099) as usize, i))
        .collect();
    // Larger than the whole old export: some of it lies past the old end.
    let after: Vec<(String, usize, u64)> = vec![("after".into(), (old + 64 * MIB) as usize, 99)];
    {
        let mut m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
        {
            let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
            let mut mkfs = kind.mkfs.to_vec();
            mkfs.push(&lo.dev);
            run(mkfs[0], &mkfs[1..]);
            let fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");
            write_files(&fsm.dir, &before);
            assert_eq!(stats_size(&m), old);

            run(
                "truncate",
                &["-s", &new.to_string(), s.path("disk.img").to_str().unwrap()],
            );
            if kind.sighup {
                kill(server.pid(), libc::SIGHUP);
            }
            let grew = format!("grew from {old} to {new} bytes");
            wait_until("the server to see the growth", FOLLOW, || {
                server.log().contains(&grew)
            });
            wait_until("the FUSE file to grow", FOLLOW, || {
                fs::metadata(m.file()).unwrap().len() == new
            });
            assert_eq!(stats_size(&m), new, "{}", m.log());

            run("losetup", &["-c", &lo.dev]);
            wait_until("the loop device to grow", FOLLOW, || {
                lo.sys("size").parse::<u64>().unwrap() * 512 == new
            });
            (kind.grow)(&lo.dev, &fsm.dir);
            write_files(&fsm.dir, &after);
            check_files(&fsm.dir, &before);
            check_files(&fsm.dir, &after);
        }
        {
            // Checked through dst itself, at the new size.
            let lo = Loop::attach(&m.file(), &["--direct-io=on", "-r"]);
            let mut fsck = kind.fsck.to_vec();
            fsck.push(&lo.dev);
            run(fsck[0], &fsck[1..]);
        }
        let status = m.unmount();
        assert!(status.success(), "dst-mount exit: {status}\n{}", m.log());
    }
    {
        // A new mount starts at the new size, with everything there.
        let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
        assert_eq!(fs::metadata(m.file()).unwrap().len(), new);
        let lo = Loop::attach(&m.file(), &["--direct-io=on"]);
        let fsm = FsMount::mount(&lo.dev, &s.path("fs"), "rw");
        check_files(&fsm.dir, &before);
        check_files(&fsm.dir, &after);
    }
    if kind.suffix.contains(":checksums") {
        assert!(
            !server.log().contains("does not match its checksum"),
            "{}",
            server.log()
        );
        let status = server.stop(libc::SIGTERM);
        assert!(
            status.success(),
            "dst-server exit: {status}\n{}",
            server.log()
        );
        let (code, out) = s.scrub(&["--export", &export]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("corrupt     0"), "{out}");
        assert!(
            out.contains(&format!("{} blocks of 4 KiB checked", new / 4096)),
            "{out}"
        );
    }
}

/// Whether this process may resize an ext4 filesystem online: the kernel asks for
/// CAP_SYS_RESOURCE, which some containers take away even from root.
fn may_resize_ext4_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// `resize2fs` on the mounted filesystem; without CAP_SYS_RESOURCE, unmounted instead and
/// mounted again (the export, the FUSE file and the loop device still grew online).
fn grow_ext4(dev: &str, dir: &Path) {
    if may_resize_ext4_online() {
        run("resize2fs", &[dev]);
        return;
    }
    eprintln!("no CAP_SYS_RESOURCE: resizing ext4 unmounted");
    let dir = dir.to_str().unwrap();
    run("umount", &[dir]);
    run("e2fsck", &["-f", "-p", dev]);
    run("resize2fs", &[dev]);
    run("mount", &[dev, dir]);
}

/// ext4, told by SIGHUP, on an export with `suffix`.
fn ext4(suffix: &'static str) -> Kind {
    Kind {
        old_mib: 256,
        mkfs: &["mkfs.ext4", "-q", "-F"],
        grow: grow_ext4,
        fsck: &["e2fsck", "-f", "-n"],
        sighup: true,
        suffix,
    }
}

#[test]
fn ext4_grows_online_after_sighup() {
    require!("losetup", "truncate", "mkfs.ext4", "resize2fs", "e2fsck");
    grow_online(ext4(""));
}

#[test]
fn ext4_with_checksums_grows_online_and_scrubs_clean() {
    require!("losetup", "truncate", "mkfs.ext4", "resize2fs", "e2fsck");
    grow_online(ext4(":checksums"));
}

#[test]
fn xfs_grows_online_when_the_server_looks() {
    require!(
        "losetup",
        "truncate",
        "mkfs.xfs",
        "xfs_growfs",
        "xfs_repair"
    );
    grow_online(Kind {
        old_mib: 320,
        mkfs: &["mkfs.xfs", "-q", "-f"],
        grow: |_, dir| drop(run("xfs_growfs", &[dir.to_str().unwrap()])),
        fsck: &["xfs_repair", "-n"],
        sighup: false,
        suffix: "",
    });
}

#[test]
fn btrfs_grows_online_after_sighup() {
    require!("losetup", "truncate", "mkfs.btrfs", "btrfs");
    grow_online(Kind {
        old_mib: 256,
        mkfs: &["mkfs.btrfs", "-q", "-f"],
        grow: |_, dir| {
            drop(run(
                "btrfs",
                &["filesystem", "resize", "max", dir.to_str().unwrap()],
            ))
        },
        fsck: &["btrfs", "check", "--readonly"],
        sighup: true,
        suffix: "",
    });
}

/// A smaller image is refused, logged once, and the mount keeps its size and its data.
#[test]
fn a_shrink_is_refused_and_logged_once() {
    require!("truncate");
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "64M"]);
    let m = DstMount::start(&s, &server, &s.path("mnt"), &[]);
    let data = pattern(MIB as usize, 7);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    f.write_all_at(&data, MIB).unwrap();
    f.sync_all().unwrap();

    let image = s.path("disk.img");
    run("truncate", &["-s", "32M", image.to_str().unwrap()]);
    let refused = "is now 33554432 bytes: shrinking is refused";
    for _ in 0..2 {
        kill(server.pid(), libc::SIGHUP);
        server.wait_for_log("SIGHUP: looked at the exports' sizes (0 grew)");
    }
    wait_until("both SIGHUPs", FOLLOW, || {
        server.log().matches("looked at the exports' sizes").count() == 2
    });
    assert_eq!(server.log().matches(refused).count(), 1, "{}", server.log());
    assert!(server.log().contains("still serving 67108864 bytes"));

    assert_eq!(fs::metadata(m.file()).unwrap().len(), 64 * MIB);
    assert_eq!(stats_size(&m), 64 * MIB);
    let mut back = vec![0; data.len()];
    f.read_exact_at(&mut back, MIB).unwrap();
    assert!(back == data, "the data before the cut reads back");

    // Back to its size, the export is as before; growing past it still works.
    run("truncate", &["-s", "64M", image.to_str().unwrap()]);
    run("truncate", &["-s", "96M", image.to_str().unwrap()]);
    kill(server.pid(), libc::SIGHUP);
    wait_until("the FUSE file to grow", FOLLOW, || {
        fs::metadata(m.file()).unwrap().len() == 96 * MIB
    });
    f.write_all_at(&data, 95 * MIB).unwrap();
    f.read_exact_at(&mut back, 95 * MIB).unwrap();
    assert!(back == data, "written past the old end");
}

/// Two connected clients of a growing export: the one that announced RESIZE learns the new
/// size before its next reply, the older one keeps the size it was given; both are served
/// on, and a client that connects afterwards is given the new size.
#[test]
fn connected_clients_that_take_resize_are_told() {
    let s = Setup::new();
    let server = s.server(&["--export", "disk=disk.img", "--create-size", "16M"]);
    let cfg = s.client(&server, "disk", Access::ReadOnly);
    let mut new = connect(&cfg);
    let older = features::ALL & !features::RESIZE;
    let mut old = smol::block_on(Connection::connect_with(&cfg, None, older)).unwrap();
    assert_eq!((new.info().size, old.info().size), (16 * MIB, 16 * MIB));

    OpenOptions::new()
        .write(true)
        .open(s.path("disk.img"))
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    kill(server.pid(), libc::SIGHUP);
    server.wait_for_log("SIGHUP: looked at the exports' sizes (1 grew)");
    smol::block_on(async {
        new.ping().await.unwrap();
        old.ping().await.unwrap();
        assert_eq!(new.read(40 * MIB, 4096).await.unwrap(), vec![0; 4096]);
    });
    assert_eq!(new.info().size, 48 * MIB, "told before the ping's reply");
    assert_eq!(
        old.info().size,
        16 * MIB,
        "an older client is sent no RESIZE"
    );
    assert_eq!(connect(&cfg).info().size, 48 * MIB);
}

/// An export that is a block device (a loop device over a file), plain and with its
/// checksum table elsewhere: the backing file grown and `losetup -c` run, the server told
/// by SIGHUP; a connected client follows and data past the old end reads back.
#[test]
fn a_block_device_export_grows() {
    require!("losetup", "truncate");
    for suffix in ["", ":checksums=disk.sum"] {
        let s = Setup::new();
        let back = s.path("back.img");
        fs::File::create(&back)
            .unwrap()
            .set_len(16 * MIB + 512)
            .unwrap();
        let lo = Loop::attach(&back, &[]);
        let export = format!("disk={}{suffix}", lo.dev);
        let server = s.server(&["--export", &export]);
        let mut c = connect(&s.client(&server, "disk", Access::ReadWrite));
        let (early, late) = (pattern(4096, 1), pattern(8192, 2));
        smol::block_on(c.write(16 * MIB - 4096, &early, false)).unwrap();
        assert_eq!(c.info().size, 16 * MIB + 512);

        run("truncate", &["-s", "48M", back.to_str().unwrap()]);
        run("losetup", &["-c", &lo.dev]);
        kill(server.pid(), libc::SIGHUP);
        server.wait_for_log("SIGHUP: looked at the exports' sizes (1 grew)");
        smol::block_on(async {
            c.write(40 * MIB, &late, true).await.unwrap();
            assert_eq!(c.read(40 * MIB, 8192).await.unwrap(), late, "{suffix}");
            assert_eq!(c.read(16 * MIB - 4096, 4096).await.unwrap(), early);
            // The old short last sector's block, whole now.
            assert_eq!(c.read(16 * MIB, 4096).await.unwrap(), vec![0; 4096]);
        });
        assert_eq!(c.info().size, 48 * MIB, "{suffix}: {}", server.log());
        assert!(!server.log().contains("does not match"), "{}", server.log());
    }
}
