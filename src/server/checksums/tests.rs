//! The checksum filter over real files: open, verified reads, changes, a simulated
//! crash and its recovery, scrub, rebuild and growth.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::tracker::Clear;
use super::*;
use crate::pool::Pool;
use crate::server::backend::file::FileBackend;
use crate::server::backend::Backend;

fn open(path: &Path, table: &Path) -> Result<Checksums, ChecksumError> {
    let image = FileBackend::open(path, false).unwrap();
    Checksums::open("t", Box::new(image), table, None)
}

fn read(t: &Checksums, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    t.read(offset, len, &Pool::new(0))
}

fn write(t: &Checksums, offset: u64, data: &[u8]) {
    t.write(offset, data, false).unwrap()
}

fn image(dir: &Path, contents: &[(u64, &[u8])], size: u64) -> (PathBuf, File) {
    let path = dir.join("img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    for (at, data) in contents {
        f.write_all_at(data, *at).unwrap();
    }
    (path, f)
}

#[test]
fn table_paths_default_beside_the_image_and_refuse_unsound_places() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = image(dir.path(), &[], 1 << 20);
    let beside = table_path(&img, None).unwrap();
    assert_eq!(beside, dir.path().join("img.dst-sum"));
    let other = dir.path().join("elsewhere.sum");
    assert_eq!(table_path(&img, Some(&other)).unwrap(), other);
    let err = table_path(&img, Some(&img)).unwrap_err();
    assert!(matches!(err, ChecksumError::IsTheImage { .. }), "{err}");
    let err = table_path(&img, Some(Path::new("/dev/null"))).unwrap_err();
    assert!(matches!(err, ChecksumError::NotAFile { .. }), "{err}");
    // A block device must name its table's place (where this machine has one).
    use std::os::unix::fs::FileTypeExt;
    let dev = Path::new("/dev/loop0");
    if std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_block_device()) {
        let err = table_path(dev, None).unwrap_err();
        assert!(
            matches!(err, ChecksumError::DeviceNeedsTable { .. }),
            "{err}"
        );
        assert_eq!(table_path(dev, Some(&other)).unwrap(), other);
    }
}

#[test]
fn table_round_trip_on_files_with_recovery_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 << 20; // 3 regions of 16 MiB, the last one short
    let (path, img) = image(dir.path(), &[(8 << 20, &[5u8; 4096])], size);
    // Placed elsewhere (`:checksums=TABLE`): all the same, whatever the name.
    let table = dir.path().join("t.sum");
    let open = || open(&path, &table);
    let t = open().unwrap();
    assert!(!sidecar_path(&path).exists());
    // A fresh table: holes are zero, data blocks unverified.
    assert_eq!(t.inner.state().entry(0), ZERO);
    assert_eq!(t.inner.state().entry(2048), UNVERIFIED);
    assert_eq!(read(&t, 8 << 20, 4096).unwrap(), vec![5u8; 4096]);

    let data = vec![9u8; 3 * 4096];
    write(&t, 4096, &data);
    write(&t, 100, &[1u8; 50]); // partial block 0, which was zero
    write(&t, 2048 * 4096, &[3u8; 10]); // partial on an unverified block stays unverified
    assert_eq!(t.inner.state().entry(2048), UNVERIFIED);
    assert_eq!(read(&t, 4096, 3 * 4096).unwrap(), data);
    assert_eq!(read(&t, 90, 70).unwrap()[10..60], [1u8; 50]);
    // A byte changed behind the table's back fails reads of its block only.
    img.write_all_at(&[0xff], 2 * 4096 + 7).unwrap();
    assert_eq!(
        read(&t, 0, 4 * 4096).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(read(&t, 3 * 4096, 4096).is_ok());
    // And a partial write into it is refused rather than laundered.
    assert!(t.write(2 * 4096 + 100, &[0u8; 4], false).is_err());
    assert_eq!(t.stats().corrupt_blocks, 2);
    t.zero(4096, 4096, false).unwrap();
    assert_eq!(t.inner.state().entry(1), ZERO);
    assert_eq!(read(&t, 4096, 4096).unwrap(), vec![0; 4096]);

    // "Crash": the table is dropped unsynced with region 0 dirty. Block 6 was
    // changed without its checksum (as a torn write leaves it); block 5120 rots in
    // a region that a checkpoint made clean.
    write(&t, 20 << 20, &[4u8; 4096]); // region 1
    assert!(t.inner.checkpoint(Clear::All).unwrap());
    write(&t, 5 * 4096, &[6u8; 4096]); // region 0 dirty again
    img.write_all_at(&[7u8; 4096], 6 * 4096).unwrap();
    img.write_all_at(&[8u8; 1], (20 << 20) + 1).unwrap();
    assert!(
        matches!(open().unwrap_err(), ChecksumError::InUse { .. }),
        "locked while open"
    );
    drop(t);
    let t = open().unwrap();
    // Blocks 2 (flipped earlier) and 6 are in the dirty region: unverified, served.
    assert_eq!(t.recovered(), 2);
    assert_eq!(read(&t, 6 * 4096, 4096).unwrap(), vec![7u8; 4096]);
    assert!(read(&t, 2 * 4096, 4096).is_ok());
    assert_eq!(read(&t, 5 * 4096, 4096).unwrap(), vec![6u8; 4096]);
    assert!(
        read(&t, 20 << 20, 4096).is_err(),
        "rot in a clean region is caught"
    );

    let report = t.scrub(&mut |_| {}).unwrap();
    assert!(report.was_unclean);
    assert_eq!(report.corrupt, 1);
    assert_eq!(report.first_corrupt, vec![5120]);
    assert_eq!(report.unverified, 3, "blocks 2, 6 and 2048: {report:?}");
    assert_eq!(
        report.ok + report.zero + report.unverified + report.corrupt,
        report.blocks
    );
    assert!(read(&t, 6 * 4096, 4096).is_ok());
    t.close().unwrap();
    drop(t);

    // A clean close needs no recovery; a rebuilt table accepts the rot.
    let t = open().unwrap();
    assert_eq!(t.recovered(), 0);
    drop(t);
    let image = FileBackend::open(&path, true).unwrap();
    let r = rebuild(&image, &table, &mut |_| {}).unwrap();
    assert_eq!(r.blocks, 10240);
    let t = open().unwrap();
    assert!(read(&t, 20 << 20, 4096).is_ok());
    let report = t.scrub(&mut |_| {}).unwrap();
    assert_eq!((report.corrupt, report.unverified), (0, 0));
}

