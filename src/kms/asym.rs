//! Asymmetric key material: RSA (OAEP encryption, PSS and PKCS#1 v1.5
//! signatures) and ECDSA on NIST P-256 and P-384, as AWS KMS offers them.
//! Private keys are kept as PKCS#8 DER in [`SecretBytes`]; public keys leave
//! as DER SubjectPublicKeyInfo and ECDSA signatures as DER, AWS's encodings.

use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rsa::sha2::{Digest, Sha256, Sha384, Sha512};

use super::KmsError;
use super::key::{EncryptionAlgorithm, KeySpec, MessageType, SigningAlgorithm};
use crate::secret::SecretBytes;

/// The largest message Sign and Verify take in AWS KMS.
pub const MAX_MESSAGE: usize = 4096;

fn corrupt(what: &str) -> KmsError {
    KmsError::Validation(format!(
        "the stored {what} key material does not decode; the key store may be damaged"
    ))
}

fn rsa_private(material: &SecretBytes) -> Result<rsa::PrivateKey, KmsError> {
    rsa::PrivateKey::from_pkcs8_der(material.expose()).map_err(|_| corrupt("RSA"))
}

/// Fresh private key material for an asymmetric spec.
pub fn generate(spec: KeySpec) -> SecretBytes {
    let rsa = |bits| {
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
            .expect("RSA key generation with the OS RNG");
        let der = key.to_pkcs8_der().expect("an RSA key encodes as PKCS#8");
        SecretBytes::copy_from(der.as_bytes())
    };
    match spec {
        KeySpec::Rsa2048 => rsa(2048),
        KeySpec::Rsa3072 => rsa(3072),
        KeySpec::Rsa4096 => rsa(4096),
        KeySpec::EccNistP256 => ec::nist_p256::generate(),
        KeySpec::EccNistP384 => ec::nist_p384::generate(),
        KeySpec::SymmetricDefault => unreachable!("symmetric material is 32 random bytes"),
    }
}

/// The DER SubjectPublicKeyInfo of a private key.
pub fn public_key_der(spec: KeySpec, material: &SecretBytes) -> Result<Vec<u8>, KmsError> {
    match spec {
        KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => {
            let key = rsa_private(material)?;
            let der = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|_| corrupt("RSA"))?;
            Ok(der.as_bytes().to_vec())
        }
        KeySpec::EccNistP256 => ec::nist_p256::public(material),
        KeySpec::EccNistP384 => ec::nist_p384::public(material),
        KeySpec::SymmetricDefault => unreachable!("callers check the key is asymmetric"),
    }
}

/// The digest a signing algorithm hashes with.
fn digest_len(alg: SigningAlgorithm) -> usize {
    use SigningAlgorithm::*;
    match alg {
        RsassaPssSha256 | RsassaPkcs1V15Sha256 | EcdsaSha256 => 32,
        RsassaPssSha384 | RsassaPkcs1V15Sha384 | EcdsaSha384 => 48,
        RsassaPssSha512 | RsassaPkcs1V15Sha512 => 64,
    }
}

/// Checks a Sign/Verify message against AWS's limits.
pub fn check_message(
    alg: SigningAlgorithm,
    message_type: MessageType,
    message: &[u8],
) -> Result<(), KmsError> {
    if message.is_empty() || message.len() > MAX_MESSAGE {
        return Err(KmsError::Validation(format!(
            "the message is {} bytes; it must be 1 to {MAX_MESSAGE} bytes (sign a digest with --message-type DIGEST for longer data)",
            message.len()
        )));
    }
    if message_type == MessageType::Digest && message.len() != digest_len(alg) {
        return Err(KmsError::Validation(format!(
            "a DIGEST message for {alg} must be {} bytes, not {}",
            digest_len(alg),
            message.len()
        )));
    }
    Ok(())
}

/// The hash of the message the algorithm signs: the message itself if it
/// is already a digest.
fn prehash(alg: SigningAlgorithm, message_type: MessageType, message: &[u8]) -> Vec<u8> {
    if message_type == MessageType::Digest {
        return message.to_vec();
    }
    match digest_len(alg) {
        32 => Sha256::digest(message).to_vec(),
        48 => Sha384::digest(message).to_vec(),
        _ => Sha512::digest(message).to_vec(),
    }
}

