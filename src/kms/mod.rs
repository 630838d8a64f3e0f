//! The local key management service, with AWS KMS's semantics: customer
//! master keys (symmetric, RSA, ECC), their states and rotation, envelope
//! encryption of data keys bound to an encryption context, the durable key
//! store and the tamper-evident audit log.
//!
//! - [`Kms`]: what the volumes need from any KMS (the local one here, AWS's
//!   later), in AWS's operation names.
//! - [`LocalKms`] (`local`): the operations, one audited call each.
//! - `context`, `blob`, `gcm`: the encryption context, its injective AAD,
//!   and the ciphertext blob.
//! - `store`, `fsio`: the key store on disk, sealed under the root key,
//!   replaced atomically under a directory lock.
//! - `audit`: the CloudTrail-shaped, hash-chained audit log.
//! - `key`, `id`, `asym`, `time`: AWS's names for specs, usages and states;
//!   key ids, ARNs and aliases; asymmetric algorithms; timestamps.

mod asym;
pub mod audit;
mod blob;
mod context;
mod error;
mod fsio;
mod gcm;
mod id;
mod key;
mod local;
#[doc(hidden)]
pub mod parse;
mod store;
mod time;

pub use audit::{Filter as AuditFilter, Verified as AuditVerified};
pub use context::{DB_ID_KEY, EncryptionContext, VOLUME_ID_KEY};
pub use error::KmsError;
pub use fsio::write_new_private;
pub use id::validate_alias_name;
pub use key::{
    EncryptionAlgorithm, KeyMetadata, KeySpec, KeyState, KeyUsage, MessageType, SigningAlgorithm,
};
pub use local::{
    AliasListEntry, CreateKeyRequest, DeletionScheduled, Encrypted, KeyDescription, KeyListEntry,
    KeyRotation, LocalKms, PublicKey, ROOT_KEY_ENV, RotationStatus,
};
pub use time::Timestamp;

use crate::secret::SecretBytes;

/// What a volume needs from a KMS. Object safe and thread safe, so a server
/// can hold one `Arc<dyn Kms>` for all its volumes.
pub trait Kms: Send + Sync {
    /// GenerateDataKey: `number_of_bytes` of fresh key, and its blob under
    /// the CMK, bound to `context`.
    fn generate_data_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        number_of_bytes: usize,
    ) -> Result<DataKey, KmsError>;

    /// Decrypt. `key_id`: if given, must name the blob's key (else
    /// IncorrectKeyException).
    fn decrypt(
        &self,
        ciphertext_blob: &[u8],
        context: &EncryptionContext,
        key_id: Option<&str>,
    ) -> Result<Decrypted, KmsError>;

    /// ReEncrypt: the plaintext never leaves the KMS.
    fn re_encrypt(
        &self,
        ciphertext_blob: &[u8],
        source_context: &EncryptionContext,
        destination_key_id: &str,
        destination_context: &EncryptionContext,
    ) -> Result<ReEncrypted, KmsError>;

    fn describe_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError>;
}

/// A data key: its plaintext, to use and wipe, and its blob, to keep.
#[derive(Debug)]
pub struct DataKey {
    /// ARN of the CMK.
    pub key_id: String,
    pub plaintext: SecretBytes,
    pub ciphertext_blob: Vec<u8>,
}

#[derive(Debug)]
pub struct Decrypted {
    /// ARN of the CMK that made the blob.
    pub key_id: String,
    pub plaintext: SecretBytes,
}

#[derive(Debug, Clone)]
pub struct ReEncrypted {
    /// ARN of the destination CMK.
    pub key_id: String,
    /// ARN of the CMK that made the source blob.
    pub source_key_id: String,
    pub ciphertext_blob: Vec<u8>,
}
