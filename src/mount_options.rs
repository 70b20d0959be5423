//! What `dst-mount` and `mount.dst` are told to mount: the source `HOST[:PORT]/EXPORT`, the
//! `-o` option strings of mount(8), and the `/etc/fstab` line of a mount point, parsed into
//! typed values. Pure: no files are read here and nothing is resolved.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::cipher::Cipher;
use crate::socket::Congestion;
use crate::units::{parse_duration, parse_size};

/// The port of an export node when a source or `--server` names none.
pub const DEFAULT_PORT: u16 = 7700;

/// The filesystem types an fstab line for dst may carry: `dst` for mount(8) and the
/// `mount.dst` helper, `fuse.dst` as the kernel shows the mount in /proc/mounts.
pub const FSTAB_TYPES: [&str; 2] = ["dst", "fuse.dst"];

/// An export node's address, `HOST[:PORT]`; IPv6 literals go in brackets: `[::1]:7700`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
}

impl Server {
    /// `host:port` as `TcpStream::connect` takes it.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address())
    }
}

impl FromStr for Server {
    type Err = String;

    fn from_str(s: &str) -> Result<Server, String> {
        let bad = |why: &str| format!("server '{s}': {why}; expected HOST[:PORT], e.g. node1:7700");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("expected ':PORT' after ']'"))?,
                    ),
                ),
            }
        } else {
            match s.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(bad("an IPv6 address goes in brackets, as in [::1]:7700"))
                }
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(|c: char| c.is_whitespace() || "/[]".contains(c)) {
            return Err(bad("the host contains a space, '/', '[' or ']'"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(bad("the port is not a number from 1 to 65535")),
            },
        };
        Ok(Server {
            host: host.to_string(),
            port,
        })
    }
}

/// What to mount: `HOST[:PORT]/EXPORT`, as in an fstab line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub server: Server,
    pub export: String,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.server, self.export)
    }
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Source, String> {
        let (server, export) = s.rsplit_once('/').ok_or_else(|| {
            format!(
                "source '{s}' names no export; expected HOST[:PORT]/EXPORT, e.g. node1:7700/disk"
            )
        })?;
        check_export_name(export).map_err(|e| format!("source '{s}': {e}"))?;
        Ok(Source {
            server: server.parse()?,
            export: export.to_string(),
        })
    }
}

/// Export names as the server allows them: 1 to 255 letters, digits, `-`, `_` or `.`.
pub fn check_export_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "export name '{name}' is not 1 to 255 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Settings given as mount options or dst-mount flags. `None` means "not given here", so
/// that sources can be layered: fstab, then `-o`, then flags (see [`Options::over`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    pub key: Option<PathBuf>,
    /// A public key in base64 or a file holding one.
    pub server_key: Option<String>,
    pub cipher: Option<Cipher>,
    pub congestion_control: Option<Congestion>,
    pub read_only: Option<bool>,
    pub resend_timeout: Option<Duration>,
    pub resend_count: Option<u32>,
    pub ping_interval: Option<Duration>,
    pub window_requests: Option<usize>,
    pub window_bytes: Option<usize>,
    pub max_transfer: Option<u32>,
    /// The fail-fast profile for array members (see `crate::mount::FAIL_FAST`): a short
    /// resend window; explicit resend and ping settings still win over it.
    pub fail_fast: Option<bool>,
    pub foreground: Option<bool>,
    pub log_file: Option<PathBuf>,
}

/// The options dst understands, as shown when refusing an unknown one.
pub const KNOWN_OPTIONS: &str = "key=FILE, server_key=FILE|BASE64, cipher=chachapoly|aesgcm, \
     congestion_control=NAME|system, ro, rw, resend_timeout=DURATION, resend_count=N, ping_interval=DURATION, \
     window_requests=N, window_bytes=SIZE, max_transfer=SIZE, fail_fast, foreground, \
     log_file=FILE; \
     ignored (for mount(8) and systemd): defaults, auto, noauto, user, nouser, users, \
     _netdev, nofail, comment=..., x-*, and the generic flags \
     suid, nosuid, dev, nodev, exec, noexec, sync, async, atime, noatime, relatime, ...";

