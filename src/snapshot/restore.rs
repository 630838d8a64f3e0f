//! A new volume from a snapshot, bound to a new DB instance and volume id.
//!
//! By default the volume key is re-wrapped by ReEncrypt from the snapshot's
//! context to `{"aws:rds:db-id": NEW-DB, "aws:ebs:id": NEW-VOL}` (under the
//! same CMK or another) and the ciphertext is copied as it is, so the key
//! never leaves the KMS. With a new data key the restored volume shares no
//! key with its source: the snapshot is unlocked (Decrypt), a fresh data key
//! generated (GenerateDataKey), and every allocated sector decrypted and
//! encrypted again on the way.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::copy::Copier;
use super::list::SnapshotInfo;
use super::target::Target;
use super::{SnapshotError, rewrap, stored_context};
use crate::kms::{EncryptionContext, Kms};
use crate::volume::luks2::FormatParams;
use crate::volume::{AttachOptions, Backing, CreateOptions, Volume, VolumeError};

/// Plaintext is re-encrypted in pieces of this size.
const CHUNK: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The DB instance the new volume belongs to.
    pub db_id: String,
    /// The new volume's id.
    pub vol_id: String,
    /// Another CMK for the new volume (key id, ARN or alias); else the
    /// snapshot's.
    pub kms_key: Option<String>,
    /// Re-encrypt every sector under a fresh data key.
    pub new_data_key: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub path: PathBuf,
    pub volume_id: String,
    pub db_id: String,
    pub snapshot_id: String,
    pub kms_key_id: String,
    pub size: u64,
    pub new_data_key: bool,
    pub bytes_reflinked: u64,
    pub bytes_copied: u64,
    pub seconds: f64,
}

/// Restores the snapshot at `snapshot` as a new volume file at `path`
/// (which must not exist); `progress` hears the bytes done so far.
pub fn restore(
    snapshot: &Path,
    path: &Path,
    kms: &dyn Kms,
    opts: &RestoreOptions,
    progress: &dyn Fn(u64),
) -> Result<Restored, SnapshotError> {
    let started = Instant::now();
    crate::volume::check_id("--db-id", &opts.db_id, "db-")?;
    crate::volume::check_id("--vol-id", &opts.vol_id, "vol-")?;
    let (info, header) = SnapshotInfo::read(snapshot)?;
    let io = |source| VolumeError::Io {
        path: snapshot.to_owned(),
        source,
    };
    let source =
        Backing::new(OpenOptions::new().read(true).open(snapshot).map_err(io)?).map_err(io)?;
    source.lock(false).map_err(io)?;
    let token = header.kms_token().map_err(|source| SnapshotError::Header {
        path: snapshot.to_owned(),
        source,
    })?;
    let destination_key = opts.kms_key.clone().unwrap_or(token.key_id.clone());
    let target = Target::create(path, header.data_offset() + header.data_size(), |p| {
        VolumeError::OutputExists(p).into()
    })?;
    let copier = Copier::new();
    let mut restored = Restored {
        path: path.to_owned(),
        volume_id: opts.vol_id.clone(),
        db_id: opts.db_id.clone(),
        snapshot_id: info.snapshot_id.clone(),
        kms_key_id: String::new(),
        size: header.data_size(),
        new_data_key: opts.new_data_key,
        bytes_reflinked: 0,
        bytes_copied: 0,
        seconds: 0.0,
    };
    let new_context = EncryptionContext::for_volume(&opts.db_id, &opts.vol_id);
    if opts.new_data_key {
        let created = crate::volume::create(
            target.partial_path(),
            kms,
            &CreateOptions {
                size: Some(header.data_size()),
                sector_size: header.sector_size(),
                kms_key: destination_key,
                db_id: opts.db_id.clone(),
                vol_id: opts.vol_id.clone(),
                // The target's own empty, sparse partial file.
                force: true,
                preallocate: false,
            },
        )?;
        restored.kms_key_id = created
            .kms_token()
            .map_err(|source| SnapshotError::Header {
                path: target.partial_path().to_owned(),
                source,
            })?
            .key_id;
        drop(source);
        restored.bytes_copied = reencrypt(snapshot, &info.db_id, &target, kms, opts, progress)?;
        target.commit(None, 0o600, |p| VolumeError::OutputExists(p).into())?;
    } else {
        let token = rewrap(
            kms,
            &token,
            &stored_context(&token),
            &destination_key,
            &new_context,
        )?;
        restored.kms_key_id = token.key_id.clone();
        let params = FormatParams {
            uuid: uuid::Uuid::new_v4(),
            label: opts.vol_id.clone(),
            sector_size: header.sector_size(),
            data_offset: header.data_offset(),
            data_size: header.data_size(),
        };
        let mut new_header = header
            .format_sharing_key(&params, &token)
            .map_err(|source| SnapshotError::Header {
                path: target.partial_path().to_owned(),
                source,
            })?;
        let mut pos = 0;
        while pos < header.data_size() {
            let n = (header.data_size() - pos).min(64 << 20);
            copier
                .copy(&source, target.file(), header.data_offset() + pos, n)
                .map_err(|e| SnapshotError::io(target.path(), e))?;
            pos += n;
            progress(pos);
        }
        restored.bytes_reflinked = copier.reflinked();
        restored.bytes_copied = copier.copied();
        target.commit(Some(&mut new_header), 0o600, |p| {
            VolumeError::OutputExists(p).into()
        })?;
    }
    restored.seconds = started.elapsed().as_secs_f64();
    Ok(restored)
}

/// Copies the snapshot's plaintext into the freshly created volume in the
/// target, allocated extents only, all-zero pieces left as holes (they read
/// as zeros). Returns the bytes read from the snapshot.
fn reencrypt(
    snapshot: &Path,
    snapshot_db: &str,
    target: &Target,
    kms: &dyn Kms,
    opts: &RestoreOptions,
    progress: &dyn Fn(u64),
) -> Result<u64, SnapshotError> {
    let old = Volume::open(
        snapshot,
        kms,
        &AttachOptions {
            db_id: snapshot_db.to_owned(),
            read_only: true,
            allow_discards: false,
        },
    )?;
    let new = Volume::open(
        target.partial_path(),
        kms,
        &AttachOptions {
            db_id: opts.db_id.clone(),
            read_only: false,
            allow_discards: false,
        },
    )?;
    let old_io = |e| SnapshotError::io(snapshot, e);
    let new_io = |e| SnapshotError::io(target.path(), e);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut read = 0;
    let mut pos = 0;
    while pos < old.size() {
        for run in old.allocation(pos, old.size() - pos).map_err(old_io)? {
            let end = pos + run.length;
            let mut at = pos;
            while !run.hole && at < end {
                let n = (end - at).min(CHUNK);
                let piece = &mut buf[..n as usize];
                old.read(at, piece).map_err(old_io)?;
                if piece.iter().any(|&b| b != 0) {
                    new.write(at, piece).map_err(new_io)?;
                }
                read += n;
                at += n;
                progress(at);
            }
            pos = end;
            progress(pos);
        }
    }
    new.flush().map_err(new_io)?;
    Ok(read)
}
