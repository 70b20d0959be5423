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
mod tests;
