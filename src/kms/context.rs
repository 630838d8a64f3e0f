//! The encryption context: the non-secret key/value pairs a ciphertext is
//! bound to (AWS KMS "EncryptionContext"), authenticated as additional data.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Context key naming the database instance a data key belongs to.
pub const DB_ID_KEY: &str = "aws:rds:db-id";
/// Context key naming the volume a data key belongs to.
pub const VOLUME_ID_KEY: &str = "aws:ebs:id";

/// A set of key/value pairs, ordered by key so that equal contexts encode
/// alike whatever order the caller gave them in (AWS treats the context as
/// an unordered map too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    pub fn new() -> Self {
        Self::default()
    }

    /// The context of a volume's data key (DESIGN.md, "Envelope encryption").
    pub fn for_volume(db_id: &str, vol_id: &str) -> Self {
        Self::new()
            .with(DB_ID_KEY, db_id)
            .with(VOLUME_ID_KEY, vol_id)
    }

    /// The context of an artefact that belongs to a database but to no single
    /// volume.
    pub fn for_db(db_id: &str) -> Self {
        Self::new().with(DB_ID_KEY, db_id)
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The additional authenticated data for this context: the pair count,
    /// then each pair in key order with key and value each prefixed by its
    /// byte length. The length prefixes make the encoding injective, so
    /// `{"ab":"c"}` and `{"a":"bc"}` (which a plain concatenation confuses,
    /// as local-kms does) authenticate differently.
    pub fn aad(&self) -> Vec<u8> {
        let mut out = Vec::new();
        push_len(&mut out, self.0.len());
        for (k, v) in &self.0 {
            push_len(&mut out, k.len());
            out.extend_from_slice(k.as_bytes());
            push_len(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("encryption context entries are bounded far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
}

impl fmt::Display for EncryptionContext {
    /// Compact JSON, as CloudTrail and the AWS CLI show a context.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(&self.0).map_err(|_| fmt::Error)?;
        f.write_str(&json)
    }
}

impl FromIterator<(String, String)> for EncryptionContext {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_tells_apart_contexts_that_concatenate_alike() {
        let a = EncryptionContext::new().with("ab", "c");
        let b = EncryptionContext::new().with("a", "bc");
        assert_ne!(a.aad(), b.aad());
        let c = EncryptionContext::new().with("a", "b").with("c", "d");
        let d = EncryptionContext::new().with("a", "bcd");
        assert_ne!(c.aad(), d.aad());
        assert_ne!(
            EncryptionContext::new().aad(),
            EncryptionContext::new().with("", "").aad()
        );
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let a = EncryptionContext::new().with("x", "1").with("y", "2");
        let b = EncryptionContext::new().with("y", "2").with("x", "1");
        assert_eq!(a.aad(), b.aad());
        assert_eq!(a.to_string(), r#"{"x":"1","y":"2"}"#);
    }

    #[test]
    fn volume_context_has_the_aws_keys() {
        let c = EncryptionContext::for_volume("db-1", "vol-2");
        assert_eq!(c.get(DB_ID_KEY), Some("db-1"));
        assert_eq!(c.get(VOLUME_ID_KEY), Some("vol-2"));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"aws:ebs:id":"vol-2","aws:rds:db-id":"db-1"}"#);
        let back: EncryptionContext = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }

    proptest::proptest! {
        #[test]
        fn aad_is_injective(
            a in proptest::collection::btree_map(".{0,4}", ".{0,4}", 0..4),
            b in proptest::collection::btree_map(".{0,4}", ".{0,4}", 0..4),
        ) {
            let ca: EncryptionContext = a.clone().into_iter().collect();
            let cb: EncryptionContext = b.clone().into_iter().collect();
            proptest::prop_assert_eq!(ca.aad() == cb.aad(), a == b);
        }
    }
}
