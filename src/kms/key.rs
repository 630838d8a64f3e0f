//! What the KMS says about a key: its spec, usage, state and metadata, in
//! AWS KMS's names and JSON shape (`DescribeKey`'s `KeyMetadata`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::KmsError;
use super::time::Timestamp;

macro_rules! aws_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = KmsError;

            fn from_str(s: &str) -> Result<Self, KmsError> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    let valid: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    KmsError::Validation(format!(
                        "'{s}' is not a valid {}; use one of {}", $what, valid.join(", ")
                    ))
                })
            }
        }
    };
}

aws_enum!(
    /// The kind of key material (AWS `KeySpec`).
    KeySpec, "key spec" {
        SymmetricDefault = "SYMMETRIC_DEFAULT",
        Rsa2048 = "RSA_2048",
        Rsa3072 = "RSA_3072",
        Rsa4096 = "RSA_4096",
        EccNistP256 = "ECC_NIST_P256",
        EccNistP384 = "ECC_NIST_P384",
    }
);

aws_enum!(
    /// What a key may be used for (AWS `KeyUsage`).
    KeyUsage, "key usage" {
        EncryptDecrypt = "ENCRYPT_DECRYPT",
        SignVerify = "SIGN_VERIFY",
    }
);

aws_enum!(
    /// The lifecycle state of a key (AWS `KeyState`).
    KeyState, "key state" {
        Enabled = "Enabled",
        Disabled = "Disabled",
        PendingDeletion = "PendingDeletion",
    }
);

aws_enum!(
    /// AWS `EncryptionAlgorithmSpec`.
    EncryptionAlgorithm, "encryption algorithm" {
        SymmetricDefault = "SYMMETRIC_DEFAULT",
        RsaesOaepSha256 = "RSAES_OAEP_SHA_256",
    }
);

aws_enum!(
    /// AWS `SigningAlgorithmSpec`.
    SigningAlgorithm, "signing algorithm" {
        RsassaPssSha256 = "RSASSA_PSS_SHA_256",
        RsassaPssSha384 = "RSASSA_PSS_SHA_384",
        RsassaPssSha512 = "RSASSA_PSS_SHA_512",
        RsassaPkcs1V15Sha256 = "RSASSA_PKCS1_V1_5_SHA_256",
        RsassaPkcs1V15Sha384 = "RSASSA_PKCS1_V1_5_SHA_384",
        RsassaPkcs1V15Sha512 = "RSASSA_PKCS1_V1_5_SHA_512",
        EcdsaSha256 = "ECDSA_SHA_256",
        EcdsaSha384 = "ECDSA_SHA_384",
    }
);

aws_enum!(
    /// Whether Sign and Verify get the message or its digest (AWS `MessageType`).
    MessageType, "message type" {
        Raw = "RAW",
        Digest = "DIGEST",
    }
);

impl KeySpec {
    pub fn is_symmetric(self) -> bool {
        self == KeySpec::SymmetricDefault
    }

    /// The usages AWS allows for this spec. ECC NIST keys sign only (their
    /// other AWS usage, KEY_AGREEMENT, is not offered here).
    pub fn allowed_usages(self) -> &'static [KeyUsage] {
        match self {
            KeySpec::SymmetricDefault => &[KeyUsage::EncryptDecrypt],
            KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => {
                &[KeyUsage::EncryptDecrypt, KeyUsage::SignVerify]
            }
            KeySpec::EccNistP256 | KeySpec::EccNistP384 => &[KeyUsage::SignVerify],
        }
    }

    pub fn encryption_algorithms(self, usage: KeyUsage) -> Vec<EncryptionAlgorithm> {
        match (self, usage) {
            (KeySpec::SymmetricDefault, _) => vec![EncryptionAlgorithm::SymmetricDefault],
            // RSAES_OAEP_SHA_1 is left out: SHA-1 is not among our crates.
            (_, KeyUsage::EncryptDecrypt) => vec![EncryptionAlgorithm::RsaesOaepSha256],
            (_, KeyUsage::SignVerify) => Vec::new(),
        }
    }

    pub fn signing_algorithms(self, usage: KeyUsage) -> Vec<SigningAlgorithm> {
        use SigningAlgorithm::*;
        if usage != KeyUsage::SignVerify {
            return Vec::new();
        }
        match self {
            KeySpec::SymmetricDefault => Vec::new(),
            KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => vec![
                RsassaPssSha256,
                RsassaPssSha384,
                RsassaPssSha512,
                RsassaPkcs1V15Sha256,
                RsassaPkcs1V15Sha384,
                RsassaPkcs1V15Sha512,
            ],
            KeySpec::EccNistP256 => vec![EcdsaSha256],
            KeySpec::EccNistP384 => vec![EcdsaSha384],
        }
    }
}

