//! Taking a snapshot: offline, of a volume file nobody writes (its lock is
//! taken), or online, of a volume a server is serving, by copy-on-write.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use super::copy::Copier;
use super::cow::{CopyOnWrite, Stopped};
use super::target::Target;
use super::{
    SNAPSHOT_TOKEN_TYPE, SnapshotError, SnapshotId, rewrap, snapshot_path, stored_context,
};
use crate::kms::{EncryptionContext, Kms, Timestamp};
use crate::volume::luks2::{FormatParams, Header, KmsToken};
use crate::volume::{Backing, Volume, VolumeError};

/// A snapshot just taken, and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub path: PathBuf,
    pub snapshot_id: SnapshotId,
    pub source_volume: String,
    pub db_id: String,
    pub created: Timestamp,
    pub size: u64,
    pub kms_key_id: String,
    /// Bytes shared with the source by reflink.
    pub bytes_reflinked: u64,
    /// Bytes read and written.
    pub bytes_copied: u64,
    /// Online only: how long writes were held off to fix the snapshot point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_micros: Option<u64>,
    /// Online only: chunks whose old ciphertext a write copied first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_copied_by_writes: Option<u64>,
    pub seconds: f64,
}

/// Snapshots the volume file at `volume_path`, which must not be in use by
/// a writer (a shared lock is held for the copy), into `out_dir`.
/// `db_id` is the DB instance the volume belongs to: the KMS checks it when
/// it re-wraps the key.
pub fn create_offline(
    volume_path: &Path,
    kms: &dyn Kms,
    db_id: &str,
    snapshot_id: &str,
    out_dir: &Path,
    progress: &dyn Fn(u64),
) -> Result<Created, SnapshotError> {
    let started = Instant::now();
    let id = SnapshotId::parse(snapshot_id)?;
    let io = |source| VolumeError::Io {
        path: volume_path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .open(volume_path)
        .map_err(io)?;
    let source = Backing::new(file).map_err(io)?;
    source.lock(false).map_err(io)?;
    let header = crate::volume::read_header(volume_path, source.file())?;
    let plan = Plan::new(&header, db_id, &id, volume_path)?;
    let target = plan.target(out_dir)?;
    let token = plan.rewrap(kms)?;
    let copier = Copier::new();
    let (offset, size) = (header.data_offset(), header.data_size());
    let mut pos = 0;
    while pos < size {
        // In windows, for the progress bar.
        let n = (size - pos).min(64 << 20);
        copier
            .copy(&source, target.file(), offset + pos, n)
            .map_err(|e| SnapshotError::io(target.path(), e))?;
        pos += n;
        progress(pos);
    }
    let mut created = plan.commit(target, &header, token, &copier)?;
    created.seconds = started.elapsed().as_secs_f64();
    Ok(created)
}

/// Snapshots a volume while it is served: fixes the point in time by
/// installing the copy-on-write tracker (writes are held off only while the
/// writes in flight finish), copies in the background while writes go on,
/// then writes the header and renames. `db_id` is the DB instance the
/// server attached the volume for. Set `cancel` to abandon it.
pub fn create_online(
    volume: &Volume,
    kms: &dyn Kms,
    db_id: &str,
    snapshot_id: &str,
    out_dir: &Path,
    cancel: &AtomicBool,
) -> Result<Created, SnapshotError> {
    let started = Instant::now();
    let id = SnapshotId::parse(snapshot_id)?;
    let header = volume.header();
    let plan = Plan::new(header, db_id, &id, volume.path())?;
    let target = plan.target(out_dir)?;
    let token = plan.rewrap(kms)?;
    let io = |source| SnapshotError::Io {
        path: volume.path().to_owned(),
        source,
    };
    let source = Backing::new(volume.backing().file().try_clone().map_err(io)?).map_err(io)?;
    let dest = target
        .file()
        .try_clone()
        .map_err(|e| SnapshotError::io(target.path(), e))?;
    let cow = Arc::new(CopyOnWrite::new(
        source,
        dest,
        header.data_offset(),
        header.data_size(),
    ));
    let pause = volume.install_hook(cow.clone())?;
    tracing::info!(volume = volume.id(), snapshot = %id, pause_us = pause.as_micros() as u64, "snapshot point fixed");
    let copied = cow.run(cancel, &|_| {});
    volume.remove_hook();
    copied.map_err(|stopped| match stopped {
        Stopped::Io(e) => SnapshotError::io(target.path(), e),
        Stopped::Cancelled => SnapshotError::Cancelled,
    })?;
    let mut created = plan.commit(target, header, token, cow.copier())?;
    created.pause_micros = Some(duration_micros(pause));
    created.chunks_copied_by_writes = Some(cow.chunks_copied_by_writers());
    created.seconds = started.elapsed().as_secs_f64();
    Ok(created)
}

fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What both kinds of snapshot decide before copying anything.
struct Plan<'a> {
    header: &'a Header,
    token: KmsToken,
    db_id: &'a str,
    id: &'a SnapshotId,
    volume_context: EncryptionContext,
    /// The volume's file, for messages.
    path: &'a Path,
}