/// Signs; the caller has checked that `alg` belongs to the key's spec.
pub fn sign(
    material: &SecretBytes,
    alg: SigningAlgorithm,
    message_type: MessageType,
    message: &[u8],
) -> Result<Vec<u8>, KmsError> {
    use SigningAlgorithm::*;
    let hash = prehash(alg, message_type, message);
    let fail = |_| KmsError::Validation("the key could not sign this message".into());
    match alg {
        EcdsaSha256 => ec::nist_p256::sign(material, &hash),
        EcdsaSha384 => ec::nist_p384::sign(material, &hash),
        _ => {
            let key = rsa_private(material)?;
            match alg {
                RsassaPssSha256 => key.pss_sign_prehash::<Sha256>(&hash),
                RsassaPssSha384 => key.pss_sign_prehash::<Sha384>(&hash),
                RsassaPssSha512 => key.pss_sign_prehash::<Sha512>(&hash),
                RsassaPkcs1V15Sha256 => key.pkcs1v15_sign_prehash::<Sha256>(&hash),
                RsassaPkcs1V15Sha384 => key.pkcs1v15_sign_prehash::<Sha384>(&hash),
                _ => key.pkcs1v15_sign_prehash::<Sha512>(&hash),
            }
            .map_err(fail)
        }
    }
}

/// Verifies; a mismatch is KMSInvalidSignatureException, as in AWS.
pub fn verify(
    material: &SecretBytes,
    alg: SigningAlgorithm,
    message_type: MessageType,
    message: &[u8],
    signature: &[u8],
) -> Result<(), KmsError> {
    use SigningAlgorithm::*;
    let hash = prehash(alg, message_type, message);
    let valid = match alg {
        EcdsaSha256 => ec::nist_p256::verify(material, &hash, signature)?,
        EcdsaSha384 => ec::nist_p384::verify(material, &hash, signature)?,
        _ => {
            let key = rsa_private(material)?.to_public_key();
            match alg {
                RsassaPssSha256 => key.pss_verify_prehash::<Sha256>(&hash, signature),
                RsassaPssSha384 => key.pss_verify_prehash::<Sha384>(&hash, signature),
                RsassaPssSha512 => key.pss_verify_prehash::<Sha512>(&hash, signature),
                RsassaPkcs1V15Sha256 => key.pkcs1v15_verify_prehash::<Sha256>(&hash, signature),
                RsassaPkcs1V15Sha384 => key.pkcs1v15_verify_prehash::<Sha384>(&hash, signature),
                _ => key.pkcs1v15_verify_prehash::<Sha512>(&hash, signature),
            }
            .is_ok()
        }
    };
    if valid {
        Ok(())
    } else {
        Err(KmsError::InvalidSignature)
    }
}

/// The longest plaintext RSAES-OAEP-SHA-256 takes with this key: the
/// modulus size less two hashes and two bytes (RFC 8017, 7.1.1).
fn oaep_capacity(key: &rsa::PrivateKey) -> usize {
    use rsa::traits::PublicKeyParts;
    key.size().saturating_sub(2 * 32 + 2)
}

/// RSAES-OAEP encryption with the key's public half.
pub fn rsa_encrypt(
    material: &SecretBytes,
    alg: EncryptionAlgorithm,
    plaintext: &[u8],
) -> Result<Vec<u8>, KmsError> {
    debug_assert_eq!(alg, EncryptionAlgorithm::RsaesOaepSha256);
    let key = rsa_private(material)?;
    if plaintext.len() > oaep_capacity(&key) {
        return Err(KmsError::Validation(format!(
            "the plaintext is {} bytes; {alg} with this key takes at most {} (encrypt a data key instead)",
            plaintext.len(),
            oaep_capacity(&key)
        )));
    }
    key.to_public_key()
        .oaep_encrypt::<Sha256>(plaintext)
        .map_err(|_| KmsError::Validation("RSA encryption failed".into()))
}

/// RSAES-OAEP decryption; any failure is InvalidCiphertextException.
pub fn rsa_decrypt(material: &SecretBytes, ciphertext: &[u8]) -> Result<SecretBytes, KmsError> {
    let key = rsa_private(material)?;
    let mut plain = key
        .oaep_decrypt::<Sha256>(ciphertext)
        .map_err(|_| KmsError::InvalidCiphertext)?;
    let secret = SecretBytes::copy_from(&plain);
    zeroize::Zeroize::zeroize(&mut plain);
    Ok(secret)
}

