//! `dst-mount`: mounts an export as one file in a FUSE mount. Parses arguments, merges them
//! with `-o` options and the fstab line, and wires the engine to the filesystem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dst::cipher::Cipher;
use dst::mount_options::{parse_max_transfer, resolve, Invocation, Options, Server};
use dst::socket::Congestion;
use dst::units::{parse_duration, parse_size};

/// Every argument but `--status`, `--format` and `--upgrade`: none of them goes with those.
const MOUNT_ARGS: [&str; 19] = [
    "positional",
    "server",
    "export",
    "key",
    "server_key",
    "ro",
    "cipher",
    "congestion_control",
    "resend_timeout",
    "resend_count",
    "ping_interval",
    "window_requests",
    "window_bytes",
    "max_transfer",
    "fail_fast",
    "foreground",
    "log_file",
    "options",
    "sloppy",
];

/// Mount a dst export as one large file in a FUSE mount.
///
/// SOURCE is HOST[:PORT]/EXPORT (port 7700 by default); instead give --server and --export,
/// or give only MOUNTPOINT to take source and options from its /etc/fstab line. Without
/// --foreground, dst-mount returns once the mount is ready and keeps serving in the background.
/// Unmount with umount MOUNTPOINT (or SIGTERM): in-flight writes finish first.
#[derive(Parser)]
#[command(
    version,
    override_usage = "dst-mount [OPTIONS] [SOURCE] MOUNTPOINT\n       dst-mount MOUNTPOINT    (source and options from /etc/fstab)\n       dst-mount --status MOUNTPOINT [--format prometheus]\n       dst-mount --upgrade MOUNTPOINT"
)]
struct Args {
    /// [SOURCE] MOUNTPOINT
    #[arg(
        value_name = "SOURCE|MOUNTPOINT",
        num_args = 1..=2,
        required_unless_present_any = ["status", "upgrade"]
    )]
    positional: Vec<String>,

    /// Print the live counters of the dst mount at MOUNTPOINT (its .stats) and exit; exits
    /// with 1 if MOUNTPOINT is not a dst mount or its dst-mount is gone
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with_all = MOUNT_ARGS)]
    status: Option<PathBuf>,

    /// Replace the process serving the dst mount at MOUNTPOINT with the dst-mount now
    /// installed, without unmounting (what `systemctl reload` does); needs Linux 6.9
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with_all = MOUNT_ARGS, conflicts_with = "status")]
    upgrade: Option<PathBuf>,

    /// How --status prints: human, or prometheus (for node_exporter's textfile collector)
    #[arg(long, value_name = "FORMAT", requires = "status")]
    format: Option<dst::status::Format>,

    /// The export node, HOST[:PORT]
    #[arg(long, value_name = "HOST[:PORT]")]
    server: Option<Server>,

    /// The export's name
    #[arg(long, value_name = "NAME")]
    export: Option<String>,

    /// The client's private key (made by dst-keygen)
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,

    /// The export node's public key to pin: a .pub file or the key itself (base64)
    #[arg(long, value_name = "FILE|BASE64")]
    server_key: Option<String>,

    /// Open the export read-only
    #[arg(long)]
    ro: bool,

    /// Channel cipher: aesgcm or chachapoly; default: aesgcm where the CPU has AES
    /// instructions, chachapoly elsewhere (the faster of the two there)
    #[arg(long, value_name = "CIPHER")]
    cipher: Option<Cipher>,

    /// TCP congestion control of the connection: a name from
    /// /proc/sys/net/ipv4/tcp_available_congestion_control, or `system` for the system's
    /// default [default: cubic where allowed, else the system's]
    #[arg(long, value_name = "NAME")]
    congestion_control: Option<Congestion>,

    /// Time without an ack before a transaction is resent [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    resend_timeout: Option<Duration>,

    /// Resends before a transaction fails with EIO [default: 12]
    #[arg(long, value_name = "N")]
    resend_count: Option<u32>,

    /// Idle time after which the connection is pinged [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ping_interval: Option<Duration>,

    /// Transactions in flight at most [default: 128]
    #[arg(long, value_name = "N")]
    window_requests: Option<usize>,

    /// Bytes of transactions in flight at most [default: 64M]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    window_bytes: Option<u64>,

    /// Largest single transfer to ask the server for [default: 1M]
    #[arg(long, value_name = "SIZE", value_parser = parse_max_transfer)]
    max_transfer: Option<u32>,

    /// For a member of an array (RAID1, md, LVM): fail I/O to a dead export node with EIO
    /// after about 4 s (resend timeout 1s, resend count 3, ping interval 1s) instead of
    /// riding out a minute of outage; --resend-timeout, --resend-count and --ping-interval
    /// still win
    #[arg(long)]
    fail_fast: bool,

    /// Stay in the foreground and log to stderr
    #[arg(long)]
    foreground: bool,

    /// Once mounted, append the log to FILE (in the background the log is otherwise dropped)
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,

    /// Mount options, comma-separated (as in fstab); may be repeated
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,

    /// Warn about unknown mount options instead of refusing them (mount -s)
    #[arg(long, hide = true)]
    sloppy: bool,
}

