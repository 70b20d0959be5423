//! One export: its spec, its size, and the execution of requests on its backend stack
//! ([`super::backend`]: the regular file or block device, with `:checksums` or
//! `:checksums=TABLE` the [`Checksums`] filter over it). Requests reach here already
//! checked against the export's size and access.
//!
//! An export may grow while the server runs ([`Export::check_size`]): the image file made
//! longer, the block device enlarged; its checksum table, if it has one, grows first. It
//! never shrinks under its clients.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::advice;
use super::backend::file::FileBackend;
use super::backend::Backend;
use super::checksums::{self, Checksums};
use super::flush_group::FlushGroup;
use super::metrics::ExportCounters;
use crate::pool::Pool;
use crate::protocol::{Op, RequestHeader, FLAG_FUA};

/// How an export is given on the command line: `NAME=PATH[:ro][:checksums[=TABLE]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Keep a per-block checksum table: in `checksum_table`, or beside the image
    /// (`PATH.dst-sum`).
    pub checksums: bool,
    /// Where the checksum table is kept, when given (`:checksums=TABLE`); a block device
    /// needs this.
    pub checksum_table: Option<PathBuf>,
    /// How often the checksum table is made durable (not part of the spec's text).
    pub checksum_checkpoint: Duration,
}

/// The form of an export on the command line, for messages.
const FORM: &str = "NAME=PATH[:ro][:checksums[=TABLE]]";

impl ExportSpec {
    /// Where this export's checksum table is, or why it cannot be anywhere (see
    /// [`checksums::table_path`]), with what to do about it.
    pub fn checksum_table_path(&self) -> Result<PathBuf, String> {
        checksums::table_path(&self.path, self.checksum_table.as_deref())
            .map_err(|e| advice::checksum_error(self, &e))
    }
}

impl std::str::FromStr for ExportSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, mut path) = s
            .split_once('=')
            .ok_or_else(|| format!("export '{s}' is not {FORM}"))?;
        let (mut read_only, mut checksums, mut table) = (false, false, None);
        // Suffixes in any order, each at most once; `:checksums=TABLE` takes the rest of
        // the text up to a following `:ro`.
        loop {
            if let Some(p) = path.strip_suffix(":ro").filter(|_| !read_only) {
                (path, read_only) = (p, true);
            } else if let Some(p) = path.strip_suffix(":checksums").filter(|_| !checksums) {
                (path, checksums) = (p, true);
            } else if let Some((p, t)) = path.rsplit_once(":checksums=").filter(|_| !checksums) {
                if t.is_empty() {
                    return Err(format!(
                        "export '{name}': :checksums= names no file; use :checksums=TABLE, or \
                         :checksums for a table beside the image"
                    ));
                }
                (path, checksums, table) = (p, true, Some(PathBuf::from(t)));
            } else {
                break;
            }
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty()
            || name.len() > crate::protocol::MAX_EXPORT_NAME
            || !name.chars().all(valid)
        {
            return Err(format!(
                "export name '{name}' must be 1 to {} characters of letters, digits, '-', '_' or '.'",
                crate::protocol::MAX_EXPORT_NAME
            ));
        }
        if path.is_empty() {
            return Err(format!("export '{name}' has no path; use {FORM}"));
        }
        Ok(ExportSpec {
            name: name.into(),
            path: path.into(),
            read_only,
            checksums,
            checksum_table: table,
            checksum_checkpoint: checksums::DEFAULT_CHECKPOINT,
        })
    }
}

/// An open export.
pub struct Export {
    pub name: String,
    pub path: PathBuf,
    /// Bytes served; only grows (see [`Export::check_size`]).
    size: AtomicU64,
    /// The last size found on disk and refused, so that a refusal is logged once.
    refused: AtomicU64,
    pub block_size: u32,
    pub read_only: bool,
    /// The I/O: the file or block device, with checksums as a filter over it.
    backend: Box<dyn Backend>,
    /// FLUSHes waiting for the next fdatasync.
    flushes: Mutex<FlushGroup<FlushDone>>,
    /// What was asked of it, for monitoring.
    pub counters: ExportCounters,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("size", &self.size())
            .finish()
    }
}

/// What a FLUSH does once its sync is done: answer with the status.
pub type FlushDone = Box<dyn FnOnce(u32) + Send>;

/// Result of executing a request: an errno-style status and, for a read, the data.
pub type Outcome = (u32, Vec<u8>);

