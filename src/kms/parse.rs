//! The KMS's readers of bytes that come from outside it (a ciphertext blob
//! handed to Decrypt, the key store file on disk), callable on bytes alone:
//! the entry points of the fuzz targets in `fuzz/` and of their regression
//! replay in the test suite. Not an API for callers.

use std::path::Path;

use uuid::Uuid;

use super::KmsError;
use super::blob::BlobHeader;
use super::context::EncryptionContext;
use super::store::{self, RootKeys, Store};
use crate::secret::SecretBytes;

/// Reads a blob's header and opens it under `material`, as Decrypt does
/// once it has found the key: the key id and material version it names,
/// and the plaintext.
pub fn blob(
    blob: &[u8],
    material: &SecretBytes,
    context: &EncryptionContext,
) -> Result<(Uuid, u32, SecretBytes), KmsError> {
    let header = BlobHeader::parse(blob)?;
    let plaintext = header.open(material, context, blob)?;
    Ok((header.key_id, header.material_version, plaintext))
}

/// Authenticates and decodes a key store file under `root_key`, then
/// unseals every material version of every key, as the KMS does on use.
/// Returns how many material versions unsealed.
pub fn key_store(bytes: &[u8], root_key: &SecretBytes) -> Result<usize, KmsError> {
    let root = RootKeys::derive(root_key);
    let path = Path::new("keystore");
    let store = Store::decode(bytes, path, &root, Path::new("."), Path::new("root.key"))?;
    let mut unsealed = 0;
    for key in &store.keys {
        for material in &key.materials {
            material.open(&root, key.id, path)?;
            unsealed += 1;
        }
    }
    Ok(unsealed)
}

/// A key store file holding `body`, with the header line and integrity tag
/// that `root_key` gives it: lets a fuzzer reach the JSON behind the tag.
pub fn frame_key_store(body: &[u8], root_key: &SecretBytes) -> Vec<u8> {
    store::frame(body, &RootKeys::derive(root_key))
}