impl Args {
    fn invocation(self) -> Result<Invocation, String> {
        let window_bytes = match self.window_bytes {
            Some(0) => return Err("--window-bytes must be more than 0".into()),
            Some(n) => Some(usize::try_from(n).map_err(|_| "--window-bytes is too large")?),
            None => None,
        };
        if self.window_requests == Some(0) {
            return Err("--window-requests must be at least 1".into());
        }
        Ok(Invocation {
            positional: self.positional,
            server: self.server,
            export: self.export,
            option_strings: self.options,
            flags: Options {
                key: self.key,
                server_key: self.server_key,
                cipher: self.cipher,
                congestion_control: self.congestion_control,
                read_only: self.ro.then_some(true),
                resend_timeout: self.resend_timeout,
                resend_count: self.resend_count,
                ping_interval: self.ping_interval,
                window_requests: self.window_requests,
                window_bytes,
                max_transfer: self.max_transfer,
                fail_fast: self.fail_fast.then_some(true),
                foreground: self.foreground.then_some(true),
                log_file: self.log_file,
            },
            sloppy: self.sloppy,
        })
    }
}

fn main() -> ExitCode {
    // Before the key is read: no core dumps of key material.
    let protected = dst::process::protect_process();
    // fuser warns about harmless things, such as unmounting what umount(8) already unmounted.
    dst::logging::init("info,fuser=error");
    if let Err(e) = protected {
        log::warn!("cannot disable core dumps (key material could end up in one): {e}");
    }
    let args = Args::parse();
    if args.format.is_some() && args.status.is_none() {
        eprintln!("dst-mount: --format goes with --status MOUNTPOINT");
        return ExitCode::FAILURE;
    }
    if let Some(mountpoint) = &args.status {
        return match dst::status::status(mountpoint, args.format.unwrap_or_default()) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dst-mount: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(mountpoint) = &args.upgrade {
        return match dst::keeper::upgrade::upgrade(mountpoint) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dst-mount: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dst-mount: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // Before any thread exists: a worker takes its control socket from the environment.
    let worker = dst::keeper::worker_control()?;
    let req = resolve(args.invocation()?, || {
        let path = dst::mount::fstab_path();
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    })?;
    for warning in &req.warnings {
        log::warn!("{warning}");
    }
    let (key, server_key) = dst::mount::load_keys(&req)?;
    let cfg = dst::mount::engine_config(&req, key, server_key);
    // smol's global executor runs one thread unless told otherwise; the engine's encryption
    // and the FUSE replies share it, so give it a few. Set before any thread exists.
    if std::env::var_os("SMOL_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        std::env::set_var("SMOL_THREADS", n.to_string());
    }
    dst::mount::one_malloc_arena();
    if let Some(control) = worker {
        dst::worker::run(&req, cfg, control)
    }
    // The keeper only checks the keys and logs the settings; each worker loads them again.
    if req.options.foreground == Some(true) {
        dst::mount::run_foreground(&req, cfg)
    } else {
        dst::mount::run_background(&req, cfg)
    }
}
