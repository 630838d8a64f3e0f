//! The `pbkdf2` digest of the volume key (LUKS2 specification, section 3.5
//! "Digests"): how a wrong key is detected, by us and by cryptsetup alike.
//!
//! cryptsetup computes it as PBKDF2-HMAC-`hash`(password = volume key,
//! salt = 32 bytes, output = the hash's size) and accepts any iteration count.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::secret::{SecretBytes, constant_time_eq};

/// Iterations of the digest.
///
/// The volume key is 512 random bits, so the count adds nothing against
/// guessing it; the digest only has to tell a wrong key from the right one,
/// and every open pays for it. cryptsetup benchmarks its digest to 125 ms; we
/// fix a count instead, so that the cost of an open does not depend on the
/// machine that created the volume:
/// 100 000 iterations take 10-30 ms in a release build with SHA extensions
/// (measured on a noisy 2-core x86-64 with `sha_ni`, where cryptsetup's own
/// benchmark gives 5.4 M iterations/s), tens of ms more without them, and
/// about 1 s in an unoptimised debug build.
pub(super) const ITERATIONS: u32 = 100_000;

/// The most iterations a header may ask for: a hundred times what we write,
/// about 2 s of a release build. The count is read before the key is
/// checked, so without a bound a tampered header (2^32 - 1 iterations)
/// would hold every open for ten minutes or more.
const MAX_ITERATIONS: u32 = 100 * ITERATIONS;

/// The digest's hash; cryptsetup's default, and the only one we verify.
const HASH: &str = "sha256";
const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Pbkdf2Digest {
    salt: [u8; SALT_LEN],
    iterations: u32,
    digest: [u8; DIGEST_LEN],
}

impl Pbkdf2Digest {
    /// A digest of `key` under a fresh random salt.
    pub fn new(key: &SecretBytes) -> Self {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).expect("the OS random number generator failed");
        let digest = derive(key, &salt, ITERATIONS);
        Self {
            salt,
            iterations: ITERATIONS,
            digest,
        }
    }

    /// Constant-time comparison of `key`'s digest with the stored one.
    pub fn matches(&self, key: &SecretBytes) -> bool {
        constant_time_eq(&derive(key, &self.salt, self.iterations), &self.digest)
    }

    /// The JSON object for `digests`, bound to `segment` and to no keyslot
    /// (cryptsetup adds a keyslot's id here when it adds the keyslot).
    pub fn to_json(&self, segment: &str) -> Value {
        json!({
            "type": "pbkdf2",
            "keyslots": [],
            "segments": [segment],
            "hash": HASH,
            "iterations": self.iterations,
            "salt": BASE64.encode(self.salt),
            "digest": BASE64.encode(self.digest),
        })
    }

    /// Reads a digest object; the reason says which field is wrong.
    pub fn from_json(obj: &Value) -> Result<Self, String> {
        let field = |name: &str| obj.get(name).ok_or_else(|| format!("no \"{name}\""));
        let kind = field("type")?.as_str().unwrap_or_default();
        if kind != "pbkdf2" {
            return Err(format!(
                "type {kind:?}; nbdcrypt verifies only pbkdf2 digests"
            ));
        }
        let hash = field("hash")?.as_str().unwrap_or_default();
        if hash != HASH {
            return Err(format!("hash {hash:?}; nbdcrypt verifies only {HASH}"));
        }
        let iterations = field("iterations")?
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or("\"iterations\" is not an integer from 1 to 2^32-1")?;
        if iterations > MAX_ITERATIONS {
            return Err(format!(
                "\"iterations\" is {iterations}, more than the {MAX_ITERATIONS} \
                 nbdcrypt accepts (it writes {ITERATIONS})"
            ));
        }
        let bytes = |name: &str, len: usize| -> Result<Vec<u8>, String> {
            let text = field(name)?
                .as_str()
                .ok_or(format!("\"{name}\" is not a string"))?;
            let raw = BASE64
                .decode(text)
                .map_err(|e| format!("\"{name}\" is not base64: {e}"))?;
            if raw.len() != len {
                return Err(format!(
                    "\"{name}\" has {} bytes, expected {len}",
                    raw.len()
                ));
            }
            Ok(raw)
        };
        let mut d = Self {
            salt: [0; SALT_LEN],
            iterations,
            digest: [0; DIGEST_LEN],
        };
        d.salt.copy_from_slice(&bytes("salt", SALT_LEN)?);
        d.digest.copy_from_slice(&bytes("digest", DIGEST_LEN)?);
        Ok(d)
    }
}

fn derive(key: &SecretBytes, salt: &[u8], iterations: u32) -> [u8; DIGEST_LEN] {
    let mut out = [0u8; DIGEST_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(key.expose(), salt, iterations, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_pbkdf2_hmac_sha256_like_rfc_7914() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", c = 1, dkLen = 64);
        // our 32-byte output is its first half.
        let d = derive(&SecretBytes::copy_from(b"passwd"), b"salt", 1);
        assert_eq!(
            hex::encode(d),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn json_round_trip_and_key_check() {
        let key = SecretBytes::random(64);
        let d = Pbkdf2Digest::new(&key);
        let v = d.to_json("0");
        assert_eq!(v["segments"], json!(["0"]));
        assert_eq!(v["iterations"], json!(ITERATIONS));
        let back = Pbkdf2Digest::from_json(&v).unwrap();
        assert_eq!(back, d);
        assert!(back.matches(&key));
        assert!(!back.matches(&SecretBytes::random(64)));
    }

    #[test]
    fn rejects_digests_it_cannot_verify() {
        let d = Pbkdf2Digest {
            salt: [1; 32],
            iterations: 1,
            digest: [2; 32],
        }
        .to_json("0");
        for (field, value, reason) in [
            ("hash", json!("sha1"), "hash"),
            ("type", json!("argon2"), "type"),
            ("iterations", json!(0), "iterations"),
            ("iterations", json!(u32::MAX), "more than"),
            ("salt", json!("AAAA"), "salt"),
            ("digest", json!("not base64!"), "digest"),
        ] {
            let mut bad = d.clone();
            bad[field] = value;
            let err = Pbkdf2Digest::from_json(&bad).unwrap_err();
            assert!(err.contains(reason), "{field}: {err}");
        }
    }
}
