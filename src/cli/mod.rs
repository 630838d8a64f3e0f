//! The `nbdcrypt` command line: clap definitions that wire the library
//! together. Every subcommand lives in its own module; none holds logic that a
//! library module should own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod admin;
pub mod kms;
pub mod serve;
pub mod snapshot;
pub mod volume;

use crate::kms::LocalKms;

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
    /// Create, inspect, import into and export from encrypted volumes.
    Volume(volume::VolumeArgs),
    /// Serve encrypted volumes over NBD (TCP and Unix sockets).
    Serve(serve::ServeArgs),
    /// Take, list and restore encrypted snapshots of volumes, also of served ones.
    Snapshot(snapshot::SnapshotArgs),
    /// Ask a running server (through its control socket) what it serves.
    Admin(admin::AdminArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    let result = match cli.command {
        Command::Kms(args) => kms::run(args, &cli.global),
        Command::Volume(args) => volume::run(args, &cli.global),
        Command::Serve(args) => serve::run(args, &cli.global),
        Command::Snapshot(args) => snapshot::run(args, &cli.global),
        Command::Admin(args) => admin::run(args, &cli.global),
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

/// The local KMS the global options name (or the per-user default).
pub fn open_kms(global: &Global) -> Result<LocalKms, CliError> {
    let dir = global.kms_dir.clone().unwrap_or_else(LocalKms::default_dir);
    Ok(LocalKms::open(&dir)?)
}

/// A progress bar on stderr for long copies; hidden with `--json` and when
/// stderr is not a terminal.
pub fn progress_bar(global: &Global, total: u64, what: &str) -> indicatif::ProgressBar {
    if global.json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>7} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Parses a byte count with an optional K, M, G or T suffix (powers of 1024,
/// as qemu-img and cryptsetup read them).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?}: use K, M, G or T")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4096, 512M, 10G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
