use std::path::PathBuf;

use crate::crypto::CipherError;
use crate::kms::{EncryptionContext, KmsError};
use crate::volume::luks2::HeaderError;

/// Why a volume could not be created, opened or converted. Each message says
/// in one line what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    #[error("{}: {source}", path.display())]
    Header { path: PathBuf, source: HeaderError },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: exists and holds data; pass --force to overwrite it (its contents will be lost)", .0.display())]
    HoldsData(PathBuf),

    #[error("{}: cannot reserve {len} bytes: {source}; create the volume without --preallocate to have it sparse", path.display())]
    Reserve {
        path: PathBuf,
        len: u64,
        source: std::io::Error,
    },

    #[error("{}: --size is required when creating a volume in a file", .0.display())]
    SizeRequired(PathBuf),

    #[error("size {size} is not a positive multiple of the sector size {sector_size}")]
    BadSize { size: u64, sector_size: u32 },

    #[error("{}: the device holds {available} bytes after the header, less than the --size {size} asked for", path.display())]
    DeviceTooSmall {
        path: PathBuf,
        size: u64,
        available: u64,
    },

    #[error("sector size {0} is not supported: use 512 or 4096")]
    BadSectorSize(u32),

    #[error("{what} {value:?} is not valid: expected {expected}")]
    BadId {
        what: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("{}", unlock_message(.key_id, .context, .source))]
    Unlock {
        key_id: String,
        context: EncryptionContext,
        source: KmsError,
    },

    #[error("could not get a data key from CMK {key_id}: {}", data_key_message(.source))]
    DataKey { key_id: String, source: KmsError },

    #[error("could not re-wrap the volume key under CMK {key_id}: {}", data_key_message(.source))]
    Rewrap { key_id: String, source: KmsError },

    #[error(
        "{}: the key the KMS unwrapped does not match the volume's key digest: the token was copied from another volume or edited; restore the header from a backup",
        .0.display()
    )]
    KeyMismatch(PathBuf),

    #[error(
        "{}: the token's encryption context {stored} is not the volume's {actual}: the token was edited; restore the header from a backup",
        path.display()
    )]
    TokenEdited {
        path: PathBuf,
        stored: EncryptionContext,
        actual: EncryptionContext,
    },

    #[error("{}: {source}", path.display())]
    Cipher { path: PathBuf, source: CipherError },

    #[error("{}: the image is {image} bytes, larger than the volume ({volume} bytes)", path.display())]
    ImageTooLarge {
        path: PathBuf,
        image: u64,
        volume: u64,
    },

    #[error("{}: exists; refusing to overwrite it (remove it first)", .0.display())]
    OutputExists(PathBuf),
}

/// What to do depends on why the KMS said no; AWS's error names stay in the
/// message so that they can be searched for.
fn unlock_message(key_id: &str, context: &EncryptionContext, source: &KmsError) -> String {
    match source.aws_code() {
        "InvalidCiphertextException" => format!(
            "the KMS refused to unwrap the volume key (InvalidCiphertextException): the encryption context {context} is not the one it was wrapped with; check --db-id (the volume belongs to another DB instance?) or whether the header was altered"
        ),
        "DisabledException" => format!(
            "the volume's CMK {key_id} is disabled (DisabledException): enable it with `nbdcrypt kms enable-key {key_id}` to unlock the volume"
        ),
        "KMSInvalidStateException" => format!(
            "the volume's CMK {key_id} is pending deletion (KMSInvalidStateException): `nbdcrypt kms cancel-key-deletion {key_id}`, then `nbdcrypt kms enable-key {key_id}`"
        ),
        "NotFoundException" => format!(
            "the volume's CMK {key_id} does not exist in this KMS (NotFoundException): use the --kms-dir of the KMS that created the volume"
        ),
        "IncorrectKeyException" => format!(
            "the wrapped key in the header was not made by the CMK {key_id} its token names (IncorrectKeyException): the token was edited"
        ),
        _ => format!("could not unwrap the volume key with CMK {key_id}: {source}"),
    }
}

fn data_key_message(source: &KmsError) -> String {
    match source.aws_code() {
        "InvalidKeyUsageException" => format!(
            "{source}; volumes need a symmetric ENCRYPT_DECRYPT key (SYMMETRIC_DEFAULT): `nbdcrypt kms describe-key KEY` shows its KeySpec and KeyUsage"
        ),
        _ => source.to_string(),
    }
}