impl<'a> Plan<'a> {
    fn new(
        header: &'a Header,
        db_id: &'a str,
        id: &'a SnapshotId,
        path: &'a Path,
    ) -> Result<Self, SnapshotError> {
        crate::volume::check_id("--db-id", db_id, "db-")?;
        let token = header.kms_token().map_err(|source| SnapshotError::Header {
            path: path.to_owned(),
            source,
        })?;
        let volume_context = EncryptionContext::for_volume(db_id, header.label());
        Ok(Self {
            header,
            token,
            db_id,
            id,
            volume_context,
            path,
        })
    }

    fn target(&self, out_dir: &Path) -> Result<Target, SnapshotError> {
        Target::create(
            &snapshot_path(out_dir, self.id),
            self.header.data_offset() + self.header.data_size(),
            SnapshotError::Exists,
        )
    }

    /// The volume key, re-wrapped for the snapshot under the same CMK.
    fn rewrap(&self, kms: &dyn Kms) -> Result<KmsToken, SnapshotError> {
        let context = EncryptionContext::for_volume(self.db_id, self.id.as_str());
        let token = rewrap(
            kms,
            &self.token,
            &self.volume_context,
            &self.token.key_id,
            &context,
        )?;
        // As when unlocking, once the KMS has accepted the context: the copy
        // stored in the token must say the same, or it was edited.
        let stored = stored_context(&self.token);
        if stored != self.volume_context {
            return Err(VolumeError::TokenEdited {
                path: self.path.to_owned(),
                stored,
                actual: self.volume_context.clone(),
            }
            .into());
        }
        Ok(token)
    }

    /// Writes the snapshot's header into the target and renames it.
    fn commit(
        &self,
        target: Target,
        source: &Header,
        token: KmsToken,
        copier: &Copier,
    ) -> Result<Created, SnapshotError> {
        let created = Timestamp::now();
        let header_err = |source| SnapshotError::Header {
            path: target.partial_path().to_owned(),
            source,
        };
        let params = FormatParams {
            uuid: uuid::Uuid::new_v4(),
            label: self.id.to_string(),
            sector_size: source.sector_size(),
            data_offset: source.data_offset(),
            data_size: source.data_size(),
        };
        let mut header = source
            .format_sharing_key(&params, &token)
            .map_err(header_err)?;
        let mut origin = Map::new();
        origin.insert("source_volume".into(), source.label().into());
        origin.insert("source_uuid".into(), source.uuid().to_string().into());
        origin.insert("created".into(), Value::String(created.to_string()));
        header
            .set_aux_token(SNAPSHOT_TOKEN_TYPE, origin)
            .map_err(header_err)?;
        let path = target.commit(Some(&mut header), 0o400, SnapshotError::Exists)?;
        Ok(Created {
            path,
            snapshot_id: self.id.clone(),
            source_volume: source.label().to_owned(),
            db_id: self.db_id.to_owned(),
            created,
            size: source.data_size(),
            kms_key_id: token.key_id,
            bytes_reflinked: copier.reflinked(),
            bytes_copied: copier.copied(),
            pause_micros: None,
            chunks_copied_by_writes: None,
            seconds: 0.0,
        })
    }
}
