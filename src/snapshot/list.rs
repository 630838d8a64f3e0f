//! What a directory of snapshots holds, read from their headers alone (no
//! KMS call, no key).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{SNAPSHOT_TOKEN_TYPE, SnapshotError};
use crate::kms::{DB_ID_KEY, VOLUME_ID_KEY};
use crate::volume::luks2::Header;

/// One snapshot as `snapshot list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub snapshot_id: String,
    pub source_volume: String,
    pub db_id: String,
    /// When it was taken (RFC 3339, UTC).
    pub created: String,
    /// Bytes of the volume it holds.
    pub size: u64,
    /// Bytes its file takes on disk.
    pub allocated: u64,
    pub kms_key_id: String,
}

impl SnapshotInfo {
    /// Reads the snapshot at `path`; a LUKS2 volume without the snapshot
    /// token is [`SnapshotError::NotASnapshot`], and one whose key is not
    /// bound to its own id is [`SnapshotError::Mislabelled`].
    pub fn read(path: &Path) -> Result<(Self, Header), SnapshotError> {
        let file = File::open(path).map_err(|e| SnapshotError::io(path, e))?;
        let header = crate::volume::read_header(path, &file)?;
        let origin = header
            .aux_token(SNAPSHOT_TOKEN_TYPE)
            .ok_or_else(|| SnapshotError::NotASnapshot(path.to_owned()))?;
        let field = |name: &str| origin.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let token = header.kms_token().map_err(|source| SnapshotError::Header {
            path: path.to_owned(),
            source,
        })?;
        let context = &token.encryption_context;
        if context.get(VOLUME_ID_KEY).map(String::as_str) != Some(header.label()) {
            return Err(SnapshotError::Mislabelled {
                path: path.to_owned(),
                id: header.label().to_owned(),
                context: serde_json::to_string(context).unwrap_or_default(),
            });
        }
        let allocated = file
            .metadata()
            .map_err(|e| SnapshotError::io(path, e))?
            .blocks()
            * 512;
        let info = Self {
            path: path.to_owned(),
            snapshot_id: header.label().to_owned(),
            source_volume: field("source_volume").to_owned(),
            db_id: context.get(DB_ID_KEY).cloned().unwrap_or_default(),
            created: field("created").to_owned(),
            size: header.data_size(),
            allocated,
            kms_key_id: token.key_id,
        };
        Ok((info, header))
    }
}

/// The snapshots in `dir`, oldest first. Hidden files (snapshots being
/// taken) are not listed; files that are not snapshots are skipped.
pub fn list(dir: &Path) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SnapshotError::OutDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SnapshotError::io(dir, e))?;
        let hidden = entry.file_name().as_encoded_bytes().starts_with(b".");
        if hidden || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match SnapshotInfo::read(&entry.path()) {
            Ok((info, _)) => found.push(info),
            Err(e) => tracing::debug!(path = %entry.path().display(), error = %e, "not listed"),
        }
    }
    found.sort_by(|a, b| (&a.created, &a.snapshot_id).cmp(&(&b.created, &b.snapshot_id)));
    Ok(found)
}
