//! The KMS's errors. The API errors carry AWS KMS's exception names and
//! meanings, so that a caller written against this KMS behaves the same in
//! front of AWS; the store errors are this implementation's own.

use std::io;
use std::path::PathBuf;

use super::time::Timestamp;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// No key (or alias) by that name in this KMS.
    #[error(
        "NotFoundException: key '{key}' does not exist in this KMS; list the keys with `nbdcrypt kms list-keys` and the aliases with `nbdcrypt kms list-aliases`"
    )]
    NotFound { key: String },

    /// The key is disabled: AWS refuses every cryptographic operation.
    #[error(
        "DisabledException: key {key_id} is disabled; enable it with `nbdcrypt kms enable-key {key_id}`"
    )]
    Disabled { key_id: String },

    /// The key is scheduled for deletion.
    #[error(
        "KMSInvalidStateException: key {key_id} is pending deletion (on {deletion_date}); to keep it run `nbdcrypt kms cancel-key-deletion {key_id}` then `nbdcrypt kms enable-key {key_id}`"
    )]
    PendingDeletion {
        key_id: String,
        deletion_date: Timestamp,
    },

    /// The operation does not apply to the key's current state.
    #[error("KMSInvalidStateException: key {key_id} is {state}: {reason}")]
    InvalidState {
        key_id: String,
        state: String,
        reason: String,
    },

    /// A ciphertext that does not decrypt. Whether the blob, its key or the
    /// encryption context is wrong is deliberately not said: telling them
    /// apart would let a caller probe for the right context.
    #[error(
        "InvalidCiphertextException: the ciphertext does not decrypt with the encryption context given; use the exact blob and context it was made with"
    )]
    InvalidCiphertext,

    /// The key's spec or usage does not allow the operation.
    #[error("InvalidKeyUsageException: {0}")]
    InvalidKeyUsage(String),

    /// Decrypt or ReEncrypt named a key that is not the blob's.
    #[error(
        "IncorrectKeyException: the ciphertext was made under key {blob_key_id}, not under '{given}'; name that key or leave the key out"
    )]
    IncorrectKey { given: String, blob_key_id: String },

    /// A parameter is out of range or malformed.
    #[error("ValidationException: {0}")]
    Validation(String),

    /// The alias is taken.
    #[error(
        "AlreadyExistsException: alias {alias} already exists; delete it first with `nbdcrypt kms delete-alias {alias}` or pick another name"
    )]
    AlreadyExists { alias: String },

    /// The operation exists but not for this kind of key.
    #[error("UnsupportedOperationException: {0}")]
    UnsupportedOperation(String),

    /// Verify found the signature does not match the message and key.
    #[error(
        "KMSInvalidSignatureException: the signature does not match the message, the key and the signing algorithm"
    )]
    InvalidSignature,

    /// Reading or writing a file of the KMS directory failed.
    #[error("KMSInternalException: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    /// A file of the store is open to other users, who could read or swap it.
    #[error(
        "AccessDeniedException: {} is accessible to other users (mode {mode:04o}); run `chmod {fix} {}`", path.display(), path.display()
    )]
    InsecurePermissions {
        path: PathBuf,
        mode: u32,
        fix: &'static str,
    },

    /// The store exists but its root key is not where it was looked for.
    #[error(
        "KMSInternalException: the key store in {} exists but its root key {} is missing; restore the root key, or point NBDCRYPT_KMS_ROOT_KEY at where it is kept", dir.display(), root_key.display()
    )]
    RootKeyMissing { dir: PathBuf, root_key: PathBuf },

    /// The root key found is not the one the store was made with.
    #[error(
        "KMSInternalException: the root key {} does not belong to the key store in {}; point NBDCRYPT_KMS_ROOT_KEY at the store's own root key", root_key.display(), dir.display()
    )]
    WrongRootKey { dir: PathBuf, root_key: PathBuf },

    /// A file of the store does not parse or fails its integrity check.
    #[error(
        "KMSInternalException: {} is damaged or was edited outside nbdcrypt ({reason}); restore it from a backup", path.display()
    )]
    Corrupt { path: PathBuf, reason: String },

    /// `kms audit verify` found a record that breaks the hash chain.
    #[error(
        "AuditLogTampered: audit record {line} of {} {reason}: the log was edited, reordered or cut after that point", path.display()
    )]
    AuditTampered {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

impl KmsError {
    /// The AWS exception name (the `errorCode` CloudTrail records).
    pub fn aws_code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "NotFoundException",
            Self::Disabled { .. } => "DisabledException",
            Self::PendingDeletion { .. } | Self::InvalidState { .. } => "KMSInvalidStateException",
            Self::InvalidCiphertext => "InvalidCiphertextException",
            Self::InvalidKeyUsage(_) => "InvalidKeyUsageException",
            Self::IncorrectKey { .. } => "IncorrectKeyException",
            Self::Validation(_) => "ValidationException",
            Self::AlreadyExists { .. } => "AlreadyExistsException",
            Self::UnsupportedOperation(_) => "UnsupportedOperationException",
            Self::InvalidSignature => "KMSInvalidSignatureException",
            Self::InsecurePermissions { .. } => "AccessDeniedException",
            Self::Io { .. }
            | Self::RootKeyMissing { .. }
            | Self::WrongRootKey { .. }
            | Self::Corrupt { .. } => "KMSInternalException",
            Self::AuditTampered { .. } => "AuditLogTampered",
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// The message without the leading exception name, as CloudTrail's
    /// `errorMessage` holds it beside `errorCode`.
    pub fn message(&self) -> String {
        let full = self.to_string();
        let prefix = format!("{}: ", self.aws_code());
        match full.strip_prefix(&prefix) {
            Some(rest) => rest.to_owned(),
            None => full,
        }
    }
}
