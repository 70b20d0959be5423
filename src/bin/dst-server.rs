//! `dst-server`: the export node. Parses arguments and wires the server together; the
//! `scrub` subcommand checks an image against its checksum table.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dst::cipher::Cipher;
use dst::server::advice;
use dst::server::auth::AuthorizedKeys;
use dst::server::backend::file::FileBackend;
use dst::server::backend::Backend;
use dst::server::checksums::{self, Checksums};
use dst::server::export::ExportSpec;
use dst::server::{Config, Control, Server};
use dst::socket::Congestion;
use dst::units::{parse_duration, parse_size};

/// Export files or block devices to dst clients over an authenticated, encrypted channel.
///
/// Serve with `dst-server --key FILE --authorized-keys FILE --export NAME=PATH ...`;
/// check an image against its checksum table with `dst-server scrub --export NAME=PATH`.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Option<Args>,
}

#[derive(Subcommand)]
enum Command {
    /// Verify an image against its checksum table (PATH.dst-sum, or TABLE given with
    /// :checksums=TABLE), with the export not being served. Exits 1 if corrupt blocks are
    /// found, 2 if the scrub could not run
    Scrub(ScrubArgs),
    /// Sum up a running server for people: sessions, connections, memory, refusals, each
    /// export's requests and each client key's traffic, read from its --metrics endpoint
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The address the server serves --metrics on
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: SocketAddr,
}

#[derive(clap::Args)]
struct ScrubArgs {
    /// The export, as given to the server: NAME=PATH, plus :checksums=TABLE where the
    /// server keeps the table there (other suffixes, such as :ro, are ignored)
    #[arg(long = "export", value_name = "NAME=PATH[:checksums=TABLE]")]
    export: ExportSpec,

    /// Rebuild the table from the image's current contents, for an image known to be good
    /// (after a legitimate change made outside dst)
    #[arg(long)]
    repair_table: bool,
}

/// Serving exports.
#[derive(clap::Args)]
struct Args {
    /// The server's private key (made by dst-keygen)
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Client public keys allowed in, one a line: KEY [exports=A,B] [ro] [# comment]
    #[arg(long, value_name = "FILE")]
    authorized_keys: PathBuf,

    /// An export: NAME=PATH, a regular file or block device. Suffixes, in any order: :ro
    /// for read-only, :checksums to keep per-block checksums in PATH.dst-sum, or
    /// :checksums=TABLE to keep them in the file TABLE (required for a block device).
    /// Repeat for more exports
    #[arg(
        long = "export",
        value_name = "NAME=PATH[:ro][:checksums[=TABLE]]",
        required = true
    )]
    exports: Vec<ExportSpec>,

    /// Create a missing export file as a sparse image of this size (e.g. 100G)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    create_size: Option<u64>,

    /// Address and port to listen on
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7700")]
    listen: SocketAddr,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off unless given). Bind it to
    /// localhost or a management network: the counters name exports and client keys'
    /// comments
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,

    /// Ciphers clients may choose, comma-separated: chachapoly, aesgcm
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "chachapoly,aesgcm"
    )]
    cipher: Vec<Cipher>,

    /// TCP congestion control of client connections: a name from
    /// /proc/sys/net/ipv4/tcp_available_congestion_control, or `system` for the system's
    /// default [default: cubic where allowed, else the system's; pacing controls such as
    /// bbr cost sequential throughput on fast links]
    #[arg(long, value_name = "NAME")]
    congestion_control: Option<Congestion>,

    /// Largest single transfer a client may use
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1M")]
    max_transfer: u64,

    /// Time a connecting client has to send its first handshake message; one that has
    /// not is closed, so idle connections do not hold handshake places
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2s")]
    first_flight_timeout: Duration,

    /// Time a connecting client has to finish the handshake and negotiation
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    handshake_timeout: Duration,

    /// How long a disconnected client's session (and its hold on a read-write export) is
    /// kept for it to reconnect
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "120s")]
    session_linger: Duration,

    /// Sessions of one client key, connected or lingering; at the cap, the key's oldest
    /// disconnected session makes room
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_SESSIONS_PER_KEY)]
    max_sessions_per_key: usize,

    /// Sessions in all, connected or lingering; at the cap, the oldest disconnected session
    /// (of the same key first) makes room
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,

    /// Authenticated connections open at once, in all; more are refused with a message
    /// (connections still in the handshake count against --max-handshakes instead)
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,

    /// Connections open at once with one client key
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_CONNECTIONS_PER_KEY)]
    max_connections_per_key: usize,

    /// Connections in the handshake at once, in all; a new one beyond this closes the
    /// oldest, so idle or slow strangers cannot lock clients out
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_HANDSHAKES)]
    max_handshakes: usize,

    /// Connections in the handshake at once from one address prefix (a /24 for IPv4, a
    /// /64 for IPv6); more are closed at once
    #[arg(
        long,
        alias = "max-handshakes-per-ip",
        value_name = "N",
        default_value_t = Config::DEFAULT_MAX_HANDSHAKES_PER_PREFIX
    )]
    max_handshakes_per_prefix: usize,

    /// Bytes of requests one session may have in progress on the server
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    session_window: u64,

    /// Requests one session may have in progress on the server
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_SESSION_REQUESTS)]
    session_requests: usize,

    /// Memory all clients' requests may hold at once (write data, read data and replies
    /// not yet sent), including what each connection reserves when it is admitted (one
    /// request's room plus 512 KiB of buffers). When it is full, clients are read more
    /// slowly and new connections are refused until there is room
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256M")]
    memory_budget: u64,

    /// Memory the sessions of one client key may hold at once, beyond their connections'
    /// reserves [default: a quarter of --memory-budget]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_per_key: Option<u64>,

    /// How often checksum tables are made durable; after a crash, regions written within
    /// about twice this are rechecked and their mismatching blocks left unverified
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    checksum_checkpoint: Duration,
}