/// Options that belong to mount(8), systemd or the generic VFS. They are accepted and have no
/// effect here: the mount holds one regular file that is never executed, has no device or
/// set-user-id semantics, and every write is already acknowledged by the export node before it
/// completes (so `sync` adds nothing; a per-write FUA comes from O_DSYNC/O_SYNC).
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "sync",
    "async",
    "dirsync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "lazytime",
];

fn ignored(name: &str) -> bool {
    IGNORED.contains(&name)
        || name.starts_with("x-")
        || name == "comment"
        || name == "diratime"
        || name == "nolazytime"
        || name == "silent"
        || name == "loud"
}

impl Options {
    /// Parses a comma-separated option string such as `ro,key=/etc/dst/client.key`.
    /// Option names take `-` or `_` alike. An unknown option is an error that lists the known
    /// ones; with `sloppy` (mount -s) it is returned as a warning instead.
    pub fn parse(text: &str, sloppy: bool) -> Result<(Options, Vec<String>), String> {
        let mut o = Options::default();
        let mut warnings = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (raw_name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item, None),
            };
            let name = raw_name.replace('-', "_");
            if let Err(e) = o.set(&name, value) {
                match e {
                    SetError::Unknown if ignored(raw_name) => {}
                    SetError::Unknown if sloppy => {
                        warnings.push(format!("ignoring unknown mount option '{item}'"))
                    }
                    SetError::Unknown => {
                        return Err(format!(
                            "unknown mount option '{item}'; known options: {KNOWN_OPTIONS}"
                        ))
                    }
                    SetError::Bad(why) => return Err(format!("mount option '{item}': {why}")),
                }
            }
        }
        Ok((o, warnings))
    }

    fn set(&mut self, name: &str, value: Option<&str>) -> Result<(), SetError> {
        fn need(value: Option<&str>) -> Result<&str, SetError> {
            match value {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(SetError::Bad("needs a value, as in NAME=VALUE".into())),
            }
        }
        fn flag(value: Option<&str>) -> Result<bool, SetError> {
            match value {
                None => Ok(true),
                Some(_) => Err(SetError::Bad("takes no value".into())),
            }
        }
        let bad = SetError::Bad;
        match name {
            "key" => self.key = Some(PathBuf::from(need(value)?)),
            "server_key" => self.server_key = Some(need(value)?.to_string()),
            "cipher" => self.cipher = Some(need(value)?.parse().map_err(bad)?),
            "congestion_control" => {
                self.congestion_control = Some(need(value)?.parse().map_err(bad)?)
            }
            "ro" => self.read_only = Some(flag(value)?),
            "rw" => self.read_only = Some(!flag(value)?),
            "resend_timeout" => self.resend_timeout = Some(positive_duration(need(value)?)?),
            "resend_count" => self.resend_count = Some(count(need(value)?, 0)?),
            "ping_interval" => self.ping_interval = Some(positive_duration(need(value)?)?),
            "window_requests" => self.window_requests = Some(count(need(value)?, 1)? as usize),
            "window_bytes" => {
                let n = parse_size(need(value)?).map_err(bad)?;
                if n == 0 {
                    return Err(SetError::Bad("must be more than 0".into()));
                }
                self.window_bytes =
                    Some(usize::try_from(n).map_err(|_| {
                        SetError::Bad("is larger than this machine can address".into())
                    })?)
            }
            "max_transfer" => self.max_transfer = Some(transfer(need(value)?)?),
            "fail_fast" => self.fail_fast = Some(flag(value)?),
            "foreground" => self.foreground = Some(flag(value)?),
            "log_file" => self.log_file = Some(PathBuf::from(need(value)?)),
            _ => return Err(SetError::Unknown),
        }
        Ok(())
    }

    /// These options with every setting given in `over` replacing this one's.
    pub fn over(self, over: Options) -> Options {
        Options {
            key: over.key.or(self.key),
            server_key: over.server_key.or(self.server_key),
            cipher: over.cipher.or(self.cipher),
            congestion_control: over.congestion_control.or(self.congestion_control),
            read_only: over.read_only.or(self.read_only),
            resend_timeout: over.resend_timeout.or(self.resend_timeout),
            resend_count: over.resend_count.or(self.resend_count),
            ping_interval: over.ping_interval.or(self.ping_interval),
            window_requests: over.window_requests.or(self.window_requests),
            window_bytes: over.window_bytes.or(self.window_bytes),
            max_transfer: over.max_transfer.or(self.max_transfer),
            fail_fast: over.fail_fast.or(self.fail_fast),
            foreground: over.foreground.or(self.foreground),
            log_file: over.log_file.or(self.log_file),
        }
    }
}

