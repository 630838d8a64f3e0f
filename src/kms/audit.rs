//! The audit log: one JSON line per KMS call, shaped like the CloudTrail
//! event AWS KMS writes for it, success or failure, never any key material.
//!
//! The lines form a keyed hash chain: each record carries its `sequence`,
//! the `previousDigest` and its own `digest`, an HMAC-SHA256 (under a key
//! derived from the root key) of the record's canonical JSON without the
//! digest. An edited record no longer matches its digest, a removed or
//! reordered one breaks the sequence and the link, and without the root key
//! nobody can forge a new chain. The tail is guarded by `audit.head`, the
//! last sequence and digest, itself authenticated: cutting records off the
//! end leaves the head pointing past the log.
//!
//! Each record is appended and fsynced before the call returns, under the
//! directory lock, so processes sharing a store extend one chain.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::context::EncryptionContext;
use super::id::Partition;
use super::store::{Paths, from_hex, mac, mac_matches, to_hex};
use super::time::Timestamp;
use super::{KmsError, fsio};
use crate::secret::SecretBytes;

const ZERO_DIGEST: [u8; 32] = [0; 32];

/// One KMS call, as the audit log records it.
pub struct Event<'a> {
    pub name: &'static str,
    /// One per call: a call whose change could not be kept after its record
    /// was written has a second record, of the error, with the same id.
    pub request_id: uuid::Uuid,
    pub time: Timestamp,
    pub partition: &'a Partition,
    /// The request, without any plaintext or key material.
    pub request: &'a Value,
    /// ARNs of the keys the call touched.
    pub resources: &'a [String],
    pub response: Option<&'a Value>,
    pub error: Option<&'a KmsError>,
    pub read_only: bool,
    /// Done by the KMS itself (scheduled deletion, automatic rotation)
    /// rather than asked for by a caller.
    pub by_service: bool,
}

impl Event<'_> {
    /// The CloudTrail record (AWS "Logging AWS KMS API calls with
    /// CloudTrail"), its identity that of the local process.
    fn to_record(&self) -> Map<String, Value> {
        let uid = nix::unistd::getuid().as_raw();
        let user_name = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name);
        let identity = if self.by_service {
            json!({"type": "AWSService", "invokedBy": "kms.amazonaws.com", "uid": uid, "pid": std::process::id()})
        } else {
            json!({
                "type": "LocalUser",
                "principalId": format!("uid:{uid}"),
                "userName": user_name,
                "uid": uid,
                "pid": std::process::id(),
            })
        };
        let resources: Vec<Value> = self
            .resources
            .iter()
            .map(|arn| json!({"accountId": self.partition.account, "type": "AWS::KMS::Key", "ARN": arn}))
            .collect();
        let mut record = Map::new();
        record.insert("eventVersion".into(), json!("1.08"));
        record.insert("userIdentity".into(), identity);
        record.insert("eventTime".into(), json!(self.time.to_string()));
        record.insert("eventSource".into(), json!("kms.amazonaws.com"));
        record.insert("eventName".into(), json!(self.name));
        record.insert("awsRegion".into(), json!(self.partition.region));
        record.insert("sourceIPAddress".into(), json!("local"));
        record.insert(
            "userAgent".into(),
            json!(concat!("nbdcrypt/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(e) = self.error {
            record.insert("errorCode".into(), json!(e.aws_code()));
            record.insert("errorMessage".into(), json!(e.message()));
        }
        record.insert("requestParameters".into(), self.request.clone());
        record.insert(
            "responseElements".into(),
            self.response.cloned().unwrap_or(Value::Null),
        );
        record.insert("requestID".into(), json!(self.request_id.to_string()));
        record.insert("eventID".into(), json!(uuid::Uuid::new_v4().to_string()));
        record.insert("readOnly".into(), json!(self.read_only));
        record.insert("resources".into(), Value::Array(resources));
        record.insert("eventType".into(), json!("AwsApiCall"));
        record.insert("managementEvent".into(), json!(true));
        record.insert("recipientAccountId".into(), json!(self.partition.account));
        record.insert("eventCategory".into(), json!("Management"));
        record
    }
}

/// The authenticated pointer to the last record.
#[derive(Serialize, Deserialize)]
struct Head {
    sequence: u64,
    digest: String,
    mac: String,
}

impl Head {
    fn tag(key: &SecretBytes, sequence: u64, digest: &str) -> [u8; 32] {
        mac(
            key,
            &[b"audit head", &sequence.to_be_bytes(), digest.as_bytes()],
        )
    }
}