fn main() -> ExitCode {
    // Before the key is read: no core dumps of key material.
    let protected = dst::process::protect_process();
    dst::logging::init("info");
    if let Err(e) = protected {
        log::warn!("cannot disable core dumps (key material could end up in one): {e}");
    }
    let cli = Cli::parse();
    let args = match (cli.command, cli.serve) {
        (Some(Command::Scrub(scrub)), _) => return run_scrub(scrub),
        (Some(Command::Status(status)), _) => return run_status(status),
        (None, Some(args)) => args,
        // arg_required_else_help: clap has printed the help already.
        (None, None) => return ExitCode::FAILURE,
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("dst-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    raise_fd_limit();
    let key = dst::keys::load_private(&args.key).map_err(|e| e.to_string())?;
    let authorized_keys = AuthorizedKeys::load(&args.authorized_keys)?;
    if authorized_keys.is_empty() {
        log::warn!(
            "{} lists no client keys: no client can connect",
            args.authorized_keys.display()
        );
    }
    let max_transfer = u32::try_from(args.max_transfer)
        .map_err(|_| format!("--max-transfer {} is too large", args.max_transfer))?;
    let cfg = Config {
        key,
        authorized_keys,
        authorized_keys_path: args.authorized_keys,
        exports: args
            .exports
            .into_iter()
            .map(|spec| ExportSpec {
                checksum_checkpoint: args.checksum_checkpoint,
                ..spec
            })
            .collect(),
        create_size: args.create_size,
        listen: args.listen,
        ciphers: args.cipher,
        max_transfer,
        first_flight_timeout: args.first_flight_timeout,
        handshake_timeout: args.handshake_timeout,
        session_linger: args.session_linger,
        max_sessions_per_key: args.max_sessions_per_key,
        max_sessions: args.max_sessions,
        session_window: args.session_window as usize,
        session_requests: args.session_requests,
        memory_budget: args.memory_budget as usize,
        memory_per_key: args.memory_per_key.unwrap_or(args.memory_budget / 4) as usize,
        max_connections: args.max_connections,
        max_connections_per_key: args.max_connections_per_key,
        max_handshakes: args.max_handshakes,
        max_handshakes_per_prefix: args.max_handshakes_per_prefix,
        congestion: args.congestion_control.unwrap_or_default(),
        metrics: args.metrics,
    };
    smol::block_on(async {
        let server = Server::bind(cfg).await?;
        let control = server.control();
        let stop = handle_signals(control.clone())
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        log::info!("listening on {addr}");
        dst::service::ready(&format!("listening on {addr}; {}", control.status()));
        let _status = dst::service::managed().then(|| smol::spawn(report_status(control)));
        server.run(stop).await.map_err(|e| e.to_string())
    })
}

/// Raises the soft limit on open files to the hard one: a handshake takes a descriptor and
/// an open connection five (its socket, its readers' own, and their epoll set, eventfd and
/// watch), and the default soft limit (often 1024) is below that for --max-connections
/// plus --max-handshakes.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a properly sized struct of our own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        log::debug!("raised the open files limit from {old} to {}", lim.rlim_cur);
    }
}

/// Tells the service manager the server's status, and pings its watchdog if it wants.
async fn report_status(control: Control) {
    const STATUS_EVERY: Duration = Duration::from_secs(10);
    let watchdog = dst::service::watchdog_interval();
    let every = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    loop {
        smol::Timer::after(every).await;
        dst::service::status(&control.status());
        if watchdog.is_some() {
            dst::service::watchdog();
        }
    }
}

