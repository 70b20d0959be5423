//! `dst-keygen`: creates a Noise static key pair for dst-server or dst-mount.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Create a dst key pair: the private key in FILE (mode 0600), the public key in FILE.pub.
///
/// The public key is also printed on stdout, ready for the server's authorized_keys or the
/// client's --server-key.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Overwrite FILE and FILE.pub if they exist; peers that trust the old public key are
    /// locked out
    #[arg(long)]
    force: bool,

    /// Private key file to create; the public key goes to FILE.pub
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

fn main() -> ExitCode {
    // Before the key is generated: no core dumps of key material.
    let protected = dst::process::protect_process();
    dst::logging::init("warn");
    if let Err(e) = protected {
        log::warn!("cannot disable core dumps (key material could end up in one): {e}");
    }
    let args = Args::parse();
    match dst::keys::write_keypair(&args.file, args.force) {
        Ok(public) => {
            println!("{public}");
            eprintln!(
                "private key in {} (mode 0600), public key in {}",
                args.file.display(),
                dst::keys::public_key_path(&args.file).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dst-keygen: {e}");
            ExitCode::FAILURE
        }
    }
}
