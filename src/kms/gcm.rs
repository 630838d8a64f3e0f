//! AES-256-GCM with a fresh random nonce, the one sealing primitive of the
//! KMS: data-key blobs under key material, key material under the root key.
//! Random 96-bit nonces keep the collision chance negligible for far more
//! messages per key than a KMS key ever seals (NIST SP 800-38D, 8.3: 2^32).

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};

use crate::secret::SecretBytes;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// `nonce || ciphertext || tag` of `plaintext` under `key`, bound to `aad`.
pub fn seal(key: &SecretBytes, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new_from_slice(key.expose()).expect("KMS keys are 32 bytes");
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the OS random number generator failed");
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), aad, (&mut out[NONCE_LEN..]).into())
        .expect("GCM seals messages far shorter than its 64 GiB limit");
    out.extend_from_slice(&tag);
    out
}

/// The plaintext of a [`seal`]ed message, decrypted straight into protected
/// memory; `None` if the message, the key or the aad is not the one sealed.
pub fn open(key: &SecretBytes, aad: &[u8], sealed: &[u8]) -> Option<SecretBytes> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let cipher = Aes256Gcm::new_from_slice(key.expose()).expect("KMS keys are 32 bytes");
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce = Nonce::try_from(nonce).ok()?;
    let tag = Tag::try_from(tag).ok()?;
    let mut plain = SecretBytes::copy_from(ciphertext);
    cipher
        .decrypt_inout_detached(&nonce, aad, plain.expose_mut().into(), &tag)
        .ok()?;
    Some(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_every_byte_is_authenticated() {
        let key = SecretBytes::random(KEY_LEN);
        let sealed = seal(&key, b"aad", b"attack at dawn");
        assert_eq!(
            open(&key, b"aad", &sealed).unwrap().expose(),
            b"attack at dawn"
        );
        assert!(open(&key, b"aaD", &sealed).is_none());
        assert!(open(&SecretBytes::random(KEY_LEN), b"aad", &sealed).is_none());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open(&key, b"aad", &bad).is_none(), "byte {i}");
        }
        assert!(open(&key, b"aad", &sealed[..sealed.len() - 1]).is_none());
        assert!(open(&key, b"aad", &sealed[..NONCE_LEN]).is_none());
    }

    #[test]
    fn nonces_differ() {
        let key = SecretBytes::random(KEY_LEN);
        assert_ne!(seal(&key, b"", b"same"), seal(&key, b"", b"same"));
    }
}
