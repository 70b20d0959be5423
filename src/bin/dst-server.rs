//! `dst-server`: the export node. Parses arguments and wires the server together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dst::channel::Cipher;
use dst::server::auth::AuthorizedKeys;
use dst::server::export::ExportSpec;
use dst::server::{Config, Reloader, Server};
use dst::units::{parse_duration, parse_size};

/// Export files or block devices to dst clients over an authenticated, encrypted channel.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The server's private key (made by dst-keygen)
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Client public keys allowed in, one a line: KEY [exports=A,B] [ro] [# comment]
    #[arg(long, value_name = "FILE")]
    authorized_keys: PathBuf,

    /// An export: NAME=PATH, a regular file or block device; NAME=PATH:ro for read-only.
    /// Repeat for more exports
    #[arg(long = "export", value_name = "NAME=PATH[:ro]", required = true)]
    exports: Vec<ExportSpec>,

    /// Create a missing export file as a sparse image of this size (e.g. 100G)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    create_size: Option<u64>,

    /// Address and port to listen on
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7700")]
    listen: SocketAddr,

    /// Ciphers clients may choose, comma-separated: chachapoly, aesgcm
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "chachapoly,aesgcm"
    )]
    cipher: Vec<Cipher>,

    /// Largest single transfer a client may use
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1M")]
    max_transfer: u64,

    /// Time a connecting client has to finish the handshake and negotiation
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    handshake_timeout: Duration,

    /// How long a disconnected client's session (and its hold on a read-write export) is
    /// kept for it to reconnect
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "120s")]
    session_linger: Duration,

    /// Connections open at once, in all
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,

    /// Connections open at once with one client key
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_CONNECTIONS_PER_KEY)]
    max_connections_per_key: usize,

    /// Connections in the handshake at once from one address; more are closed at once
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_HANDSHAKES_PER_IP)]
    max_handshakes_per_ip: usize,

    /// Bytes of requests one session may have in progress on the server
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    session_window: u64,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
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
        exports: args.exports,
        create_size: args.create_size,
        listen: args.listen,
        ciphers: args.cipher,
        max_transfer,
        handshake_timeout: args.handshake_timeout,
        session_linger: args.session_linger,
        session_window: args.session_window as usize,
        max_connections: args.max_connections,
        max_connections_per_key: args.max_connections_per_key,
        max_handshakes_per_ip: args.max_handshakes_per_ip,
    };
    smol::block_on(async {
        let server = Server::bind(cfg).await?;
        let stop = handle_signals(server.reloader())
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        log::info!("listening on {addr}");
        server.run(stop).await.map_err(|e| e.to_string())
    })
}

/// Reloads the authorized keys on SIGHUP; returns a future that resolves on the first
/// SIGINT or SIGTERM.
fn handle_signals(reloader: Reloader) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    let (tx, rx) = smol::channel::bounded(1);
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGHUP {
                match reloader.reload() {
                    Ok(n) => log::info!("SIGHUP: reloaded authorized keys ({n} keys)"),
                    Err(e) => log::error!("SIGHUP: keeping the old authorized keys: {e}"),
                }
                continue;
            }
            log::info!("signal {sig} received");
            let _ = tx.send_blocking(());
            break;
        }
    });
    Ok(async move {
        let _ = rx.recv().await;
    })
}