impl Export {
    /// Opens (and with `create_size`, creates as a sparse file) the export in `spec`.
    pub fn open(spec: &ExportSpec, create_size: Option<u64>) -> Result<Export, String> {
        let path = &spec.path;
        let ctx = |e: io::Error| format!("export '{}': {}: {e}", spec.name, path.display());
        if !path.exists() {
            let size = create_size.ok_or_else(|| {
                format!(
                    "export '{}': {} does not exist; create it, or pass --create-size SIZE to create a sparse image",
                    spec.name,
                    path.display()
                )
            })?;
            FileBackend::create(path, size).map_err(ctx)?;
            log::info!(
                "created sparse image {} of {size} bytes for export '{}'",
                path.display(),
                spec.name
            );
        }
        let file = FileBackend::open(path, spec.read_only)
            .map_err(|e| format!("export '{}': {}: {e}", spec.name, path.display()))?;
        let block_size = file.block_size();
        let size = file.disk_size().map_err(ctx)?;
        let backend: Box<dyn Backend> = if spec.checksums {
            let table = spec.checksum_table_path()?;
            let every = Some(spec.checksum_checkpoint);
            let sums = Checksums::open(&spec.name, Box::new(file), &table, every)
                .map_err(|e| advice::checksum_error(spec, &e))?;
            if let Some(r) = sums.created().filter(|r| r.unverified > 0) {
                log::warn!("{}", advice::unverified_at_creation(spec, r.unverified));
            }
            Box::new(sums)
        } else {
            Box::new(file)
        };
        Ok(Export {
            name: spec.name.clone(),
            path: path.clone(),
            size: AtomicU64::new(size),
            refused: AtomicU64::new(size),
            block_size,
            read_only: spec.read_only,
            backend,
            flushes: Mutex::new(FlushGroup::default()),
            counters: ExportCounters::default(),
        })
    }

    /// Bytes the export has now.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether `offset..offset+length` lies inside the export.
    pub fn contains(&self, offset: u64, length: u32) -> bool {
        offset
            .checked_add(length as u64)
            .is_some_and(|end| end <= self.size())
    }

    /// Blocks found corrupt since the server started, with checksums.
    pub fn corrupt_blocks(&self) -> Option<u64> {
        self.backend.corrupt_blocks()
    }

    /// Reads the size of the file or device again; returns the new size if the export
    /// grew (its backend made ready for it first). A change that is refused is logged
    /// once, and the old size stays.
    pub fn check_size(&self) -> Option<u64> {
        let found = match self.backend.disk_size() {
            Ok(found) => found,
            Err(e) => {
                log::warn!("export '{}': cannot read its size: {e}", self.name);
                return None;
            }
        };
        let current = self.size();
        match resize(current, found) {
            Resize::Same => {
                self.refused.store(current, Ordering::Relaxed);
                None
            }
            Resize::Grow => {
                if let Err(e) = self.backend.grow(found) {
                    if self.refused.swap(found, Ordering::Relaxed) != found {
                        log::warn!(
                            "export '{}': {} is now {found} bytes, but its checksum table \
                             could not grow ({e}); still serving {current} bytes, and trying \
                             again at the next look",
                            self.name,
                            self.path.display()
                        );
                    }
                    return None;
                }
                // A SIGHUP and the periodic look may race: one of them grows it.
                self.size
                    .compare_exchange(current, found, Ordering::AcqRel, Ordering::Acquire)
                    .ok()?;
                self.refused.store(found, Ordering::Relaxed);
                log::info!(
                    "export '{}': {} grew from {current} to {found} bytes",
                    self.name,
                    self.path.display()
                );
                Some(found)
            }
            Resize::Refuse(why) => {
                if self.refused.swap(found, Ordering::Relaxed) != found {
                    log::warn!(
                        "export '{}': {} is now {found} bytes: {why}; still serving \
                         {current} bytes",
                        self.name,
                        self.path.display()
                    );
                }
                None
            }
        }
    }

    /// Executes one request, then calls `done` with its outcome; blocking, so run it off
    /// the network tasks. `data` is a write's payload; a read's data is read into a
    /// buffer from `pool`. A FLUSH may be answered by another thread (see
    /// [`flush`](Self::flush)).
    pub fn execute(
        &self,
        h: &RequestHeader,
        data: &[u8],
        pool: &Pool,
        done: impl FnOnce(Outcome) + Send + 'static,
    ) {
        if h.op == Op::Flush {
            return self.flush(Box::new(move |status| done((status, Vec::new()))));
        }
        let fua = h.flags & FLAG_FUA != 0;
        done(self.run(h.op, fua, h.offset, h.length, data, pool))
    }