/// ECDSA, written once per curve: the curves are distinct types whose
/// generic bounds would outweigh the code.
mod ec {
    macro_rules! curve {
        ($name:ident, $krate:ident) => {
            pub mod $name {
                use crate::kms::KmsError;
                use crate::secret::SecretBytes;
                use $krate::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
                use $krate::ecdsa::{Signature, SigningKey};
                use $krate::elliptic_curve::Generate;
                use $krate::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};

                pub fn generate() -> SecretBytes {
                    let key = SigningKey::try_generate_from_rng(&mut getrandom::SysRng)
                        .expect("the OS random number generator failed");
                    let der = key.to_pkcs8_der().expect("an EC key encodes as PKCS#8");
                    SecretBytes::copy_from(der.as_bytes())
                }

                fn load(material: &SecretBytes) -> Result<SigningKey, KmsError> {
                    SigningKey::from_pkcs8_der(material.expose())
                        .map_err(|_| super::super::corrupt("EC"))
                }

                pub fn public(material: &SecretBytes) -> Result<Vec<u8>, KmsError> {
                    let der = load(material)?
                        .verifying_key()
                        .to_public_key_der()
                        .map_err(|_| super::super::corrupt("EC"))?;
                    Ok(der.as_bytes().to_vec())
                }

                pub fn sign(material: &SecretBytes, hash: &[u8]) -> Result<Vec<u8>, KmsError> {
                    let sig: Signature = load(material)?.sign_prehash(hash).map_err(|_| {
                        KmsError::Validation("the key could not sign this digest".into())
                    })?;
                    Ok(sig.to_der().as_bytes().to_vec())
                }

                pub fn verify(
                    material: &SecretBytes,
                    hash: &[u8],
                    signature: &[u8],
                ) -> Result<bool, KmsError> {
                    let Ok(sig) = Signature::from_der(signature) else {
                        return Ok(false);
                    };
                    Ok(load(material)?
                        .verifying_key()
                        .verify_prehash(hash, &sig)
                        .is_ok())
                }
            }
        };
    }

    curve!(nist_p256, p256);
    curve!(nist_p384, p384);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signs_and_verifies_raw_and_digest_messages() {
        for (spec, alg) in [
            (KeySpec::EccNistP256, SigningAlgorithm::EcdsaSha256),
            (KeySpec::EccNistP384, SigningAlgorithm::EcdsaSha384),
        ] {
            let key = generate(spec);
            let sig = sign(&key, alg, MessageType::Raw, b"message").unwrap();
            verify(&key, alg, MessageType::Raw, b"message", &sig).unwrap();
            let err = verify(&key, alg, MessageType::Raw, b"massage", &sig).unwrap_err();
            assert!(matches!(err, KmsError::InvalidSignature));
            let digest = prehash(alg, MessageType::Raw, b"message");
            verify(&key, alg, MessageType::Digest, &digest, &sig).unwrap();
            assert!(!public_key_der(spec, &key).unwrap().is_empty());
        }
    }

    #[test]
    fn rsa_signs_encrypts_and_refuses_other_keys() {
        let key = generate(KeySpec::Rsa2048);
        for alg in KeySpec::Rsa2048.signing_algorithms(crate::kms::KeyUsage::SignVerify) {
            let sig = sign(&key, alg, MessageType::Raw, b"m").unwrap();
            verify(&key, alg, MessageType::Raw, b"m", &sig).unwrap();
        }
        let ct = rsa_encrypt(&key, EncryptionAlgorithm::RsaesOaepSha256, b"secret").unwrap();
        assert_eq!(rsa_decrypt(&key, &ct).unwrap().expose(), b"secret");
        let other = generate(KeySpec::Rsa2048);
        assert!(matches!(
            rsa_decrypt(&other, &ct),
            Err(KmsError::InvalidCiphertext)
        ));
        let long = vec![0u8; 2048 / 8 - 65];
        let err = rsa_encrypt(&key, EncryptionAlgorithm::RsaesOaepSha256, &long).unwrap_err();
        assert_eq!(err.aws_code(), "ValidationException");
    }

    #[test]
    fn message_limits() {
        let alg = SigningAlgorithm::EcdsaSha256;
        assert!(check_message(alg, MessageType::Raw, b"").is_err());
        assert!(check_message(alg, MessageType::Raw, &[0; 4097]).is_err());
        assert!(check_message(alg, MessageType::Digest, &[0; 31]).is_err());
        check_message(alg, MessageType::Digest, &[0; 32]).unwrap();
    }
}
