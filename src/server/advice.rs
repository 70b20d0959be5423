//! What to tell the operator when an export's storage refuses or needs care: the typed
//! errors and reports of the checksum table turned into the commands that mend them,
//! with the `--export` argument as the operator gave it. The storage layer
//! ([`super::checksums`], [`super::backend`]) says what is wrong; only here is
//! command-line text built, for the server and for `dst-server scrub`.

use super::checksums::{ChecksumError, SUFFIX};
use super::export::ExportSpec;

/// The `--export` argument that names this export's image and table, for the commands
/// that messages suggest.
pub fn export_arg(spec: &ExportSpec) -> String {
    match &spec.checksum_table {
        None => format!("{}={}", spec.name, spec.path.display()),
        Some(t) => format!(
            "{}={}:checksums={}",
            spec.name,
            spec.path.display(),
            t.display()
        ),
    }
}

/// `e`, said of export `spec`, with what to do about it.
pub fn checksum_error(spec: &ExportSpec, e: &ChecksumError) -> String {
    use ChecksumError::*;
    let name = &spec.name;
    let repair = format!(
        "if the image's data is good, rebuild the table with `dst-server scrub --export {} \
         --repair-table`",
        export_arg(spec)
    );
    let fix = match e {
        DeviceNeedsTable { device } => format!(
            "give the table a place on a file system with :checksums=TABLE, e.g. --export \
             {name}={}:checksums=/var/lib/dst/{name}{SUFFIX}",
            device.display()
        ),
        NotAFile { .. } => {
            format!("name a file for the table, e.g. :checksums=/var/lib/dst/{name}{SUFFIX}")
        }
        IsTheImage { .. } => "name another file for the table".into(),
        InUse { .. } => "stop that first".into(),
        Damaged { .. } | Shrunk { .. } | Truncated { .. } => repair,
        OtherImage { .. } => format!("if it is a new image, delete the table; {repair}"),
        Io { .. } => return format!("export '{name}': {e}"),
    };
    format!("export '{name}': {e}; {fix}")
}

/// Said when a new table over an image with data leaves `unverified` blocks unverified.
pub fn unverified_at_creation(spec: &ExportSpec, unverified: u64) -> String {
    format!(
        "export '{}': {unverified} blocks hold data written before checksums were enabled; \
         they are served unverified until rewritten. If the image is known to be good, \
         protect them now: stop the server and run `dst-server scrub --export {} \
         --repair-table`",
        spec.name,
        export_arg(spec)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn advice_names_the_export_as_it_was_given() {
        let beside: ExportSpec = "d=/srv/d.img:checksums".parse().unwrap();
        assert_eq!(export_arg(&beside), "d=/srv/d.img");
        let elsewhere: ExportSpec = "d=/dev/sdb:checksums=/var/lib/dst/d.sum".parse().unwrap();
        assert_eq!(
            export_arg(&elsewhere),
            "d=/dev/sdb:checksums=/var/lib/dst/d.sum"
        );
        let table = PathBuf::from("/srv/d.img.dst-sum");
        let e = ChecksumError::Shrunk {
            table,
            described: 8192,
            found: 4096,
        };
        let text = checksum_error(&beside, &e);
        assert!(text.starts_with("export 'd': "), "{text}");
        assert!(text.contains("describes an image of 8192 bytes"), "{text}");
        assert!(
            text.contains("`dst-server scrub --export d=/srv/d.img --repair-table`"),
            "{text}"
        );
        let e = ChecksumError::DeviceNeedsTable {
            device: "/dev/sdb".into(),
        };
        let text = checksum_error(&elsewhere, &e);
        assert!(text.contains("is a block device"), "{text}");
        assert!(
            text.contains("--export d=/dev/sdb:checksums=/var/lib/dst/d.dst-sum"),
            "{text}"
        );
    }
}
