//! `nbdcrypt snapshot …`: take snapshots (of a volume file, or of a served
//! volume through the server's control socket), list them, restore them.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;

use super::{CliResult, Global, open_kms, progress_bar};
use crate::control::{Client, Request};
use crate::snapshot::{self, RestoreOptions};

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Take a crash-consistent snapshot: the volume's ciphertext copied as it
    /// is (holes kept, reflinked where the file system can), its key
    /// re-wrapped by the KMS for the snapshot id. Offline from a volume file
    /// nobody serves, or online through a running server's control socket.
    Create {
        /// The volume file; with --server, the id of a volume it serves.
        #[arg(value_name = "VOLUME")]
        source: String,
        /// The control socket of the `nbdcrypt serve` serving the volume:
        /// take the snapshot while the volume is in use.
        #[arg(long, value_name = "CTL_SOCKET")]
        server: Option<PathBuf>,
        /// The DB instance the volume belongs to (offline; a server uses its own).
        #[arg(
            long,
            value_name = "DB_ID",
            required_unless_present = "server",
            conflicts_with = "server"
        )]
        db_id: Option<String>,
        /// The new snapshot's id: snap- and letters or digits.
        #[arg(long, value_name = "SNAPSHOT_ID")]
        snapshot_id: String,
        /// The directory to write the snapshot to (as DIR/SNAPSHOT_ID).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// List the snapshots in a directory: id, source volume, DB, time, size,
    /// KMS key. Reads headers only; needs no key.
    List { dir: PathBuf },
    /// Make a new volume from a snapshot, bound to a new DB instance and
    /// volume id (the key is re-wrapped by ReEncrypt, or replaced with
    /// --new-data-key). The new volume is sparse; `fallocate` on it
    /// reserves its space, as `volume create --preallocate` does.
    Restore {
        /// The snapshot file.
        snapshot: PathBuf,
        /// The new volume file; an existing file is never overwritten.
        path: PathBuf,
        /// The DB instance the new volume belongs to.
        #[arg(long, value_name = "DB_ID")]
        db_id: String,
        /// The new volume's id.
        #[arg(long, value_name = "VOL_ID")]
        vol_id: String,
        /// Another CMK for the new volume (key id, ARN or alias).
        #[arg(long, value_name = "KEY")]
        kms_key: Option<String>,
        /// Re-encrypt every sector under a fresh data key, so that the new
        /// volume shares no key with its source.
        #[arg(long)]
        new_data_key: bool,
    },
}

pub fn run(args: SnapshotArgs, global: &Global) -> CliResult {
    match args.command {
        SnapshotCommand::Create {
            source,
            server: Some(server),
            snapshot_id,
            out,
            ..
        } => {
            let request = Request::SnapshotCreate {
                volume: source,
                snapshot_id,
                // The server resolves the path, from its own directory.
                out: std::path::absolute(&out)?,
            };
            let created = Client::connect(&server)?.call(&request)?;
            print_created(global, &created);
            Ok(())
        }
        SnapshotCommand::Create {
            source,
            server: None,
            db_id,
            snapshot_id,
            out,
        } => {
            let kms = open_kms(global)?;
            let db_id = db_id.expect("clap requires --db-id without --server");
            let path = Path::new(&source);
            let size = crate::volume::read_header(path, &std::fs::File::open(path)?)
                .map(|h| h.data_size())
                .unwrap_or(0);
            let bar = progress_bar(global, size, "snapshot");
            let created =
                snapshot::create_offline(path, &kms, &db_id, &snapshot_id, &out, &|done| {
                    bar.set_position(done)
                });
            bar.finish_and_clear();
            print_created(global, &serde_json::to_value(created?)?);
            Ok(())
        }
        SnapshotCommand::List { dir } => {
            let found = snapshot::list(&dir)?;
            if global.json {
                println!("{}", json!({ "snapshots": found }));
                return Ok(());
            }
            println!(
                "{:<24} {:<24} {:<30} {:<20} {:>14} KMS KEY",
                "ID", "SOURCE VOLUME", "DB", "CREATED", "SIZE"
            );
            for s in found {
                println!(
                    "{:<24} {:<24} {:<30} {:<20} {:>14} {}",
                    s.snapshot_id, s.source_volume, s.db_id, s.created, s.size, s.kms_key_id
                );
            }
            Ok(())
        }
        SnapshotCommand::Restore {
            snapshot,
            path,
            db_id,
            vol_id,
            kms_key,
            new_data_key,
        } => {
            let kms = open_kms(global)?;
            let opts = RestoreOptions {
                db_id,
                vol_id,
                kms_key,
                new_data_key,
            };
            let size = snapshot::SnapshotInfo::read(&snapshot)?.0.size;
            let what = if new_data_key {
                "re-encrypt"
            } else {
                "restore"
            };
            let bar = progress_bar(global, size, what);
            let restored = snapshot::restore(&snapshot, &path, &kms, &opts, &|done| {
                bar.set_position(done)
            });
            bar.finish_and_clear();
            let restored = restored?;
            if global.json {
                println!("{}", serde_json::to_value(&restored)?);
            } else {
                println!(
                    "restored {} as {} (db {}) on {} under {}{}",
                    restored.snapshot_id,
                    restored.volume_id,
                    restored.db_id,
                    restored.path.display(),
                    restored.kms_key_id,
                    if restored.new_data_key {
                        ", with a new data key"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
    }
}

fn print_created(global: &Global, created: &serde_json::Value) {
    if global.json {
        println!("{created}");
        return;
    }
    let text = |k: &str| created[k].as_str().unwrap_or_default().to_owned();
    let pause = match created["pause_micros"].as_u64() {
        Some(us) => format!("; writes held off {us} µs"),
        None => String::new(),
    };
    println!(
        "snapshot {} of {} (db {}) written to {}: {} bytes, {} copied, {} reflinked{pause}",
        text("snapshot_id"),
        text("source_volume"),
        text("db_id"),
        text("path"),
        created["size"],
        created["bytes_copied"],
        created["bytes_reflinked"],
    );
}