/// Reloads the authorized keys and looks at the exports' sizes on SIGHUP; returns a future that resolves on the first
/// SIGINT or SIGTERM.
fn handle_signals(control: Control) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    let (tx, rx) = smol::channel::bounded(1);
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGHUP {
                dst::service::reloading();
                match control.reload() {
                    Ok(n) => log::info!("SIGHUP: reloaded authorized keys ({n} keys)"),
                    Err(e) => log::error!("SIGHUP: keeping the old authorized keys: {e}"),
                }
                let grown = control.check_sizes();
                log::info!("SIGHUP: looked at the exports' sizes ({grown} grew)");
                dst::service::ready(&control.status());
                continue;
            }
            log::info!("signal {sig} received");
            dst::service::stopping("finishing executing requests and syncing the exports");
            let _ = tx.send_blocking(());
            break;
        }
    });
    Ok(async move {
        let _ = rx.recv().await;
    })
}

/// `dst-server status`: exit status 0 with the summary, 1 if the server cannot be read.
fn run_status(args: StatusArgs) -> ExitCode {
    match dst::server::report::fetch(args.metrics) {
        Ok(text) => {
            print!(
                "{}",
                dst::server::report::summarise(&args.metrics.to_string(), &text)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dst-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `dst-server scrub`: exit status 0 if the image matches its table, 1 if corrupt blocks
/// were found, 2 if the scrub could not run.
fn run_scrub(args: ScrubArgs) -> ExitCode {
    let spec = &args.export;
    let started = Instant::now();
    let opened = spec.checksum_table_path().and_then(|table| {
        let image = FileBackend::open(&spec.path, true)
            .map_err(|e| format!("{}: {e}", spec.path.display()))?;
        Ok((table, image))
    });
    let (table, image) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            eprintln!("dst-server scrub: {e}");
            return ExitCode::from(2);
        }
    };
    let bar = progress_bar(image.disk_size().unwrap_or(0));
    let mut progress = |done: u64| bar.set_position(done);
    let result = if args.repair_table {
        checksums::rebuild(&image, &table, &mut progress)
            .map_err(|e| advice::checksum_error(spec, &e))
            .map(|r| {
                bar.finish_and_clear();
                println!(
                    "rebuilt checksum table {} from {} in {:.1?}: {} blocks of 4 KiB ({} zero)",
                    table.display(),
                    spec.path.display(),
                    started.elapsed(),
                    r.blocks,
                    r.zero
                );
                ExitCode::SUCCESS
            })
    } else {
        scrub(spec, image, &table, &mut progress).map(|report| {
            bar.finish_and_clear();
            print_scrub(spec, &report, started.elapsed());
            if report.corrupt > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        })
    };
    result.unwrap_or_else(|e| {
        bar.finish_and_clear();
        eprintln!("dst-server scrub: {e}");
        ExitCode::from(2)
    })
}

fn scrub(
    spec: &ExportSpec,
    image: FileBackend,
    table_path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<checksums::ScrubReport, String> {
    if !table_path.exists() {
        return Err(format!(
            "{} has no checksum table ({} is missing); serve the export with :checksums to \
             start one, or build one from the image with --repair-table{}",
            spec.path.display(),
            table_path.display(),
            if spec.checksum_table.is_none() {
                "; if the server keeps it elsewhere, name it with :checksums=TABLE"
            } else {
                ""
            }
        ));
    }
    let table = Checksums::open(&spec.name, Box::new(image), table_path, None)
        .map_err(|e| advice::checksum_error(spec, &e))?;
    table
        .scrub(progress)
        .map_err(|e| format!("export '{}': scrub failed: {e}", spec.name))
}

fn print_scrub(spec: &ExportSpec, r: &checksums::ScrubReport, took: Duration) {
    println!(
        "scrubbed export '{}' ({}) in {took:.1?}: {} blocks of 4 KiB checked",
        spec.name,
        spec.path.display(),
        r.blocks
    );
    if r.was_unclean {
        println!("  the table was not closed cleanly; it was recovered first");
    }
    println!("  ok          {}", r.ok);
    println!("  zero        {}  (known zero, read as zeros)", r.zero);
    println!(
        "  unverified  {}  (had no usable checksum; their current contents are now recorded)",
        r.unverified
    );
    if r.corrupt == 0 {
        println!("  corrupt     0");
    } else {
        let more = if r.corrupt > r.first_corrupt.len() as u64 {
            ", ..."
        } else {
            ""
        };
        let first: Vec<String> = r.first_corrupt.iter().map(|b| b.to_string()).collect();
        println!(
            "  corrupt     {}  (blocks {}{more})",
            r.corrupt,
            first.join(", ")
        );
        println!(
            "reads of corrupt blocks fail with EIO until they are rewritten or restored; block N \
             is bytes N*4096 to N*4096+4095 of the image. If the image was changed on purpose and \
             is good, rebuild the table with --repair-table"
        );
    }
}

/// A progress bar on stderr, only when stderr is a terminal.
fn progress_bar(len: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}