/// The digest of a record: the HMAC of its canonical JSON without `digest`.
fn digest_of(key: &SecretBytes, record: &Map<String, Value>) -> [u8; 32] {
    let body = serde_json::to_string(record).expect("records serialize");
    mac(key, &[b"audit record", body.as_bytes()])
}

/// Appends `event` to the log of `paths`; once it returns, the record is
/// durable in the log. The caller holds the directory lock.
pub fn append(paths: &Paths, key: &SecretBytes, event: &Event<'_>) -> Result<(), KmsError> {
    let path = &paths.audit;
    let existed = path.exists();
    if existed {
        fsio::check_private(path)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KmsError::io("open the audit log", path, e))?;
    let (sequence, previous) = last_link(&mut file, path)?;
    let mut record = event.to_record();
    record.insert("sequence".into(), json!(sequence + 1));
    record.insert("previousDigest".into(), json!(to_hex(&previous)));
    let digest = to_hex(&digest_of(key, &record));
    record.insert("digest".into(), json!(digest));
    let mut line = serde_json::to_string(&record).expect("records serialize");
    line.push('\n');
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| KmsError::io("append to the audit log", path, e))?;
    if !existed {
        fsio::sync_dir(&paths.dir)?;
    }
    let head = Head {
        sequence: sequence + 1,
        mac: to_hex(&Head::tag(key, sequence + 1, &digest)),
        digest,
    };
    let head = serde_json::to_vec(&head).expect("the head serializes");
    // The record is in the log, so the call is recorded: what it did stands.
    // `verify` accepts a head one record behind (as after a crash here) and
    // reports one further behind.
    if let Err(e) = fsio::write_atomic(&paths.audit_head, &head) {
        tracing::warn!(error = %e, "the audit record was written, but the audit head could not be updated; `kms audit verify` reports it if this happens again");
    }
    Ok(())
}

/// The sequence and digest of the last complete record. A trailing partial
/// line (a crash in the middle of an append, whose call never returned) is
/// cut off first, so the chain goes on from the last record that counts.
fn last_link(file: &mut File, path: &Path) -> Result<(u64, [u8; 32]), KmsError> {
    let io = |e| KmsError::io("read the audit log", path, e);
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        file.read_to_end(&mut tail).map_err(io)?;
        let complete = tail.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
        let Some(complete) = complete else {
            if start == 0 {
                file.set_len(0).map_err(io)?;
                return Ok((0, ZERO_DIGEST));
            }
            window *= 2;
            continue;
        };
        if start + (complete as u64) < len {
            file.set_len(start + complete as u64).map_err(io)?;
        }
        let lines = &tail[..complete - 1];
        let last_start = lines.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
        let Some(last_start) = last_start.or((start == 0).then_some(0)) else {
            window *= 2;
            continue;
        };
        let corrupt = |reason: &str| KmsError::Corrupt {
            path: path.to_owned(),
            reason: format!("its last record {reason}; run `nbdcrypt kms audit verify`"),
        };
        let last: Map<String, Value> = serde_json::from_slice(&lines[last_start..])
            .map_err(|_| corrupt("is not a JSON record"))?;
        let sequence = last.get("sequence").and_then(Value::as_u64);
        let digest = last
            .get("digest")
            .and_then(Value::as_str)
            .and_then(from_hex);
        return match (sequence, digest) {
            (Some(s), Some(d)) if d.len() == 32 => Ok((s, d.try_into().expect("checked length"))),
            _ => Err(corrupt("has no sequence or digest")),
        };
    }
}

/// What `verify` found in an intact log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verified {
    pub records: u64,
}

