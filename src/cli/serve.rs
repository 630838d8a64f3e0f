//! `nbdcrypt serve`: unlock volumes once, then serve them over NBD until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{CliResult, Global, open_kms, parse_size};
use crate::control::{self, Control};
use crate::kms::Kms;
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
    /// Most client connections served at once; more are closed at once.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Most bytes of requests in flight per connection (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    max_inflight: u64,
    /// Unix socket for admin commands (`nbdcrypt snapshot create --server`,
    /// `nbdcrypt admin`): mode 0600, served to this user only.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Most bytes of requests in flight in all connections together: the
    /// bound on the server's request memory, whatever the clients do.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    max_inflight_total: u64,
    /// Seconds a client may leave its replies unread before it is
    /// disconnected (its requests hold memory until their replies are out).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    reply_timeout: u64,
    /// Microseconds a client on a Unix socket is polled for the rest of a
    /// write's payload, and for its next request when it has none in
    /// flight, before the server sleeps, like the kernel's busy polling: on
    /// a virtual machine, waking a halted CPU costs more than the wait. A
    /// client that sends one request at a time keeps one CPU busy. 0 never
    /// polls, for a host where an idle CPU must stay idle; at most 1000.
    /// TCP clients are not polled.
    #[arg(
        long,
        default_value_t = nbd::busy_poll::DEFAULT_BUDGET.as_micros() as u64,
        value_parser = clap::value_parser!(u64).range(0..=1000),
        value_name = "MICROSECONDS"
    )]
    busy_poll: u64,
}

pub fn run(args: ServeArgs, global: &Global) -> CliResult {
    if args.listen.is_empty() && args.unix.is_empty() {
        return Err("nothing to listen on: give --listen ADDR and/or --unix PATH".into());
    }
    let kms = open_kms(global)?;
    let mut exports: Vec<Export> = Vec::new();
    let mut volumes: Vec<Arc<Volume>> = Vec::new();
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
        let volume = Arc::new(volume);
        exports.push(Export {
            name: volume.id().to_owned(),
            // What any client may read: nothing of this machine's paths.
            description: format!(
                "nbdcrypt volume {}, {}-byte sectors",
                volume.id(),
                volume.sector_size()
            ),
            read_only,
            backend: volume.clone(),
        });
        volumes.push(volume);
    }
    // Online snapshots re-wrap volume keys, so a server with a control
    // socket keeps its KMS; one without needs it no more.
    let kms: Option<Arc<dyn Kms>> = match args.control {
        Some(_) => Some(Arc::new(kms)),
        None => {
            drop(kms);
            None
        }
    };

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
            busy_poll: std::time::Duration::from_micros(args.busy_poll),
            ..Limits::default()
        };
        // One signal stops both servers; so does the NBD server's end,
        // which drops the sender.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let control_task = match (&args.control, kms) {
            (Some(path), Some(kms)) => {
                let listener = bind_control(path)?;
                let control = Arc::new(Control::new(volumes, kms, args.db_id.clone()));
                eprintln!("nbdcrypt: control socket {}", path.display());
                Some(tokio::spawn(control::serve(listener, control, stopped)))
            }
            _ => None,
        };
        let signal = async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        };
        let served = nbd::serve(exports, limits, listeners, signal).await;
        if let Some(task) = control_task {
            let _ = task.await;
        }
        for path in args.unix.iter().chain(&args.control) {
            let _ = std::fs::remove_file(path);
        }
        served?;
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

/// The control socket: 0600 at once after the bind; the window before the
/// chmod is closed by the peer-credential check of every connection.
fn bind_control(path: &Path) -> Result<tokio::net::UnixListener, super::CliError> {
    use std::os::unix::fs::PermissionsExt;
    remove_stale_socket(path)?;
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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
