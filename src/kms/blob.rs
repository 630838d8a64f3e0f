//! The ciphertext blob a symmetric key returns (AWS `CiphertextBlob`):
//!
//! ```text
//! version (1) | key id (16, UUID) | key material version (4, BE) | nonce (12) | AES-256-GCM ciphertext | tag (16)
//! ```
//!
//! The AAD is the header (version, key id, material version) followed by the
//! injective encoding of the encryption context (DESIGN.md, "Envelope
//! encryption"), so a blob opens only under its own key, material and context.

use uuid::Uuid;

use super::context::EncryptionContext;
use super::{KmsError, gcm};
use crate::secret::SecretBytes;

pub const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 16 + 4;

/// Which key and which of its material versions made a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    pub key_id: Uuid,
    pub material_version: u32,
}

impl BlobHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = VERSION;
        out[1..17].copy_from_slice(self.key_id.as_bytes());
        out[17..].copy_from_slice(&self.material_version.to_be_bytes());
        out
    }

    /// Reads the header of a blob. Anything that is not a blob of ours is
    /// InvalidCiphertextException, as AWS answers for foreign bytes.
    pub fn parse(blob: &[u8]) -> Result<Self, KmsError> {
        if blob.len() < HEADER_LEN + gcm::NONCE_LEN + gcm::TAG_LEN || blob[0] != VERSION {
            return Err(KmsError::InvalidCiphertext);
        }
        let key_id = Uuid::from_slice(&blob[1..17]).map_err(|_| KmsError::InvalidCiphertext)?;
        let version = u32::from_be_bytes(blob[17..21].try_into().expect("four bytes"));
        Ok(Self {
            key_id,
            material_version: version,
        })
    }

    fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        let mut aad = self.encode().to_vec();
        aad.extend_from_slice(&context.aad());
        aad
    }

    /// Encrypts `plaintext` under `material` (the key's material of this
    /// header's version).
    pub fn seal(
        &self,
        material: &SecretBytes,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Vec<u8> {
        let mut blob = self.encode().to_vec();
        blob.extend_from_slice(&gcm::seal(material, &self.aad(context), plaintext));
        blob
    }

    /// Decrypts a blob whose header is `self`.
    pub fn open(
        &self,
        material: &SecretBytes,
        context: &EncryptionContext,
        blob: &[u8],
    ) -> Result<SecretBytes, KmsError> {
        gcm::open(material, &self.aad(context), &blob[HEADER_LEN..])
            .ok_or(KmsError::InvalidCiphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BlobHeader {
        BlobHeader {
            key_id: Uuid::new_v4(),
            material_version: 3,
        }
    }

    #[test]
    fn header_round_trips_and_blobs_differ() {
        let h = header();
        let key = SecretBytes::random(32);
        let ctx = EncryptionContext::for_volume("db-1", "vol-1");
        let a = h.seal(&key, &ctx, b"data key");
        let b = h.seal(&key, &ctx, b"data key");
        assert_ne!(a, b);
        assert_eq!(BlobHeader::parse(&a).unwrap(), h);
        assert_eq!(h.open(&key, &ctx, &a).unwrap().expose(), b"data key");
    }

    #[test]
    fn context_is_bound_injectively() {
        let h = header();
        let key = SecretBytes::random(32);
        let blob = h.seal(&key, &EncryptionContext::new().with("a", "bc"), b"k");
        let err = h
            .open(&key, &EncryptionContext::new().with("ab", "c"), &blob)
            .unwrap_err();
        assert!(matches!(err, KmsError::InvalidCiphertext));
    }

    #[test]
    fn a_rewritten_header_does_not_open() {
        let h = header();
        let key = SecretBytes::random(32);
        let ctx = EncryptionContext::new();
        let blob = h.seal(&key, &ctx, b"k");
        let moved = BlobHeader {
            material_version: 4,
            ..h
        };
        assert!(moved.open(&key, &ctx, &blob).is_err());
    }

    #[test]
    fn foreign_bytes_are_invalid_ciphertext() {
        for bad in [&b""[..], &[VERSION; 20][..], &[2u8; 60][..]] {
            assert!(matches!(
                BlobHeader::parse(bad),
                Err(KmsError::InvalidCiphertext)
            ));
        }
    }
}
