//! What can go wrong with a checksum table, typed. Each says what is wrong, never what
//! to run: the server and the `scrub` command turn them into advice for the operator
//! (`crate::server::advice`), since only they know how the export was given.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum ChecksumError {
    /// A block device, with no place named for its table (beside it would be in /dev).
    DeviceNeedsTable { device: PathBuf },
    /// The named table exists and is not a regular file.
    NotAFile { table: PathBuf },
    /// The named table is the image itself.
    IsTheImage { table: PathBuf },
    /// Another server or a scrub holds the table's lock.
    InUse { table: PathBuf },
    /// The header cannot be used, for the reason given.
    Damaged { table: PathBuf, why: String },
    /// The table was made for another file (the image was replaced or copied).
    OtherImage { table: PathBuf },
    /// The image is smaller than the table describes.
    Shrunk {
        table: PathBuf,
        described: u64,
        found: u64,
    },
    /// The table file is shorter than its header says.
    Truncated { table: PathBuf, len: u64, want: u64 },
    /// Reading or writing the image or the table failed.
    Io { table: PathBuf, source: io::Error },
}

impl ChecksumError {
    pub(super) fn io(table: &std::path::Path) -> impl Fn(io::Error) -> ChecksumError + '_ {
        move |source| ChecksumError::Io {
            table: table.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for ChecksumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ChecksumError::*;
        match self {
            DeviceNeedsTable { device } => write!(
                f,
                "{} is a block device, so its checksum table cannot be kept beside it (that \
                 would be in /dev, which is emptied at every boot)",
                device.display()
            ),
            NotAFile { table } => {
                write!(
                    f,
                    "checksum table {} is not a regular file",
                    table.display()
                )
            }
            IsTheImage { table } => {
                write!(
                    f,
                    "the checksum table {} is the image itself",
                    table.display()
                )
            }
            InUse { table } => write!(
                f,
                "checksum table {} is in use by another dst-server or a scrub",
                table.display()
            ),
            Damaged { table, why } => write!(f, "checksum table {}: {why}", table.display()),
            OtherImage { table } => write!(
                f,
                "the image is not the file checksum table {} was made for (it was replaced or \
                 copied since)",
                table.display()
            ),
            Shrunk {
                table,
                described,
                found,
            } => write!(
                f,
                "checksum table {} describes an image of {described} bytes, but the image has \
                 {found}",
                table.display()
            ),
            Truncated { table, len, want } => write!(
                f,
                "checksum table {} is truncated ({len} of {want} bytes)",
                table.display()
            ),
            Io { table, source } => write!(f, "checksum table {}: {source}", table.display()),
        }
    }
}

impl std::error::Error for ChecksumError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChecksumError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