/// Checks the whole chain, naming the first record that breaks it.
pub fn verify(paths: &Paths, key: &SecretBytes) -> Result<Verified, KmsError> {
    let path = &paths.audit;
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(KmsError::io("read the audit log", path, e)),
    };
    let bad = |line: u64, reason: String| KmsError::AuditTampered {
        path: path.clone(),
        line,
        reason,
    };
    let mut previous = to_hex(&ZERO_DIGEST);
    let mut count = 0u64;
    let mut digests = Vec::new();
    for raw in text.split_inclusive(|&b| b == b'\n') {
        let line = count + 1;
        // Only the last piece can lack its line end, and only because a
        // crash interrupted an append: the record was never acknowledged,
        // and the next KMS call cuts it off. The authenticated head still
        // names the last whole record, so a cut made on purpose is caught.
        let Some(raw) = raw.strip_suffix(b"\n") else {
            break;
        };
        let mut record: Map<String, Value> =
            serde_json::from_slice(raw).map_err(|_| bad(line, "is not a JSON record".into()))?;
        let Some(Value::String(digest)) = record.remove("digest") else {
            return Err(bad(line, "has no digest".into()));
        };
        let tag = from_hex(&digest).unwrap_or_default();
        let body = serde_json::to_string(&record).expect("records serialize");
        if !mac_matches(key, &[b"audit record", body.as_bytes()], &tag) {
            return Err(bad(
                line,
                "does not match its digest (it was edited)".into(),
            ));
        }
        let sequence = record.get("sequence").and_then(Value::as_u64);
        if sequence != Some(line) {
            return Err(bad(
                line,
                format!(
                    "has sequence {} where {line} was expected (records before it were removed or reordered)",
                    sequence.map_or("none".into(), |s| s.to_string())
                ),
            ));
        }
        if record.get("previousDigest").and_then(Value::as_str) != Some(previous.as_str()) {
            return Err(bad(line, "does not follow the record before it".into()));
        }
        previous = digest;
        digests.push(previous.clone());
        count = line;
    }
    check_head(paths, key, count, &digests)?;
    Ok(Verified { records: count })
}

/// The head must point at a record of the log: the last one, or the one
/// before it if a crash fell between an append and the head's update.
fn check_head(
    paths: &Paths,
    key: &SecretBytes,
    count: u64,
    digests: &[String],
) -> Result<(), KmsError> {
    let path = &paths.audit_head;
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound && count <= 1 => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(KmsError::AuditTampered {
                path: path.clone(),
                line: count,
                reason: "is missing though the log has records".into(),
            });
        }
        Err(e) => return Err(KmsError::io("read the audit head", path, e)),
    };
    let tampered = |reason: String| KmsError::AuditTampered {
        path: paths.audit.clone(),
        line: count + 1,
        reason,
    };
    let head: Head = serde_json::from_slice(&bytes)
        .map_err(|_| tampered("cannot be checked: the audit head does not parse".into()))?;
    let tag = from_hex(&head.mac).unwrap_or_default();
    if !mac_matches(
        key,
        &[
            b"audit head",
            &head.sequence.to_be_bytes(),
            head.digest.as_bytes(),
        ],
        &tag,
    ) {
        return Err(tampered(
            "cannot be checked: the audit head was edited".into(),
        ));
    }
    if head.sequence > count {
        return Err(tampered(format!(
            "is missing: the log ends at record {count} but {} were written (records were cut off its end)",
            head.sequence
        )));
    }
    let at = usize::try_from(head.sequence).expect("fits");
    if head.sequence + 1 < count || (at > 0 && digests[at - 1] != head.digest) {
        return Err(tampered(format!(
            "follows record {}, the last one the audit head knows, whose digest differs or which is not the end",
            head.sequence
        )));
    }
    Ok(())
}

/// Which records `kms audit` shows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Key ids or ARNs; a record matches if it names any of them.
    pub keys: Vec<String>,
    pub event: Option<String>,
    pub context: Vec<(String, String)>,
}

impl Filter {
    pub fn matches(&self, record: &Value) -> bool {
        if let Some(event) = &self.event
            && record.get("eventName").and_then(Value::as_str) != Some(event.as_str())
        {
            return false;
        }
        if !self.keys.is_empty() && !self.keys.iter().any(|k| names_key(record, k)) {
            return false;
        }
        self.context.iter().all(|(k, v)| {
            contexts(record)
                .iter()
                .any(|c| c.get(k) == Some(v.as_str()))
        })
    }
}

fn names_key(record: &Value, key: &str) -> bool {
    let in_resources = record
        .get("resources")
        .and_then(Value::as_array)
        .is_some_and(|rs| {
            rs.iter()
                .filter_map(|r| r.get("ARN").and_then(Value::as_str))
                .any(|arn| {
                    arn == key || arn.strip_suffix(key).is_some_and(|p| p.ends_with(":key/"))
                })
        });
    let params = record.get("requestParameters");
    let in_params = ["keyId", "sourceKeyId", "destinationKeyId", "targetKeyId"]
        .iter()
        .any(|f| params.and_then(|p| p.get(f)).and_then(Value::as_str) == Some(key));
    in_resources || in_params
}

/// Every encryption context a record's request names.
pub fn contexts(record: &Value) -> Vec<EncryptionContext> {
    let params = record.get("requestParameters");
    [
        "encryptionContext",
        "sourceEncryptionContext",
        "destinationEncryptionContext",
    ]
    .iter()
    .filter_map(|f| params.and_then(|p| p.get(f)))
    .filter_map(|c| serde_json::from_value(c.clone()).ok())
    .collect()
}