#[test]
fn a_table_grows_in_use_and_when_found_short_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let old = 3 * 4096 + 100; // the last block short
    let (path, img) = image(dir.path(), &[(0, &[5u8; 3 * 4096 + 100])], old);
    let table = dir.path().join("t.sum");
    let open = || open(&path, &table);
    let t = open().unwrap();
    write(&t, 0, &[1u8; 3 * 4096 + 100]);
    write(&t, 4096, &[2u8; 10]); // dirty when the table grows
    assert!(t.inner.state().tracker.any_dirty());
    let tail = t.inner.state().entry(3);
    assert_eq!(tail, block_sum(&[1u8; 100]));

    img.set_len(40 << 20).unwrap();
    assert!(t.inner.grow(40 << 20).unwrap());
    assert!(!t.inner.grow(40 << 20).unwrap(), "once");
    assert!(!t.inner.grow(1 << 20).unwrap(), "never shrinks");
    assert_eq!(
        t.layout(),
        Layout::for_image(40 << 20).with_id(t.layout().image_id)
    );
    let m = t.inner.state();
    let mut whole = vec![0u8; 4096];
    whole[..100].fill(1);
    assert_eq!(m.entry(3), block_sum(&whole), "the old tail, checked whole");
    assert_eq!(m.entry(4), ZERO, "a new hole is known zero");
    assert_eq!(m.entry(10239), ZERO);
    assert!(!m.tracker.any_dirty());
    drop(m);
    assert_eq!(read(&t, 3 * 4096, 4096).unwrap(), whole);
    write(&t, 39 << 20, &[3u8; 4096]);
    write(&t, (39 << 20) + 4096, &[4u8; 100]); // partial on a known zero: checked
    assert_eq!(read(&t, (39 << 20) + 4096, 100).unwrap(), vec![4u8; 100]);
    img.write_all_at(&[9], (39 << 20) + 4096 + 7).unwrap();
    assert!(
        read(&t, (39 << 20) + 4096, 100).is_err(),
        "new blocks are verified"
    );
    img.write_all_at(&[4], (39 << 20) + 4096 + 7).unwrap();
    t.close().unwrap();
    drop(t);

    // Grown while the server was stopped: the table follows at open. As a crash half-way
    // through growing leaves it: the file lengthened, the header still the old one.
    img.set_len(64 << 20).unwrap();
    let grown = Layout::for_image(64 << 20).file_len();
    OpenOptions::new()
        .write(true)
        .open(&table)
        .unwrap()
        .set_len(grown)
        .unwrap();
    let t = open().unwrap();
    assert_eq!(t.layout().image_size, 64 << 20);
    assert_eq!(read(&t, 39 << 20, 4096).unwrap(), vec![3u8; 4096]);
    let r = t.scrub(&mut |_| {}).unwrap();
    assert_eq!((r.corrupt, r.blocks), (0, 16384), "{r:?}");
    drop(t);
    // A shrunk one is refused, and says how to mend it.
    img.set_len(32 << 20).unwrap();
    let err = open().unwrap_err();
    assert!(matches!(err, ChecksumError::Shrunk { .. }), "{err}");
}