enum SetError {
    Unknown,
    Bad(String),
}

fn positive_duration(s: &str) -> Result<Duration, SetError> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err(SetError::Bad("must be more than 0".into())),
        Ok(d) => Ok(d),
        Err(e) => Err(SetError::Bad(e)),
    }
}

fn count(s: &str, min: u32) -> Result<u32, SetError> {
    match s.parse::<u32>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(SetError::Bad(format!(
            "expected a whole number from {min} to {}",
            u32::MAX
        ))),
    }
}

/// Parses a `max_transfer` value: at least 4 KiB (one block), at most what fits the protocol.
pub fn parse_max_transfer(s: &str) -> Result<u32, String> {
    transfer(s).map_err(|e| match e {
        SetError::Bad(why) => why,
        SetError::Unknown => unreachable!(),
    })
}

fn transfer(s: &str) -> Result<u32, SetError> {
    let n = parse_size(s).map_err(SetError::Bad)?;
    match u32::try_from(n) {
        Ok(n) if n >= 4096 => Ok(n),
        _ => Err(SetError::Bad(format!(
            "'{s}' is outside 4K to {}",
            u32::MAX
        ))),
    }
}

/// One dst line of an fstab.
#[derive(Debug, Clone, PartialEq)]
pub struct FstabEntry {
    pub source: Source,
    pub mountpoint: PathBuf,
    pub options: Options,
    /// Unknown options found with `sloppy`.
    pub warnings: Vec<String>,
}

/// Finds the line of `fstab` (its text) that mounts `mountpoint` and parses it. Lines of other
/// types are skipped; a dst line with bad options is an error even with other lines around,
/// since silently skipping it would mount something else or nothing.
pub fn find_fstab_entry(
    fstab: &str,
    mountpoint: &Path,
    sloppy: bool,
) -> Result<FstabEntry, String> {
    let want = normalize(mountpoint);
    for (n, line) in fstab.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<String> = line.split_whitespace().map(unescape).collect();
        if fields.len() < 3 || normalize(Path::new(&fields[1])) != want {
            continue;
        }
        let at = || format!("fstab line {}", n + 1);
        if !FSTAB_TYPES.contains(&fields[2].as_str()) {
            return Err(format!(
                "{}: {} is of type '{}', not dst",
                at(),
                fields[1],
                fields[2]
            ));
        }
        let source = fields[0]
            .parse::<Source>()
            .map_err(|e| format!("{}: {e}", at()))?;
        let (options, warnings) = match fields.get(3) {
            Some(text) => Options::parse(text, sloppy).map_err(|e| format!("{}: {e}", at()))?,
            None => (Options::default(), Vec::new()),
        };
        return Ok(FstabEntry {
            source,
            mountpoint: PathBuf::from(&fields[1]),
            options,
            warnings,
        });
    }
    Err(format!(
        "no fstab line mounts {}; give the source and options on the command line",
        mountpoint.display()
    ))
}

/// How dst-mount was invoked, before the layers are merged.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// `[SOURCE] MOUNTPOINT`.
    pub positional: Vec<String>,
    pub server: Option<Server>,
    pub export: Option<String>,
    /// Each `-o` string.
    pub option_strings: Vec<String>,
    /// Settings given as flags (`--ro`, `--resend-timeout`, ...).
    pub flags: Options,
    pub sloppy: bool,
}

