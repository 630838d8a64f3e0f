//! The audit log through the command line: what the records hold, the
//! filters of `kms audit`, and `kms audit verify` after each kind of
//! tampering.

mod common;

use common::kms::{Kms, VOL_CTX};

/// A KMS with a few records of different keys, events and contexts.
fn busy_kms() -> (Kms, String, String) {
    let kms = Kms::new();
    let a = kms.create_key(&["--alias", "alias/a"]);
    let b = kms.create_key(&[]);
    for (key, vol) in [(&a, "vol-1"), (&b, "vol-2"), (&a, "vol-3")] {
        let ctx = format!("aws:ebs:id={vol}");
        kms.ok(&[
            "generate-data-key-without-plaintext",
            key,
            "-c",
            "aws:rds:db-id=db-1",
            "-c",
            &ctx,
            "--ciphertext-out",
            &format!("{vol}.blob"),
        ]);
    }
    (kms, a, b)
}

fn log_lines(kms: &Kms) -> Vec<String> {
    std::fs::read_to_string(kms.dir().join("audit.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn rewrite(kms: &Kms, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(kms.dir().join("audit.log"), text).unwrap();
}

/// `audit verify` must fail naming `record`.
fn verify_fails_at(kms: &Kms, record: usize) -> String {
    let out = kms.run(&["audit", "verify"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!(
            "nbdcrypt: error: AuditLogTampered: audit record {record} "
        )),
        "{err}"
    );
    err
}

#[test]
fn records_are_cloudtrail_shaped_and_hold_no_key_material() {
    let kms = Kms::new();
    let key = kms.create_key(&[]);
    kms.ok(&[
        "generate-data-key",
        &key,
        "--plaintext-out",
        "dk",
        "--ciphertext-out",
        "dk.blob",
        VOL_CTX[0],
        VOL_CTX[1],
        VOL_CTX[2],
        VOL_CTX[3],
    ]);
    let rec = kms.last_audit();
    for field in [
        "eventVersion",
        "eventTime",
        "eventSource",
        "eventName",
        "awsRegion",
        "requestParameters",
        "requestID",
        "eventID",
        "resources",
        "recipientAccountId",
    ] {
        assert!(rec.get(field).is_some(), "{field} missing: {rec}");
    }
    assert_eq!(rec["eventSource"], "kms.amazonaws.com");
    assert!(rec["userIdentity"]["uid"].is_u64() && rec["userIdentity"]["pid"].is_u64());
    assert!(rec.get("errorCode").is_none());
    let log = std::fs::read_to_string(kms.dir().join("audit.log")).unwrap();
    let dk = kms.read("dk");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &dk);
    assert!(!log.contains(&b64) && !log.contains(&hex::encode(&dk)));
    let blob = kms.read("dk.blob");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &blob);
    assert!(!log.contains(&b64), "not even the blob is logged");
}

#[test]
fn filters_by_key_event_and_context() {
    let (kms, a, b) = busy_kms();
    let count = |args: &[&str]| {
        let mut all = vec!["--json", "audit"];
        all.extend_from_slice(args);
        kms.ok(&all).lines().count()
    };
    assert_eq!(count(&[]), 6);
    assert_eq!(count(&["--event", "GenerateDataKeyWithoutPlaintext"]), 3);
    assert_eq!(count(&["--key", &b]), 2);
    assert_eq!(count(&["--key", "alias/a"]), 4);
    assert_eq!(count(&["--key", &a, "--event", "CreateAlias"]), 1);
    assert_eq!(count(&["--context", "aws:ebs:id=vol-3"]), 1);
    assert_eq!(count(&["--context", "aws:rds:db-id=db-1"]), 3);
    assert_eq!(count(&["--context", "aws:rds:db-id=db-1", "--key", &b]), 1);
    assert_eq!(count(&["--context", "aws:rds:db-id=db-9"]), 0);
    let table = kms.ok(&["audit", "--context", "aws:ebs:id=vol-2"]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].starts_with("TIME"));
    assert!(rows[1].contains(&b) && rows[1].contains("OK") && rows[1].contains("vol-2"));
}

#[test]
fn verify_passes_on_an_intact_log() {
    let (kms, _, _) = busy_kms();
    let out = kms.ok(&["audit", "verify"]);
    assert!(out.contains("6 records"), "{out}");
    // Verifying is not a KMS call: it adds no record.
    assert_eq!(log_lines(&kms).len(), 6);
}

#[test]
fn an_edited_record_is_named() {
    let (kms, _, _) = busy_kms();
    let mut lines = log_lines(&kms);
    lines[3] = lines[3].replace("vol-1", "vol-7");
    rewrite(&kms, &lines);
    let err = verify_fails_at(&kms, 4);
    assert!(err.contains("edited"), "{err}");
}

#[test]
fn a_removed_record_is_named() {
    let (kms, _, _) = busy_kms();
    let mut lines = log_lines(&kms);
    lines.remove(2);
    rewrite(&kms, &lines);
    let err = verify_fails_at(&kms, 3);
    assert!(err.contains("removed or reordered"), "{err}");
}

#[test]
fn reordered_records_are_named() {
    let (kms, _, _) = busy_kms();
    let mut lines = log_lines(&kms);
    lines.swap(1, 4);
    rewrite(&kms, &lines);
    verify_fails_at(&kms, 2);
}

#[test]
fn records_cut_off_the_end_are_detected() {
    let (kms, _, _) = busy_kms();
    let lines = log_lines(&kms);
    rewrite(&kms, &lines[..4]);
    let err = verify_fails_at(&kms, 5);
    assert!(err.contains("cut off"), "{err}");
}

#[test]
fn a_rewritten_digest_does_not_hide_an_edit() {
    let (kms, _, _) = busy_kms();
    let mut lines = log_lines(&kms);
    // Recompute a plain SHA-256 chain over the edited record: without the
    // root key the digest still does not match.
    let mut rec: serde_json::Value = serde_json::from_str(&lines[5]).unwrap();
    rec["eventName"] = "Encrypt".into();
    rec.as_object_mut().unwrap().remove("digest");
    let body = serde_json::to_string(&rec).unwrap();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(body.as_bytes());
    rec["digest"] = hex::encode(digest).into();
    lines[5] = serde_json::to_string(&rec).unwrap();
    rewrite(&kms, &lines);
    verify_fails_at(&kms, 6);
}

#[test]
fn new_records_after_a_verify_extend_the_chain() {
    let (kms, a, _) = busy_kms();
    kms.ok(&["describe-key", &a]);
    kms.fails(&["describe-key", "alias/missing"], "NotFoundException");
    let out = kms.ok(&["audit", "verify"]);
    assert!(out.contains("8 records"), "{out}");
}