/// The records of the log, oldest first, that `filter` keeps. Lines that
/// do not parse are skipped here; `verify` is the place that names them.
pub fn read(paths: &Paths, filter: &Filter) -> Result<Vec<Value>, KmsError> {
    let text = match fs::read_to_string(&paths.audit) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        Err(e) => return Err(KmsError::io("read the audit log", &paths.audit, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| filter.matches(r))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Paths, SecretBytes, Partition) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), None);
        let partition = Partition {
            region: "local-1".into(),
            account: "111122223333".into(),
        };
        (dir, paths, SecretBytes::random(32), partition)
    }

    fn write(paths: &Paths, key: &SecretBytes, p: &Partition, n: usize) {
        for i in 0..n {
            let ctx = EncryptionContext::for_volume("db-1", &format!("vol-{i}"));
            let event = Event {
                name: "Decrypt",
                request_id: uuid::Uuid::new_v4(),
                time: Timestamp::from_unix(1_700_000_000 + i as i64),
                partition: p,
                request: &json!({"keyId": format!("k{i}"), "encryptionContext": ctx}),
                resources: &[format!("arn:aws:kms:local-1:111122223333:key/k{i}")],
                response: None,
                error: None,
                read_only: true,
                by_service: false,
            };
            append(paths, key, &event).unwrap();
        }
    }

    fn lines(paths: &Paths) -> Vec<String> {
        fs::read_to_string(&paths.audit)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn rewrite(paths: &Paths, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(&paths.audit, text).unwrap();
    }

    fn bad_line(paths: &Paths, key: &SecretBytes) -> u64 {
        match verify(paths, key).unwrap_err() {
            KmsError::AuditTampered { line, .. } => line,
            e => panic!("{e}"),
        }
    }

    #[test]
    fn an_intact_chain_verifies_and_filters_select() {
        let (_d, paths, key, p) = setup();
        assert_eq!(verify(&paths, &key).unwrap().records, 0);
        write(&paths, &key, &p, 4);
        assert_eq!(verify(&paths, &key).unwrap().records, 4);
        let f = Filter {
            context: vec![("aws:ebs:id".into(), "vol-2".into())],
            ..Filter::default()
        };
        assert_eq!(read(&paths, &f).unwrap().len(), 1);
        let f = Filter {
            keys: vec!["k3".into()],
            ..Filter::default()
        };
        assert_eq!(read(&paths, &f).unwrap().len(), 1);
        let f = Filter {
            event: Some("Encrypt".into()),
            ..Filter::default()
        };
        assert!(read(&paths, &f).unwrap().is_empty());
    }

    #[test]
    fn an_edited_record_is_named() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 4);
        let mut l = lines(&paths);
        l[1] = l[1].replace("vol-1", "vol-9");
        rewrite(&paths, &l);
        assert_eq!(bad_line(&paths, &key), 2);
    }

    #[test]
    fn a_removed_record_is_named() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 4);
        let mut l = lines(&paths);
        l.remove(1);
        rewrite(&paths, &l);
        assert_eq!(bad_line(&paths, &key), 2);
    }

    #[test]
    fn reordered_records_are_named() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 4);
        let mut l = lines(&paths);
        l.swap(2, 3);
        rewrite(&paths, &l);
        assert_eq!(bad_line(&paths, &key), 3);
    }

    #[test]
    fn records_cut_off_the_end_are_detected() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 4);
        let l = lines(&paths);
        rewrite(&paths, &l[..2]);
        assert_eq!(bad_line(&paths, &key), 3);
    }

    #[test]
    fn a_chain_forged_without_the_key_fails() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 2);
        let forger = SecretBytes::random(32);
        let (_d2, other, _, _) = setup();
        write(&other, &forger, &p, 2);
        fs::copy(&other.audit, &paths.audit).unwrap();
        assert_eq!(bad_line(&paths, &key), 1);
    }

    #[test]
    fn a_partial_last_line_is_cut_before_the_next_append() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 2);
        let mut f = OpenOptions::new().append(true).open(&paths.audit).unwrap();
        f.write_all(b"{\"eventName\":\"Dec").unwrap();
        write(&paths, &key, &p, 1);
        assert_eq!(verify(&paths, &key).unwrap().records, 3);
    }

    #[test]
    fn no_record_holds_key_material_fields() {
        let (_d, paths, key, p) = setup();
        write(&paths, &key, &p, 1);
        let text = fs::read_to_string(&paths.audit).unwrap();
        assert!(!text.contains("plaintext") && !text.contains("Plaintext"));
    }
}
