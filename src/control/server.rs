//! The server side of the control socket: an accept loop that stops with
//! the server, a bound on connections, owner-only clients, and the commands.
//! Snapshots run on the blocking pool; a shutdown abandons them (their
//! partial files are removed) rather than making the server wait for a
//! whole copy.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{MAX_LINE, Request, Response};
use crate::kms::Kms;
use crate::snapshot;
use crate::volume::Volume;

/// Admin connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 16;

/// What the commands act on: the served volumes, the KMS that re-wraps
/// their keys for snapshots, and counters.
pub struct Control {
    volumes: Vec<Arc<Volume>>,
    kms: Arc<dyn Kms>,
    db_id: String,
    started: Instant,
    /// Set at shutdown: snapshots in progress give up.
    cancel: Arc<AtomicBool>,
    snapshots_taken: AtomicU64,
    snapshots_failed: AtomicU64,
    snapshots_running: AtomicU64,
}

impl Control {
    /// `db_id` is the DB instance the server attached `volumes` for.
    pub fn new(volumes: Vec<Arc<Volume>>, kms: Arc<dyn Kms>, db_id: String) -> Self {
        Self {
            volumes,
            kms,
            db_id,
            started: Instant::now(),
            cancel: Arc::new(AtomicBool::new(false)),
            snapshots_taken: AtomicU64::new(0),
            snapshots_failed: AtomicU64::new(0),
            snapshots_running: AtomicU64::new(0),
        }
    }

    /// Runs one command.
    pub async fn handle(self: &Arc<Self>, request: Request) -> Response {
        match request {
            Request::ListExports => Response::ok(json!({ "exports": self.exports(false) })),
            Request::Stats => Response::ok(json!({
                "pid": std::process::id(),
                "uptime_seconds": self.started.elapsed().as_secs(),
                "db_id": self.db_id,
                "exports": self.exports(true),
                "snapshots": {
                    "taken": self.snapshots_taken.load(Ordering::Relaxed),
                    "failed": self.snapshots_failed.load(Ordering::Relaxed),
                    "in_progress": self.snapshots_running.load(Ordering::Relaxed),
                },
            })),
            Request::SnapshotCreate {
                volume,
                snapshot_id,
                out,
            } => self.snapshot(volume, snapshot_id, &out).await,
        }
    }

    fn exports(&self, with_usage: bool) -> Vec<Value> {
        self.volumes
            .iter()
            .map(|v| {
                let mut e = json!({
                    "name": v.id(),
                    "path": v.path(),
                    "size": v.size(),
                    "sector_size": v.sector_size(),
                    "read_only": v.read_only(),
                    "allow_discards": v.allow_discards(),
                    "kms_key_id": v.header().kms_token().map(|t| t.key_id).unwrap_or_default(),
                });
                if with_usage && let Ok(meta) = v.backing().file().metadata() {
                    e["allocated"] = (meta.blocks() * 512).into();
                }
                e
            })
            .collect()
    }

    async fn snapshot(
        self: &Arc<Self>,
        volume: String,
        snapshot_id: String,
        out: &Path,
    ) -> Response {
        if !out.is_absolute() {
            return Response::error(format!(
                "{}: the output directory must be an absolute path (the server resolves it, not the client)",
                out.display()
            ));
        }
        let Some(vol) = self.volumes.iter().find(|v| v.id() == volume).cloned() else {
            return Response::error(snapshot::SnapshotError::NoSuchVolume(volume).to_string());
        };
        let (kms, db_id, cancel, out) = (
            self.kms.clone(),
            self.db_id.clone(),
            self.cancel.clone(),
            out.to_owned(),
        );
        self.snapshots_running.fetch_add(1, Ordering::Relaxed);
        let result = tokio::task::spawn_blocking(move || {
            snapshot::create_online(&vol, &*kms, &db_id, &snapshot_id, &out, &cancel)
        })
        .await;
        self.snapshots_running.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Ok(created)) => {
                self.snapshots_taken.fetch_add(1, Ordering::Relaxed);
                info!(snapshot = %created.snapshot_id, volume = %created.source_volume, pause_us = created.pause_micros, "snapshot taken");
                Response::ok(serde_json::to_value(created).expect("serializable"))
            }
            Ok(Err(e)) => {
                self.snapshots_failed.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "snapshot failed");
                Response::error(e.to_string())
            }
            Err(e) => {
                self.snapshots_failed.fetch_add(1, Ordering::Relaxed);
                Response::error(format!("the snapshot task failed: {e}"))
            }
        }
    }
}

/// Serves `control` on `listener` until `stop` says so (or its sender is
/// gone); then abandons running snapshots and waits for the connections.
pub async fn serve(listener: UnixListener, control: Arc<Control>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stop.wait_for(|&s| s) => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|&s| s) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let (control, stop) = (control.clone(), stop.clone());
                connections.spawn(async move {
                    if let Err(e) = connection(stream, control, stop).await {
                        warn!(error = %e, "control connection ended");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
    // Idle connections end by themselves; a snapshot in progress gives up
    // at its next chunk and its client hears why.
    control.cancel.store(true, Ordering::Relaxed);
    while connections.join_next().await.is_some() {}
}

async fn connection(
    stream: UnixStream,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let owner = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    if peer != owner {
        let refusal = Response::error(format!(
            "the control socket serves only its owner (uid {owner}), not uid {peer}"
        ));
        return send(&mut write, &refusal).await;
    }
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let n = tokio::select! {
            _ = stop.wait_for(|&s| s) => return Ok(()),
            n = limited.read_line(&mut line) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n > MAX_LINE {
            let refusal = Response::error(format!("a request line is at most {MAX_LINE} bytes"));
            return send(&mut write, &refusal).await;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => control.handle(request).await,
            Err(e) => Response::error(format!(
                "not a control request ({e}); commands: list-exports, stats, snapshot-create"
            )),
        };
        send(&mut write, &response).await?;
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).expect("a response always serializes");
    line.push(b'\n');
    write.write_all(&line).await
}