    fn run(
        &self,
        op: Op,
        fua: bool,
        offset: u64,
        length: u32,
        data: &[u8],
        pool: &Pool,
    ) -> Outcome {
        let b = &self.backend;
        let result = match op {
            // A checksum mismatch was logged with its block number where it was found.
            Op::Read => {
                return match b.read(offset, length as usize, pool) {
                    Ok(buf) => (0, buf),
                    Err(e) => (errno(&e), Vec::new()),
                }
            }
            Op::Write => b.write(offset, data, fua),
            Op::Flush => b.flush(),
            Op::Trim => b.trim(offset, length as u64, fua).map(drop),
            Op::WriteZeroes => b.zero(offset, length as u64, fua),
            Op::Ping => Ok(()),
        };
        match result {
            Ok(()) => (0, Vec::new()),
            Err(e) => {
                log::warn!("export '{}': {op:?} at {offset}+{length}: {e}", self.name);
                (errno(&e), Vec::new())
            }
        }
    }

    /// FLUSH: puts every write completed before now on stable storage, then calls `done`
    /// with the status (an errno, or 0). Flushes that arrive while a sync runs share the
    /// next one: the thread running a sync runs the next for them and answers them, so
    /// the others return at once.
    fn flush(&self, done: FlushDone) {
        let mut batch = self.flushes.lock().unwrap().arrive(done);
        while let Some(waiters) = batch {
            let status = match self.backend.flush() {
                Ok(()) => 0,
                Err(e) => {
                    log::warn!("export '{}': flush: {e}", self.name);
                    errno(&e)
                }
            };
            for done in waiters {
                done(status);
            }
            batch = self.flushes.lock().unwrap().finished();
        }
    }

    /// Puts every completed write on stable storage; with checksums, the table too, and
    /// marks it closed cleanly (the server calls this at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        self.backend.close()
    }
}

/// What a size found on disk does to an export of `current` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Resize {
    Same,
    /// The export takes the new size.
    Grow,
    /// The old size stays, for this reason.
    Refuse(&'static str),
}

/// Decides what the size `found` on disk does to an export of `current` bytes; pure.
pub fn resize(current: u64, found: u64) -> Resize {
    if found == current {
        Resize::Same
    } else if found < current {
        Resize::Refuse(
            "shrinking is refused, since clients may hold data past the new end; \
             restore the size, or stop the clients and restart the server",
        )
    } else {
        Resize::Grow
    }
}

fn errno(e: &io::Error) -> u32 {
    e.raw_os_error().unwrap_or(libc::EIO) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_grow_but_never_shrink() {
        assert_eq!(resize(4096, 4096), Resize::Same);
        assert_eq!(resize(4096, 8192), Resize::Grow);
        assert!(matches!(resize(8192, 4096), Resize::Refuse(w) if w.contains("shrink")));
    }

    #[test]
    fn export_spec_suffixes_in_any_order() {
        let p = |s: &str| s.parse::<ExportSpec>();
        let d = p("disk=/srv/d.img").unwrap();
        assert_eq!((d.read_only, d.checksums), (false, false));
        assert_eq!(d.path, PathBuf::from("/srv/d.img"));
        for s in ["d=/x:ro:checksums", "d=/x:checksums:ro"] {
            let d = p(s).unwrap();
            assert_eq!(
                (d.read_only, d.checksums, d.path.to_str()),
                (true, true, Some("/x"))
            );
        }
        let d = p("d=/x:checksums").unwrap();
        assert_eq!((d.read_only, d.checksums), (false, true));
        // A suffix given twice is left in the path, as a path ending in it would be.
        assert_eq!(p("d=/x:ro:ro").unwrap().path.to_str(), Some("/x:ro"));
        assert!(p("d=:checksums").unwrap_err().contains("no path"));
        assert!(p("nopath").unwrap_err().contains(FORM));
        assert_eq!(d.checksum_table, None);
        // A table placed elsewhere: the rest of the text, up to a `:ro` after it.
        for s in [
            "d=/dev/sdb:checksums=/var/lib/dst/d.sum",
            "d=/dev/sdb:ro:checksums=/var/lib/dst/d.sum",
            "d=/dev/sdb:checksums=/var/lib/dst/d.sum:ro",
        ] {
            let d = p(s).unwrap();
            assert!(d.checksums, "{s}");
            assert_eq!(d.path.to_str(), Some("/dev/sdb"), "{s}");
            assert_eq!(
                d.checksum_table.as_deref(),
                Some(std::path::Path::new("/var/lib/dst/d.sum")),
                "{s}"
            );
            assert_eq!(d.read_only, s.contains(":ro"), "{s}");
        }
        assert!(p("d=/x:checksums=").unwrap_err().contains("names no file"));
        // Both forms at once: the second is left in the path, as with other repeats.
        let d = p("d=/x:checksums:checksums=/t").unwrap();
        assert_eq!(
            (d.path.to_str(), d.checksum_table),
            (Some("/x:checksums"), Some("/t".into()))
        );
    }
}