/// AWS `KeyMetadata`, field for field where this KMS has the concept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadata {
    #[serde(rename = "AWSAccountId")]
    pub aws_account_id: String,
    pub key_id: String,
    pub arn: String,
    pub creation_date: Timestamp,
    pub enabled: bool,
    pub description: String,
    pub key_usage: KeyUsage,
    pub key_state: KeyState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deletion_date: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pending_deletion_window_in_days: Option<u32>,
    pub origin: String,
    pub key_manager: String,
    pub key_spec: KeySpec,
    /// Deprecated by AWS in favour of `KeySpec`, still returned by it.
    pub customer_master_key_spec: KeySpec,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub encryption_algorithms: Vec<EncryptionAlgorithm>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub signing_algorithms: Vec<SigningAlgorithm>,
    pub multi_region: bool,
}

impl KeyMetadata {
    /// Fails with AWS's exception if the key's state forbids cryptographic
    /// use (AWS "Key states of AWS KMS keys": only Enabled keys work).
    pub fn check_usable(&self) -> Result<(), KmsError> {
        match self.key_state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(KmsError::Disabled {
                key_id: self.key_id.clone(),
            }),
            KeyState::PendingDeletion => Err(KmsError::PendingDeletion {
                key_id: self.key_id.clone(),
                deletion_date: self.deletion_date.unwrap_or(self.creation_date),
            }),
        }
    }

    /// Fails with InvalidKeyUsageException unless the key is symmetric, which
    /// data keys, Encrypt with a context and ReEncrypt's blobs need.
    pub fn check_symmetric(&self, operation: &str) -> Result<(), KmsError> {
        if self.key_spec.is_symmetric() {
            return Ok(());
        }
        Err(KmsError::InvalidKeyUsage(format!(
            "key {} is an asymmetric {} key ({}); {operation} needs a SYMMETRIC_DEFAULT key: create one with `nbdcrypt kms create-key` (describe-key shows a key's KeySpec)",
            self.key_id, self.key_spec, self.key_usage
        )))
    }

    /// Fails with InvalidKeyUsageException unless the key has `usage`.
    pub fn check_usage(&self, usage: KeyUsage, operation: &str) -> Result<(), KmsError> {
        if self.key_usage == usage {
            return Ok(());
        }
        Err(KmsError::InvalidKeyUsage(format!(
            "key {} has key usage {}; {operation} needs a key with usage {usage}",
            self.key_id, self.key_usage
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for spec in KeySpec::ALL {
            assert_eq!(spec.as_str().parse::<KeySpec>().unwrap(), *spec);
            let json = serde_json::to_string(spec).unwrap();
            assert_eq!(json, format!("\"{spec}\""));
        }
        let err = "RSA_1024".parse::<KeySpec>().unwrap_err();
        assert_eq!(err.aws_code(), "ValidationException");
        assert!(err.to_string().contains("RSA_2048"), "{err}");
    }

    #[test]
    fn ecc_keys_only_sign() {
        assert_eq!(
            KeySpec::EccNistP256.allowed_usages(),
            &[KeyUsage::SignVerify]
        );
        assert!(
            KeySpec::Rsa2048
                .allowed_usages()
                .contains(&KeyUsage::EncryptDecrypt)
        );
        assert_eq!(
            KeySpec::SymmetricDefault.allowed_usages(),
            &[KeyUsage::EncryptDecrypt]
        );
    }
}