/// What to mount where, with every layer merged: fstab (when the source comes from there),
/// then `-o`, then flags.
#[derive(Debug, Clone, PartialEq)]
pub struct MountRequest {
    pub source: Source,
    pub mountpoint: PathBuf,
    pub options: Options,
    /// Unknown options skipped under `sloppy`.
    pub warnings: Vec<String>,
}

/// Merges an invocation. With a source (`SOURCE MOUNTPOINT`, or `--server` and `--export`)
/// fstab is not read; with only `MOUNTPOINT`, `fstab` is called for the fstab text and the
/// line of that mount point supplies source and options.
pub fn resolve(
    inv: Invocation,
    fstab: impl FnOnce() -> Result<String, String>,
) -> Result<MountRequest, String> {
    let mut warnings = Vec::new();
    let (source, mountpoint, base) = match (inv.positional.as_slice(), inv.server, inv.export) {
        ([source, mountpoint], None, None) => {
            (source.parse::<Source>()?, mountpoint, Options::default())
        }
        ([_, _], _, _) => {
            return Err(
                "give the source either as SOURCE or as --server and --export, not both".into(),
            )
        }
        ([mountpoint], Some(server), Some(export)) => {
            check_export_name(&export)?;
            (Source { server, export }, mountpoint, Options::default())
        }
        ([_], Some(_), None) => return Err("--server needs --export".into()),
        ([_], None, Some(_)) => return Err("--export needs --server".into()),
        ([mountpoint], None, None) => {
            let entry = find_fstab_entry(&fstab()?, Path::new(mountpoint), inv.sloppy)?;
            warnings.extend(entry.warnings);
            (entry.source, mountpoint, entry.options)
        }
        _ => return Err("expected [SOURCE] MOUNTPOINT".into()),
    };
    let mut options = base;
    for text in &inv.option_strings {
        let (o, w) = Options::parse(text, inv.sloppy)?;
        warnings.extend(w);
        options = options.over(o);
    }
    Ok(MountRequest {
        source,
        mountpoint: PathBuf::from(mountpoint),
        options: options.over(inv.flags),
        warnings,
    })
}

/// One line of the kernel's mount table (`/proc/self/mounts`), its fields unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub source: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
}

