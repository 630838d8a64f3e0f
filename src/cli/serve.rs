//! `nbdcrypt serve`: unlock volumes once, then serve them over NBD until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{CliResult, Global, open_kms, parse_size};
use crate::nbd::{self, Export, Limits, Listener};
use crate::volume::{AttachOptions, Volume};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Volumes to serve, as PATH or PATH:ro (read-only). The export name is the
    /// volume id; the first volume is also the default export "".
    #[arg(required = true, value_name = "VOLUME[:ro]")]
    volumes: Vec<String>,
    /// TCP address to listen on (repeatable), e.g. 127.0.0.1:10809.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Unix socket to listen on (repeatable).
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// The DB instance attaching the volumes (half of the encryption context).
    #[arg(long, value_name = "DB_ID")]
    db_id: String,
    /// Let TRIM punch holes in the backing store. It reveals which blocks are
    /// free, as with dm-crypt's --allow-discards.
    #[arg(long)]
    allow_discards: bool,
    /// Most client connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = 128)]
    max_connections: usize,
    /// Most bytes of requests in flight per connection (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    max_inflight: u64,
    /// Most bytes of requests in flight in all connections together: the
    /// bound on the server's request memory, whatever the clients do.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    max_inflight_total: u64,
    /// Seconds a client may leave its replies unread before it is
    /// disconnected (its requests hold memory until their replies are out).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    reply_timeout: u64,
}

pub fn run(args: ServeArgs, global: &Global) -> CliResult {
    if args.listen.is_empty() && args.unix.is_empty() {
        return Err("nothing to listen on: give --listen ADDR and/or --unix PATH".into());
    }
    let kms = open_kms(global)?;
    let mut exports: Vec<Export> = Vec::new();
    for spec in &args.volumes {
        let (path, read_only) = match spec.strip_suffix(":ro") {
            Some(path) => (Path::new(path), true),
            None => (Path::new(spec.as_str()), false),
        };
        let opts = AttachOptions {
            db_id: args.db_id.clone(),
            read_only,
            allow_discards: args.allow_discards,
        };
        // Every volume unlocks before anything listens: a KMS refusal stops
        // the start with the KMS's own error.
        let volume = Volume::open(path, &kms, &opts)?;
        if exports.iter().any(|e| e.name == volume.id()) {
            return Err(format!(
                "two volumes have the id {}: an export name must be unique",
                volume.id()
            )
            .into());
        }
        exports.push(Export {
            name: volume.id().to_owned(),
            description: format!("nbdcrypt volume {}", volume.path().display()),
            read_only,
            backend: Arc::new(volume),
        });
    }
    drop(kms);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for addr in &args.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            bound.push(format!("nbd://{}", l.local_addr()?));
            listeners.push(Listener::Tcp(l));
        }
        for path in &args.unix {
            remove_stale_socket(path)?;
            let l = tokio::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            bound.push(format!("nbd+unix:///?socket={}", path.display()));
            listeners.push(Listener::Unix(l));
        }
        let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
        eprintln!(
            "nbdcrypt: serving {} on {}",
            names.join(", "),
            bound.join(" and ")
        );
        let limits = Limits {
            max_connections: args.max_connections,
            max_request_bytes: 32 << 20,
            max_inflight_bytes_per_connection: args.max_inflight as usize,
            max_inflight_bytes_total: args.max_inflight_total as usize,
            reply_timeout: std::time::Duration::from_secs(args.reply_timeout),
            ..Limits::default()
        };
        nbd::serve(exports, limits, listeners, shutdown_signal()).await?;
        for path in &args.unix {
            let _ = std::fs::remove_file(path);
        }
        eprintln!("nbdcrypt: stopped; every volume flushed");
        Ok::<(), super::CliError>(())
    })
}

/// SIGTERM or SIGINT, whichever comes first.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// A socket file left by a server that died is removed; anything else at that
/// path is not ours to delete.
fn remove_stale_socket(path: &Path) -> CliResult {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(
                    format!("{}: another server is listening there", path.display()).into(),
                );
            }
            std::fs::remove_file(path)?;
            Ok(())
        }
        Ok(_) => Err(format!("{}: exists and is not a socket", path.display()).into()),
        Err(_) => Ok(()),
    }
}
