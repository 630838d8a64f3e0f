//! The `nbdcrypt` command line: clap definitions that wire the library
//! together. Every subcommand lives in its own module; none holds logic that a
//! library module should own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod kms;

/// The error every subcommand returns. Library errors already carry a
/// one-line message that says what is wrong and what to do, so the command line
/// only prints them.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;
pub type CliResult = Result<(), CliError>;

#[derive(Parser, Debug)]
#[command(
    name = "nbdcrypt",
    version,
    about = "Encrypted network block device: LUKS2 volumes, AES-XTS, KMS-wrapped data keys, served over NBD"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand understands.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Directory of the local KMS (key store, root key, audit log).
    #[arg(long, global = true, env = "NBDCRYPT_KMS_DIR", value_name = "DIR")]
    pub kms_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of human text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v: info, -vv: debug, -vvv: trace). Logs never contain
    /// data or keys.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage keys of the local KMS and read its audit log.
    Kms(kms::KmsArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    let result = match cli.command {
        Command::Kms(args) => kms::run(args, &cli.global),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdcrypt: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Quiet by default (warnings only), as a storage daemon should be;
/// `RUST_LOG` overrides `-v`.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