/// What is mounted at `mountpoint` according to `mounts` (the text of /proc/self/mounts):
/// the topmost of several mounts on one directory, which is the last line.
pub fn find_mount(mounts: &str, mountpoint: &Path) -> Option<MountEntry> {
    let want = normalize(mountpoint);
    mounts.lines().rev().find_map(|line| {
        let mut fields = line.split_whitespace().map(unescape);
        let (source, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (normalize(Path::new(&dir)) == want).then(|| MountEntry {
            source,
            mountpoint: PathBuf::from(dir),
            fstype,
        })
    })
}

/// A mount point compared without trailing slashes or `.` components.
fn normalize(path: &Path) -> PathBuf {
    path.components().collect()
}

/// Undoes fstab's octal escapes (`\040` for a space, as getmntent(3) reads them).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_inside_a_host_are_refused() {
        // Found by the mount_options fuzz target: `[[x]` was host `[x`, printed `[x:7700`,
        // which did not parse back.
        for bad in ["[[x]", "[x]]:7700", "a]b", "[a[b]:1"] {
            assert!(bad.parse::<Server>().is_err(), "{bad} accepted");
        }
        assert_eq!("[::1]:7700".parse::<Server>().unwrap().port, 7700);
    }

    #[test]
    fn servers() {
        let s: Server = "node1".parse().unwrap();
        assert_eq!((s.host.as_str(), s.port), ("node1", 7700));
        assert_eq!(s.address(), "node1:7700");
        let s: Server = "10.0.0.5:7800".parse().unwrap();
        assert_eq!(s.address(), "10.0.0.5:7800");
        let s: Server = "[::1]:7701".parse().unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", 7701));
        assert_eq!(s.address(), "[::1]:7701");
        assert_eq!("[fe80::1]".parse::<Server>().unwrap().port, 7700);
        assert!("::1".parse::<Server>().unwrap_err().contains("brackets"));
        assert!("h:0".parse::<Server>().unwrap_err().contains("port"));
        assert!("h:99999".parse::<Server>().unwrap_err().contains("port"));
        assert!(":7700".parse::<Server>().unwrap_err().contains("no host"));
        assert!("[::1".parse::<Server>().unwrap_err().contains("']'"));
    }

    #[test]
    fn sources() {
        let s: Source = "node1:7700/disk".parse().unwrap();
        assert_eq!(s.server.address(), "node1:7700");
        assert_eq!(s.export, "disk");
        assert_eq!(s.to_string(), "node1:7700/disk");
        let s: Source = "node1/backup.img".parse().unwrap();
        assert_eq!(s.server.port, 7700);
        assert_eq!(s.export, "backup.img");
        let s: Source = "[2001:db8::7]:9000/d".parse().unwrap();
        assert_eq!(s.server.address(), "[2001:db8::7]:9000");
        assert!("node1:7700"
            .parse::<Source>()
            .unwrap_err()
            .contains("names no export"));
        assert!("node1/"
            .parse::<Source>()
            .unwrap_err()
            .contains("export name"));
        assert!("node1/a b".parse::<Source>().is_err());
        assert!("/disk".parse::<Source>().unwrap_err().contains("no host"));
    }

    #[test]
    fn options_parse_and_convert() {
        let (o, w) = Options::parse(
            "key=/etc/dst/client.key,server_key=/etc/dst/server.key.pub,cipher=aesgcm,ro,\
             congestion-control=reno,resend_timeout=2s,resend_count=30,ping-interval=500ms,window_requests=64,\
             window_bytes=16M,max_transfer=256K,foreground,log_file=/var/log/dst.log",
            false,
        )
        .unwrap();
        assert!(w.is_empty());
        assert_eq!(o.key, Some(PathBuf::from("/etc/dst/client.key")));
        assert_eq!(o.server_key.as_deref(), Some("/etc/dst/server.key.pub"));
        assert_eq!(o.cipher, Some(Cipher::AesGcm));
        assert_eq!(o.congestion_control, Some(Congestion::Named("reno".into())));
        assert_eq!(o.read_only, Some(true));
        assert_eq!(o.resend_timeout, Some(Duration::from_secs(2)));
        assert_eq!(o.resend_count, Some(30));
        assert_eq!(o.ping_interval, Some(Duration::from_millis(500)));
        assert_eq!(o.window_requests, Some(64));
        assert_eq!(o.window_bytes, Some(16 << 20));
        assert_eq!(o.max_transfer, Some(256 << 10));
        assert_eq!(o.foreground, Some(true));
        assert_eq!(o.log_file, Some(PathBuf::from("/var/log/dst.log")));
    }

    #[test]
    fn fail_fast_is_a_flag_that_layers() {
        for text in ["fail_fast", "fail-fast"] {
            let (o, _) = Options::parse(text, false).unwrap();
            assert_eq!(o.fail_fast, Some(true), "{text}");
        }
        let e = Options::parse("fail_fast=1", false).unwrap_err();
        assert!(e.contains("takes no value"), "{e}");
        let (fstab, _) = Options::parse("fail_fast,resend_timeout=3s", false).unwrap();
        let o = fstab.over(Options::parse("resend_count=5", false).unwrap().0);
        assert_eq!(o.fail_fast, Some(true));
        assert_eq!(o.resend_timeout, Some(Duration::from_secs(3)));
        assert_eq!(o.resend_count, Some(5));
        assert!(KNOWN_OPTIONS.contains("fail_fast"));
    }

    #[test]
    fn mounts_are_found_topmost_first() {
        let mounts = "\
/dev/vda / ext4 rw,relatime 0 0
node1:7700/disk /mnt/remote fuse.dst rw,nosuid,nodev 0 0
node2:7700/disk /mnt/with\\040space fuse.dst rw 0 0
tmpfs /mnt/remote tmpfs rw 0 0
";
        let e = find_mount(mounts, Path::new("/mnt/remote/")).unwrap();
        assert_eq!((e.source.as_str(), e.fstype.as_str()), ("tmpfs", "tmpfs"));
        let e = find_mount(mounts, Path::new("/mnt/with space")).unwrap();
        assert_eq!(e.source, "node2:7700/disk");
        assert_eq!(e.mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(e.fstype, "fuse.dst");
        assert_eq!(find_mount(mounts, Path::new("/mnt")), None);
        assert_eq!(find_mount("garbage\n", Path::new("/")), None);
    }

    #[test]
    fn base64_server_key_keeps_its_equals_signs() {
        let key = "PFk3DYsaFUOvuur4zU69QxnLCX7aHkAQZgrHt68taT0=";
        let (o, _) = Options::parse(&format!("server_key={key}"), false).unwrap();
        assert_eq!(o.server_key.as_deref(), Some(key));
    }

    #[test]
    fn mount_and_systemd_options_are_ignored() {
        let (o, w) = Options::parse(
            "defaults,_netdev,noauto,nofail,user,auto,nouser,x-systemd.automount,\
             x-systemd.requires=network-online.target,comment=systemd.mount,noatime,nosuid,nodev,rw",
            false,
        )
        .unwrap();
        assert!(w.is_empty());
        assert_eq!(
            o,
            Options {
                read_only: Some(false),
                ..Options::default()
            }
        );
    }

    #[test]
    fn unknown_options_are_refused_with_the_known_ones() {
        let e = Options::parse("key=k,colour=blue", false).unwrap_err();
        assert!(e.contains("unknown mount option 'colour=blue'"), "{e}");
        assert!(e.contains("resend_timeout=DURATION"), "{e}");
        // mount -s: a warning instead.
        let (o, w) = Options::parse("key=k,colour=blue", true).unwrap();
        assert_eq!(o.key, Some(PathBuf::from("k")));
        assert_eq!(w, ["ignoring unknown mount option 'colour=blue'"]);
    }

    #[test]
    fn bad_values_are_explained() {
        for (text, want) in [
            ("key", "needs a value"),
            ("key=", "needs a value"),
            ("ro=1", "takes no value"),
            ("cipher=rot13", "rot13"),
            ("congestion_control=cu/bic", "congestion control name"),
            ("resend_timeout=soon", "duration"),
            ("resend_timeout=0", "more than 0"),
            ("resend_count=-1", "whole number"),
            ("window_requests=0", "from 1"),
            ("window_bytes=0", "more than 0"),
            ("max_transfer=1K", "outside 4K"),
            ("max_transfer=8G", "outside 4K"),
        ] {
            let e = Options::parse(text, true).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.starts_with(&format!("mount option '{text}'")), "{e}");
        }
    }

    #[test]
    fn later_layers_win() {
        let (fstab, _) =
            Options::parse("key=a,ro,resend_count=3,congestion_control=reno", false).unwrap();
        let (cli, _) = Options::parse("key=b,rw,congestion_control=system", false).unwrap();
        let o = fstab.over(cli);
        assert_eq!(o.key, Some(PathBuf::from("b")));
        assert_eq!(o.congestion_control, Some(Congestion::System));
        assert_eq!(o.read_only, Some(false));
        assert_eq!(o.resend_count, Some(3));
    }

    const FSTAB: &str = "\
# /etc/fstab
UUID=1234  /      ext4  defaults 0 1
node1:7700/disk  /mnt/remote  dst  _netdev,key=/etc/dst/client.key,server_key=/etc/dst/server.key.pub  0 0
node2/backup  /mnt/with\\040space/  fuse.dst  ro,key=/k,server_key=/s
tmpfs /tmp tmpfs defaults 0 0
node3/bad /mnt/bad dst frobnicate
";

    #[test]
    fn fstab_lines_are_found_by_mount_point() {
        let e = find_fstab_entry(FSTAB, Path::new("/mnt/remote/"), false).unwrap();
        assert_eq!(e.source.to_string(), "node1:7700/disk");
        assert_eq!(e.mountpoint, PathBuf::from("/mnt/remote"));
        assert_eq!(e.options.key, Some(PathBuf::from("/etc/dst/client.key")));
        assert_eq!(e.options.read_only, None);

        let e = find_fstab_entry(FSTAB, Path::new("/mnt/with space"), false).unwrap();
        assert_eq!(e.source.to_string(), "node2:7700/backup");
        assert_eq!(e.options.read_only, Some(true));
    }

    #[test]
    fn fstab_problems_are_explained() {
        let e = find_fstab_entry(FSTAB, Path::new("/mnt/none"), false).unwrap_err();
        assert!(e.contains("no fstab line mounts /mnt/none"), "{e}");
        let e = find_fstab_entry(FSTAB, Path::new("/tmp"), false).unwrap_err();
        assert!(e.contains("line 5") && e.contains("type 'tmpfs'"), "{e}");
        let e = find_fstab_entry(FSTAB, Path::new("/mnt/bad"), false).unwrap_err();
        assert!(e.contains("line 6") && e.contains("'frobnicate'"), "{e}");
    }

    #[test]
    fn fstab_escapes() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("tab\\011"), "tab\t");
        assert_eq!(unescape("plain\\"), "plain\\");
        assert_eq!(unescape("\\09x"), "\\09x");
    }

    #[test]
    fn export_names() {
        assert!(check_export_name("disk-1_a.img").is_ok());
        assert!(check_export_name("").is_err());
        assert!(check_export_name("a/b").is_err());
        assert!(check_export_name(&"x".repeat(256)).is_err());
    }

    fn invocation(positional: &[&str]) -> Invocation {
        Invocation {
            positional: positional.iter().map(|s| s.to_string()).collect(),
            ..Invocation::default()
        }
    }

    fn no_fstab() -> Result<String, String> {
        panic!("fstab must not be read")
    }

    #[test]
    fn resolve_source_and_mount_point() {
        let r = resolve(invocation(&["node1/disk", "/mnt/r"]), no_fstab).unwrap();
        assert_eq!(r.source.to_string(), "node1:7700/disk");
        assert_eq!(r.mountpoint, PathBuf::from("/mnt/r"));

        let mut inv = invocation(&["/mnt/r"]);
        inv.server = Some("node1:7800".parse().unwrap());
        inv.export = Some("disk".into());
        let r = resolve(inv, no_fstab).unwrap();
        assert_eq!(r.source.to_string(), "node1:7800/disk");

        let mut inv = invocation(&["/mnt/r"]);
        inv.server = Some("node1".parse().unwrap());
        assert!(resolve(inv, no_fstab).unwrap_err().contains("--export"));
        let mut inv = invocation(&["node1/disk", "/mnt/r"]);
        inv.export = Some("disk".into());
        assert!(resolve(inv, no_fstab).unwrap_err().contains("not both"));
    }

    #[test]
    fn resolve_layers_fstab_then_o_then_flags() {
        let mut inv = invocation(&["/mnt/remote"]);
        inv.option_strings = vec!["resend_count=5,ro".into(), "key=/o".into()];
        inv.flags.read_only = Some(false);
        let r = resolve(inv, || Ok(FSTAB.to_string())).unwrap();
        assert_eq!(r.source.to_string(), "node1:7700/disk");
        assert_eq!(r.options.key, Some(PathBuf::from("/o")));
        assert_eq!(
            r.options.server_key.as_deref(),
            Some("/etc/dst/server.key.pub")
        );
        assert_eq!(r.options.resend_count, Some(5));
        assert_eq!(r.options.read_only, Some(false));

        let e = resolve(invocation(&["/mnt/remote"]), || {
            Err("cannot read /etc/fstab".into())
        });
        assert_eq!(e.unwrap_err(), "cannot read /etc/fstab");
    }

    #[test]
    fn resolve_collects_sloppy_warnings() {
        let mut inv = invocation(&["n/d", "/m"]);
        inv.option_strings = vec!["bogus".into()];
        assert!(resolve(inv.clone(), no_fstab).is_err());
        inv.sloppy = true;
        let r = resolve(inv, no_fstab).unwrap();
        assert_eq!(r.warnings, ["ignoring unknown mount option 'bogus'"]);
    }
}
