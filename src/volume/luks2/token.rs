//! Our LUKS2 token: the volume key wrapped by the KMS.
//!
//! The specification (section 3.6 "Tokens") leaves a token's content to its
//! type, and asks only for `type` (a string) and `keyslots` (an array of
//! keyslot ids). Ours is bound to no keyslot: the KMS, not a passphrase,
//! unwraps the key. cryptsetup shows the token in `luksDump` and otherwise
//! leaves it alone (with no `libcryptsetup-token-nbdcrypt-kms.so` plugin it
//! cannot use it).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

use super::{HeaderError, TOKEN_TYPE};

/// The volume key as the KMS wrapped it, and what is needed to unwrap it.
#[derive(Clone, Debug, PartialEq)]
pub struct KmsToken {
    /// The customer master key (ARN) that wrapped the key.
    pub key_id: String,
    /// The encryption context the key was wrapped under; the KMS demands the
    /// same to unwrap it.
    pub encryption_context: BTreeMap<String, String>,
    /// The KMS ciphertext blob (not secret: only the KMS can open it).
    pub ciphertext_blob: Vec<u8>,
}

impl KmsToken {
    /// Writes our fields into `obj`, leaving any other field (a `keyslots`
    /// binding made by cryptsetup, a field of a later nbdcrypt) as it is.
    pub(super) fn store(&self, obj: &mut Map<String, Value>) {
        obj.insert("type".into(), TOKEN_TYPE.into());
        obj.entry("keyslots")
            .or_insert_with(|| Value::Array(Vec::new()));
        obj.insert("key_id".into(), self.key_id.clone().into());
        let context = self
            .encryption_context
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("encryption_context".into(), Value::Object(context));
        obj.insert(
            "ciphertext_blob".into(),
            BASE64.encode(&self.ciphertext_blob).into(),
        );
    }

    /// Reads token `id`, which has our type.
    pub(super) fn load(id: &str, obj: &Map<String, Value>) -> Result<Self, HeaderError> {
        let bad =
            |what: String| HeaderError::Malformed(format!("token {id} ({TOKEN_TYPE}): {what}"));
        let string = |name: &str| match obj.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(bad(format!(
                "\"{name}\" is missing or not a non-empty string"
            ))),
        };
        let key_id = string("key_id")?;
        let blob_text = string("ciphertext_blob")?;
        let ciphertext_blob = BASE64
            .decode(&blob_text)
            .map_err(|e| bad(format!("\"ciphertext_blob\" is not base64: {e}")))?;
        let Some(Value::Object(context)) = obj.get("encryption_context") else {
            return Err(bad(
                "\"encryption_context\" is missing or not an object".into()
            ));
        };
        let encryption_context = context
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(bad(format!(
                    "encryption context value of {k:?} is not a string"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            key_id,
            encryption_context,
            ciphertext_blob,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> KmsToken {
        KmsToken {
            key_id: "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                .into(),
            encryption_context: BTreeMap::from([
                ("aws:ebs:id".into(), "vol-ad8c6542".into()),
                (
                    "aws:rds:db-id".into(),
                    "db-CQYSMDPBRZ7BPMH7Y3RTDG5QY".into(),
                ),
            ]),
            ciphertext_blob: vec![0, 1, 2, 250, 251, 252],
        }
    }

    #[test]
    fn stores_the_fields_cryptsetup_requires_and_ours() {
        let mut obj = Map::new();
        sample().store(&mut obj);
        assert_eq!(
            Value::Object(obj.clone()),
            json!({
                "type": "nbdcrypt-kms",
                "keyslots": [],
                "key_id": sample().key_id,
                "encryption_context": {"aws:ebs:id": "vol-ad8c6542", "aws:rds:db-id": "db-CQYSMDPBRZ7BPMH7Y3RTDG5QY"},
                "ciphertext_blob": "AAEC+vv8",
            })
        );
        assert_eq!(KmsToken::load("0", &obj).unwrap(), sample());
    }

    #[test]
    fn store_keeps_foreign_fields() {
        let mut obj = json!({"type": "nbdcrypt-kms", "keyslots": ["1"], "note": "x"})
            .as_object()
            .unwrap()
            .clone();
        sample().store(&mut obj);
        assert_eq!(obj["keyslots"], json!(["1"]));
        assert_eq!(obj["note"], json!("x"));
    }

    #[test]
    fn load_names_the_bad_field() {
        let mut good = Map::new();
        sample().store(&mut good);
        for (field, value) in [
            ("key_id", json!("")),
            ("ciphertext_blob", json!("***")),
            ("encryption_context", json!(["a"])),
            ("encryption_context", json!({"a": 1})),
        ] {
            let mut obj = good.clone();
            obj.insert(field.into(), value);
            let err = KmsToken::load("3", &obj).unwrap_err().to_string();
            assert!(
                err.contains("token 3") && err.contains(field.split('_').next().unwrap()),
                "{err}"
            );
        }
    }
}
