//! Snapshots: point-in-time copies of a volume that stay ciphertext end to
//! end, and restores of them as new volumes under a new identity.
//!
//! A snapshot is itself a LUKS2 container, laid out as a volume is: the
//! source's data segment copied as it is (never decrypted; only allocated
//! extents, reflinked where the file system can), a header whose key digest
//! is the source's, labelled with the snapshot id, and an `nbdcrypt-kms`
//! token holding the volume key re-wrapped by the KMS (ReEncrypt, so the key
//! never leaves it) from `{"aws:rds:db-id": DB, "aws:ebs:id": VOL}` to
//! `{"aws:rds:db-id": DB, "aws:ebs:id": SNAPSHOT-ID}`. A second token, of
//! type `nbdcrypt-snapshot`, records where and when it was taken.
//!
//! - `copy`: ciphertext from file to file, holes kept, FICLONERANGE first.
//! - `target`: the `.ID.partial` file that becomes the snapshot (or the
//!   restored volume) by an atomic rename, or disappears.
//! - `cow`: the copy-on-write tracker that keeps a live volume's old
//!   ciphertext until the background copy has it.
//! - `create`: taking a snapshot offline (the volume file, locked) or online
//!   (a volume a server is serving; see `control`).
//! - `restore`: a new volume from a snapshot, re-wrapped or re-encrypted.
//! - `list`: what a directory of snapshots holds.

mod copy;
mod cow;
mod create;
mod error;
mod list;
mod restore;
mod target;

use std::path::PathBuf;

use serde::Serialize;

pub use create::{Created, create_offline, create_online};
pub use error::SnapshotError;
pub use list::{SnapshotInfo, list};
pub use restore::{RestoreOptions, Restored, restore};

use crate::kms::{EncryptionContext, Kms};
use crate::volume::VolumeError;
use crate::volume::luks2::KmsToken;

/// The type of the token that marks a LUKS2 container as a snapshot.
pub const SNAPSHOT_TOKEN_TYPE: &str = "nbdcrypt-snapshot";

/// A snapshot id: `snap-` and letters or digits, as AWS's
/// (`snap-0a1b2c3d4e5f67890`); at most 47 bytes, the room of a LUKS2 label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SnapshotId(String);

/// Bytes of a LUKS2 label, which holds the id.
const MAX_ID_LEN: usize = 47;

impl SnapshotId {
    pub fn parse(text: &str) -> Result<Self, SnapshotError> {
        let rest = text.strip_prefix("snap-").unwrap_or("");
        if rest.is_empty()
            || text.len() > MAX_ID_LEN
            || !rest.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(SnapshotError::BadId(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A token for the same volume key under another context (and possibly
/// another CMK), by the KMS's ReEncrypt. A refusal about the source (wrong
/// context, edited blob, its CMK disabled) reads as an unlock failure would;
/// one about another destination CMK names that CMK.
fn rewrap(
    kms: &dyn Kms,
    token: &KmsToken,
    source: &EncryptionContext,
    destination_key: &str,
    destination: &EncryptionContext,
) -> Result<KmsToken, VolumeError> {
    let re = kms
        .re_encrypt(&token.ciphertext_blob, source, destination_key, destination)
        .map_err(|e| {
            let about_source = matches!(
                e.aws_code(),
                "InvalidCiphertextException" | "IncorrectKeyException"
            ) || destination_key == token.key_id;
            if about_source {
                VolumeError::Unlock {
                    key_id: token.key_id.clone(),
                    context: source.clone(),
                    source: e,
                }
            } else {
                VolumeError::Rewrap {
                    key_id: destination_key.to_owned(),
                    source: e,
                }
            }
        })?;
    Ok(KmsToken {
        key_id: re.key_id,
        encryption_context: destination
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ciphertext_blob: re.ciphertext_blob,
    })
}

/// The context a token says it was made with, as the KMS type.
fn stored_context(token: &KmsToken) -> EncryptionContext {
    token.encryption_context.clone().into_iter().collect()
}

/// Where a snapshot of `id` lives in `dir`.
fn snapshot_path(dir: &std::path::Path, id: &SnapshotId) -> PathBuf {
    dir.join(id.as_str())
}

#[cfg(test)]
mod tests;
