//! Every KMS operation and error of issue 5 through the command line:
//! exit code, message and audit record.

mod common;

use common::kms::{Kms, VOL_CTX};
use common::s;
use serde_json::Value;

/// Makes a data key under `key` with `ctx`; (plaintext, blob) file names.
fn data_key(kms: &Kms, key: &str, ctx: &[&str], tag: &str) -> (String, String) {
    let (pt, blob) = (format!("{tag}.key"), format!("{tag}.blob"));
    let mut args = vec![
        "generate-data-key",
        key,
        "--number-of-bytes",
        "64",
        "--plaintext-out",
        &pt,
        "--ciphertext-out",
        &blob,
    ];
    args.extend_from_slice(ctx);
    kms.ok(&args);
    (pt, blob)
}

fn decrypt_args<'a>(blob: &'a str, out: &'a str, ctx: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["decrypt", "--ciphertext-file", blob, "--plaintext-out", out];
    args.extend_from_slice(ctx);
    args
}

#[test]
fn create_describe_list_and_address_keys() {
    let kms = Kms::new();
    let out = kms.run(&[
        "create-key",
        "--alias",
        "alias/orders-db",
        "--description",
        "orders DB volumes",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("created a new KMS root key"), "{stderr}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(kms.dir().join("root.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let desc = kms.json(&["describe-key", "alias/orders-db"]);
    let meta = &desc["KeyMetadata"];
    let id = meta["KeyId"].as_str().unwrap().to_owned();
    let arn = meta["Arn"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    let account = meta["AWSAccountId"].as_str().unwrap();
    assert_eq!(arn, format!("arn:aws:kms:local-1:{account}:key/{id}"));
    assert_eq!(meta["KeySpec"], "SYMMETRIC_DEFAULT");
    assert_eq!(meta["KeyUsage"], "ENCRYPT_DECRYPT");
    assert_eq!(meta["KeyState"], "Enabled");
    assert_eq!(meta["Description"], "orders DB volumes");
    assert_eq!(desc["KeyRotationStatus"]["KeyRotationEnabled"], false);
    let alias_arn = format!("arn:aws:kms:local-1:{account}:alias/orders-db");
    for name in [&id, &arn, &alias_arn] {
        assert_eq!(
            kms.json(&["describe-key", name])["KeyMetadata"]["KeyId"],
            id.as_str()
        );
    }
    let human = kms.ok(&["describe-key", &id]);
    assert!(
        human.contains("KeySpec") && human.contains("SYMMETRIC_DEFAULT"),
        "{human}"
    );

    // The account is fixed once per directory.
    let second = kms.create_key(&[]);
    let arn2 = kms.json(&["describe-key", &second])["KeyMetadata"]["Arn"].clone();
    assert!(arn2.as_str().unwrap().contains(&format!(":{account}:key/")));

    let keys = kms.json(&["list-keys"]);
    let ids: Vec<&str> = keys["Keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["KeyId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str(), second.as_str()]);
    let aliases = kms.json(&["list-aliases"]);
    assert_eq!(aliases["Aliases"][0]["AliasName"], "alias/orders-db");
    assert_eq!(aliases["Aliases"][0]["TargetKeyId"], id.as_str());

    // A foreign ARN or an unknown id is not found, and audited.
    let foreign = format!("arn:aws:kms:us-east-1:{account}:key/{id}");
    let line = kms.fails(&["describe-key", &foreign], "NotFoundException");
    assert!(line.contains("list-keys"), "{line}");
    kms.fails(&["describe-key", "alias/none"], "NotFoundException");
    let rec = kms.last_audit();
    assert_eq!(rec["eventName"], "DescribeKey");
    assert_eq!(rec["requestParameters"]["keyId"], "alias/none");
}

#[test]
fn alias_rules_and_verbs_that_change_keys_take_ids_only() {
    let kms = Kms::new();
    let key = kms.create_key(&["--alias", "alias/a"]);
    for bad in ["orders", "alias/aws/ebs", "alias/has space", "alias/"] {
        kms.fails(&["create-alias", bad, &key], "ValidationException");
    }
    // create-key checks its alias before making anything.
    let out = kms.run(&["create-key", "--alias", "alias/aws/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        kms.json(&["list-keys"])["Keys"].as_array().unwrap().len(),
        1
    );

    kms.fails(&["create-alias", "alias/a", &key], "AlreadyExistsException");
    for verb in [
        "disable-key",
        "enable-key",
        "schedule-key-deletion",
        "cancel-key-deletion",
        "enable-key-rotation",
        "rotate-key-on-demand",
    ] {
        let line = kms.fails(&[verb, "alias/a"], "ValidationException");
        assert!(line.contains("describe-key alias/a"), "{line}");
    }
    kms.fails(
        &["create-alias", "alias/b", "alias/a"],
        "ValidationException",
    );

    let other = kms.create_key(&[]);
    kms.ok(&["update-alias", "alias/a", &other]);
    assert_eq!(
        kms.json(&["describe-key", "alias/a"])["KeyMetadata"]["KeyId"],
        other.as_str()
    );
    let ecc = kms.create_key(&["--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY"]);
    kms.fails(&["update-alias", "alias/a", &ecc], "ValidationException");
    kms.ok(&["delete-alias", "alias/a"]);
    kms.fails(&["delete-alias", "alias/a"], "NotFoundException");
    kms.fails(&["describe-key", "alias/a"], "NotFoundException");
}

#[test]
fn data_keys_round_trip_and_the_context_binds() {
    let kms = Kms::new();
    let key = kms.create_key(&["--alias", "alias/vols"]);
    let (pt, blob) = data_key(&kms, "alias/vols", &VOL_CTX, "a");
    let (_, blob2) = data_key(&kms, "alias/vols", &VOL_CTX, "b");
    assert_eq!(kms.read(&pt).len(), 64);
    assert_ne!(kms.read(&blob), kms.read(&blob2), "blobs differ per call");
    let mode = std::fs::metadata(kms.path(&pt)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let rec = kms.last_audit();
    assert_eq!(rec["eventName"], "GenerateDataKey");
    assert_eq!(
        rec["requestParameters"]["encryptionContext"]["aws:ebs:id"],
        "vol-1"
    );
    assert_eq!(rec["requestParameters"]["keyId"], "alias/vols");
    assert!(rec["resources"][0]["ARN"].as_str().unwrap().ends_with(&key));

    kms.ok(&decrypt_args(&blob, "back.key", &VOL_CTX));
    assert_eq!(kms.read("back.key"), kms.read(&pt));
    let v = kms.json(&decrypt_args(&blob, "back2.key", &VOL_CTX));
    assert!(v["KeyId"].as_str().unwrap().ends_with(&key));

    // Refuses to overwrite a file.
    let out = kms.run(&decrypt_args(&blob, "back.key", &VOL_CTX));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // Another db-id, a missing entry, an extra entry: InvalidCiphertext,
    // saying nothing more, with the context in the audit record.
    for ctx in [
        &["-c", "aws:rds:db-id=db-2", "-c", "aws:ebs:id=vol-1"][..],
        &["-c", "aws:rds:db-id=db-1"][..],
        &[
            "-c",
            "aws:rds:db-id=db-1",
            "-c",
            "aws:ebs:id=vol-1",
            "-c",
            "x=y",
        ][..],
    ] {
        let line = kms.fails(
            &decrypt_args(&blob, "never.key", ctx),
            "InvalidCiphertextException",
        );
        assert!(!line.contains("db-2") && !line.contains(&key), "{line}");
        assert!(!kms.path("never.key").exists());
    }
    assert_eq!(
        kms.last_audit()["requestParameters"]["encryptionContext"]["x"],
        "y"
    );

    // The encoding is injective: {"a":"bc"} does not open what {"ab":"c"} wrapped.
    let (_, ab) = data_key(&kms, &key, &["-c", "ab=c"], "ab");
    kms.fails(
        &decrypt_args(&ab, "x.key", &["-c", "a=bc"]),
        "InvalidCiphertextException",
    );
    kms.ok(&decrypt_args(
        &ab,
        "y.key",
        &["--encryption-context", r#"{"ab":"c"}"#],
    ));

    // Every byte of the blob is authenticated.
    let bytes = kms.read(&blob);
    for i in [0, 1, 17, 20, 21, 33, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[i] ^= 1;
        let name = format!("bad{i}.blob");
        kms.write(&name, &bad);
        let out = kms.run(&decrypt_args(&name, "bad.key", &VOL_CTX));
        assert_eq!(out.status.code(), Some(1), "byte {i}");
    }

    // A key named on decrypt must be the blob's.
    let other = kms.create_key(&[]);
    let mut args = decrypt_args(&blob, "inc.key", &VOL_CTX);
    args.extend(["--key-id", other.as_str()]);
    let line = kms.fails(&args, "IncorrectKeyException");
    assert!(line.contains(&key), "{line}");
    let mut args = decrypt_args(&blob, "named.key", &VOL_CTX);
    args.extend(["--key-id", "alias/vols"]);
    kms.ok(&args);

    // Unknown key; data key sizes and plaintext sizes out of range.
    kms.fails(
        &[
            "generate-data-key",
            "alias/nope",
            "--plaintext-out",
            "n.key",
        ],
        "NotFoundException",
    );
    for n in ["0", "1025"] {
        kms.fails(
            &[
                "generate-data-key-without-plaintext",
                &key,
                "--number-of-bytes",
                n,
            ],
            "ValidationException",
        );
    }
    let nokey = kms.json(&["generate-data-key-without-plaintext", &key]);
    assert!(nokey.get("Plaintext").is_none() && nokey["CiphertextBlob"].is_string());
}

#[test]
fn encrypt_decrypt_and_limits() {
    let kms = Kms::new();
    let key = kms.create_key(&[]);
    let msg = kms.write("msg", b"attack at dawn");
    kms.ok(&[
        "encrypt",
        &key,
        "--plaintext-file",
        s(&msg),
        "-c",
        "purpose=test",
        "--out",
        "msg.blob",
    ]);
    kms.ok(&decrypt_args(
        "msg.blob",
        "msg.out",
        &["-c", "purpose=test"],
    ));
    assert_eq!(kms.read("msg.out"), b"attack at dawn");
    let printed = kms.json(&["encrypt", &key, "--plaintext-file", s(&msg)]);
    assert_eq!(printed["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
    let empty = kms.write("empty", b"");
    kms.fails(
        &["encrypt", &key, "--plaintext-file", s(&empty)],
        "ValidationException",
    );
    let big = kms.write("big", &[7u8; 4097]);
    kms.fails(
        &["encrypt", &key, "--plaintext-file", s(&big)],
        "ValidationException",
    );
    kms.write("foreign", b"not a blob at all, not at all, no");
    kms.fails(
        &decrypt_args("foreign", "f.out", &[]),
        "InvalidCiphertextException",
    );
}

#[test]
fn disable_then_enable() {
    let kms = Kms::new();
    let key = kms.create_key(&[]);
    let (pt, blob) = data_key(&kms, &key, &VOL_CTX, "d");
    kms.ok(&["disable-key", &key]);
    assert_eq!(
        kms.json(&["describe-key", &key])["KeyMetadata"]["KeyState"],
        "Disabled"
    );
    let line = kms.fails(&decrypt_args(&blob, "x.key", &VOL_CTX), "DisabledException");
    assert!(
        line.contains(&format!("nbdcrypt kms enable-key {key}")),
        "{line}"
    );
    kms.fails(
        &["generate-data-key", &key, "--plaintext-out", "n.key"],
        "DisabledException",
    );
    kms.ok(&["enable-key", &key]);
    kms.ok(&decrypt_args(&blob, "y.key", &VOL_CTX));
    assert_eq!(kms.read("y.key"), kms.read(&pt));
}

#[test]
fn schedule_then_cancel_deletion() {
    let kms = Kms::new();
    let key = kms.create_key(&[]);
    let (_, blob) = data_key(&kms, &key, &VOL_CTX, "d");
    for days in ["6", "31"] {
        kms.fails(
            &[
                "schedule-key-deletion",
                &key,
                "--pending-window-in-days",
                days,
            ],
            "ValidationException",
        );
    }
    kms.fails(&["cancel-key-deletion", &key], "KMSInvalidStateException");
    let s = kms.json(&[
        "schedule-key-deletion",
        &key,
        "--pending-window-in-days",
        "7",
    ]);
    assert_eq!(s["KeyState"], "PendingDeletion");
    assert_eq!(s["PendingWindowInDays"], 7);
    let meta = kms.json(&["describe-key", &key]);
    assert_eq!(meta["KeyMetadata"]["KeyState"], "PendingDeletion");
    assert_eq!(meta["KeyMetadata"]["DeletionDate"], s["DeletionDate"]);
    let line = kms.fails(
        &decrypt_args(&blob, "x.key", &VOL_CTX),
        "KMSInvalidStateException",
    );
    assert!(
        line.contains("pending deletion") && line.contains("cancel-key-deletion"),
        "{line}"
    );
    kms.fails(&["enable-key", &key], "KMSInvalidStateException");
    kms.fails(&["schedule-key-deletion", &key], "KMSInvalidStateException");

    // The default window is 30 days, counted from the call.
    let key2 = kms.create_key(&[]);
    let s2 = kms.json(&["schedule-key-deletion", &key2]);
    assert_eq!(s2["PendingWindowInDays"], 30);

    kms.ok(&["cancel-key-deletion", &key]);
    let meta = kms.json(&["describe-key", &key]);
    assert_eq!(meta["KeyMetadata"]["KeyState"], "Disabled");
    assert!(meta["KeyMetadata"].get("DeletionDate").is_none());
    kms.fails(&decrypt_args(&blob, "x.key", &VOL_CTX), "DisabledException");
    kms.ok(&["enable-key", &key]);
    kms.ok(&decrypt_args(&blob, "y.key", &VOL_CTX));
}

#[test]
fn rotate_then_decrypt_old_blobs() {
    let kms = Kms::new();
    let key = kms.create_key(&[]);
    let (pt, old) = data_key(&kms, &key, &VOL_CTX, "old");
    assert_eq!(kms.read(&old)[17..21], [0, 0, 0, 1]);
    let r = kms.json(&["rotate-key-on-demand", &key]);
    assert_eq!(r["KeyMaterialVersion"], 2);
    let (_, new) = data_key(&kms, &key, &VOL_CTX, "new");
    assert_eq!(
        kms.read(&new)[17..21],
        [0, 0, 0, 2],
        "new data keys use the newest material"
    );
    kms.ok(&decrypt_args(&old, "old.out", &VOL_CTX));
    assert_eq!(kms.read("old.out"), kms.read(&pt));
    kms.ok(&decrypt_args(&new, "new.out", &VOL_CTX));

    kms.fails(
        &[
            "enable-key-rotation",
            &key,
            "--rotation-period-in-days",
            "89",
        ],
        "ValidationException",
    );
    kms.ok(&[
        "enable-key-rotation",
        &key,
        "--rotation-period-in-days",
        "90",
    ]);
    let st = kms.json(&["get-key-rotation-status", &key]);
    assert_eq!(st["KeyRotationEnabled"], true);
    assert_eq!(st["RotationPeriodInDays"], 90);
    assert!(st["NextRotationDate"].is_string());
    let list = kms.json(&["list-key-rotations", &key]);
    assert_eq!(list["Rotations"][0]["RotationType"], "ON_DEMAND");
    kms.ok(&["disable-key-rotation", &key]);
    assert_eq!(
        kms.json(&["get-key-rotation-status", &key])["KeyRotationEnabled"],
        false
    );

    kms.ok(&["disable-key", &key]);
    kms.fails(&["rotate-key-on-demand", &key], "DisabledException");
    let ecc = kms.create_key(&["--key-spec", "ECC_NIST_P384", "--key-usage", "SIGN_VERIFY"]);
    kms.fails(
        &["enable-key-rotation", &ecc],
        "UnsupportedOperationException",
    );
}

#[test]
fn re_encrypt_to_a_new_context_then_the_old_one_fails() {
    let kms = Kms::new();
    let k1 = kms.create_key(&[]);
    let k2 = kms.create_key(&["--alias", "alias/k2"]);
    let (pt, blob) = data_key(&kms, &k1, &VOL_CTX, "a");
    let v = kms.json(&[
        "re-encrypt",
        "--ciphertext-file",
        &blob,
        "--source-encryption-context",
        "aws:rds:db-id=db-1",
        "--source-encryption-context",
        "aws:ebs:id=vol-1",
        "--destination-key-id",
        "alias/k2",
        "--destination-encryption-context",
        "aws:rds:db-id=db-2",
        "--destination-encryption-context",
        "aws:ebs:id=vol-1",
        "--out",
        "moved.blob",
    ]);
    assert!(v["SourceKeyId"].as_str().unwrap().ends_with(&k1));
    assert!(v["KeyId"].as_str().unwrap().ends_with(&k2));
    let rec = kms.last_audit();
    assert_eq!(rec["eventName"], "ReEncrypt");
    assert_eq!(
        rec["requestParameters"]["destinationEncryptionContext"]["aws:rds:db-id"],
        "db-2"
    );
    assert_eq!(rec["resources"].as_array().unwrap().len(), 2);
    let new_ctx = ["-c", "aws:rds:db-id=db-2", "-c", "aws:ebs:id=vol-1"];
    kms.ok(&decrypt_args("moved.blob", "moved.key", &new_ctx));
    assert_eq!(kms.read("moved.key"), kms.read(&pt));
    kms.fails(
        &decrypt_args("moved.blob", "x.key", &VOL_CTX),
        "InvalidCiphertextException",
    );

    // A wrong source context, or a source key that is not the blob's.
    kms.fails(
        &[
            "re-encrypt",
            "--ciphertext-file",
            &blob,
            "--destination-key-id",
            &k2,
        ],
        "InvalidCiphertextException",
    );
    kms.fails(
        &[
            "re-encrypt",
            "--ciphertext-file",
            &blob,
            "--source-encryption-context",
            r#"{"aws:rds:db-id":"db-1","aws:ebs:id":"vol-1"}"#,
            "--source-key-id",
            &k2,
            "--destination-key-id",
            &k2,
        ],
        "IncorrectKeyException",
    );
    let ecc = kms.create_key(&["--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY"]);
    kms.fails(
        &[
            "re-encrypt",
            "--ciphertext-file",
            &blob,
            "--source-encryption-context",
            r#"{"aws:rds:db-id":"db-1","aws:ebs:id":"vol-1"}"#,
            "--destination-key-id",
            &ecc,
        ],
        "InvalidKeyUsageException",
    );
}

/// Checks signatures and an RSA-OAEP ciphertext with an independent
/// implementation: Python's `cryptography` (OpenSSL), as the test script
/// installs it.
fn python(kms: &Kms, script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("/usr/bin/python3")
        .current_dir(kms.env.dir.path())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("/usr/bin/python3 with python3-cryptography (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const PY_VERIFY: &str = r#"
import sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
pub = serialization.load_der_public_key(open(sys.argv[1], 'rb').read())
sig, msg, alg = open(sys.argv[2], 'rb').read(), open(sys.argv[3], 'rb').read(), sys.argv[4]
h = {'256': hashes.SHA256(), '384': hashes.SHA384(), '512': hashes.SHA512()}[alg[-3:]]
if alg.startswith('ECDSA'):
    pub.verify(sig, msg, ec.ECDSA(h))
elif alg.startswith('RSASSA_PSS'):
    pub.verify(sig, msg, padding.PSS(padding.MGF1(h), h.digest_size), h)
else:
    pub.verify(sig, msg, padding.PKCS1v15(), h)
print('ok')
"#;

const PY_OAEP: &str = r#"
import sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
pub = serialization.load_der_public_key(open(sys.argv[1], 'rb').read())
h = hashes.SHA256()
ct = pub.encrypt(open(sys.argv[2], 'rb').read(), padding.OAEP(padding.MGF1(h), h, None))
open(sys.argv[3], 'wb').write(ct)
"#;

#[test]
fn asymmetric_keys_sign_verify_and_encrypt_as_aws_does() {
    let kms = Kms::new();
    kms.fails(
        &["create-key", "--key-spec", "RSA_2048"],
        "ValidationException",
    );
    kms.fails(
        &[
            "create-key",
            "--key-spec",
            "ECC_NIST_P256",
            "--key-usage",
            "ENCRYPT_DECRYPT",
        ],
        "ValidationException",
    );
    kms.fails(
        &["create-key", "--key-usage", "SIGN_VERIFY"],
        "ValidationException",
    );
    let msg = kms.write("msg", b"sign me");
    for (spec, algs) in [
        ("ECC_NIST_P256", &["ECDSA_SHA_256"][..]),
        ("ECC_NIST_P384", &["ECDSA_SHA_384"][..]),
        (
            "RSA_2048",
            &[
                "RSASSA_PSS_SHA_256",
                "RSASSA_PKCS1_V1_5_SHA_384",
                "RSASSA_PSS_SHA_512",
            ][..],
        ),
    ] {
        let key = kms.create_key(&["--key-spec", spec, "--key-usage", "SIGN_VERIFY"]);
        let meta = kms.json(&["describe-key", &key]);
        assert_eq!(meta["KeyMetadata"]["KeySpec"], spec);
        assert!(meta.get("KeyRotationStatus").is_none());
        let pubkey = format!("{spec}.der");
        let p = kms.json(&["get-public-key", &key, "--out", &pubkey]);
        assert_eq!(p["KeyUsage"], "SIGN_VERIFY");
        for alg in algs {
            let sig = format!("{spec}-{alg}.sig");
            kms.ok(&[
                "sign",
                &key,
                "--message-file",
                s(&msg),
                "--signing-algorithm",
                alg,
                "--out",
                &sig,
            ]);
            assert_eq!(
                kms.last_audit()["requestParameters"]["signingAlgorithm"],
                *alg
            );
            assert_eq!(
                python(&kms, PY_VERIFY, &[&pubkey, &sig, s(&msg), alg]).trim(),
                "ok"
            );
            let v = kms.json(&[
                "verify",
                &key,
                "--message-file",
                s(&msg),
                "--signing-algorithm",
                alg,
                "--signature-file",
                &sig,
            ]);
            assert_eq!(v["SignatureValid"], true);
            let other = kms.write("other", b"sign mE");
            kms.fails(
                &[
                    "verify",
                    &key,
                    "--message-file",
                    s(&other),
                    "--signing-algorithm",
                    alg,
                    "--signature-file",
                    &sig,
                ],
                "KMSInvalidSignatureException",
            );
        }
        kms.fails(
            &["generate-data-key", &key, "--plaintext-out", "no.key"],
            "InvalidKeyUsageException",
        );
        kms.fails(
            &[
                "encrypt",
                &key,
                "--plaintext-file",
                s(&msg),
                "--encryption-algorithm",
                "RSAES_OAEP_SHA_256",
            ],
            "InvalidKeyUsageException",
        );
    }
    // A digest is signed as such.
    let ecc = kms.create_key(&["--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY"]);
    let short = kms.write("short", &[1u8; 31]);
    kms.fails(
        &[
            "sign",
            &ecc,
            "--message-file",
            s(&short),
            "--message-type",
            "DIGEST",
            "--signing-algorithm",
            "ECDSA_SHA_256",
        ],
        "ValidationException",
    );
    kms.fails(
        &[
            "sign",
            &ecc,
            "--message-file",
            s(&msg),
            "--signing-algorithm",
            "RSASSA_PSS_SHA_256",
        ],
        "InvalidKeyUsageException",
    );

    // Signing with an ENCRYPT_DECRYPT key.
    let sym = kms.create_key(&[]);
    kms.fails(
        &[
            "sign",
            &sym,
            "--message-file",
            s(&msg),
            "--signing-algorithm",
            "ECDSA_SHA_256",
        ],
        "InvalidKeyUsageException",
    );
    kms.fails(&["get-public-key", &sym], "UnsupportedOperationException");
    let rsa = kms.create_key(&["--key-spec", "RSA_2048", "--key-usage", "ENCRYPT_DECRYPT"]);
    kms.fails(
        &[
            "sign",
            &rsa,
            "--message-file",
            s(&msg),
            "--signing-algorithm",
            "RSASSA_PSS_SHA_256",
        ],
        "InvalidKeyUsageException",
    );
    let line = kms.fails(
        &["generate-data-key", &rsa, "--plaintext-out", "no.key"],
        "InvalidKeyUsageException",
    );
    assert!(
        line.contains("SYMMETRIC_DEFAULT") && line.contains("describe-key"),
        "{line}"
    );

    // RSA-OAEP: ciphertext made by another implementation decrypts; a
    // context or a missing key id is refused.
    kms.ok(&["get-public-key", &rsa, "--out", "rsa.der"]);
    python(&kms, PY_OAEP, &["rsa.der", s(&msg), "py.ct"]);
    kms.ok(&[
        "decrypt",
        "--ciphertext-file",
        "py.ct",
        "--key-id",
        &rsa,
        "--encryption-algorithm",
        "RSAES_OAEP_SHA_256",
        "--plaintext-out",
        "py.out",
    ]);
    assert_eq!(kms.read("py.out"), b"sign me");
    kms.fails(
        &[
            "decrypt",
            "--ciphertext-file",
            "py.ct",
            "--encryption-algorithm",
            "RSAES_OAEP_SHA_256",
            "--plaintext-out",
            "x.out",
        ],
        "ValidationException",
    );
    kms.fails(
        &[
            "encrypt",
            &rsa,
            "--plaintext-file",
            s(&msg),
            "--encryption-algorithm",
            "RSAES_OAEP_SHA_256",
            "-c",
            "a=b",
        ],
        "ValidationException",
    );
    kms.fails(
        &["encrypt", &rsa, "--plaintext-file", s(&msg)],
        "InvalidKeyUsageException",
    );
    kms.ok(&[
        "encrypt",
        &rsa,
        "--plaintext-file",
        s(&msg),
        "--encryption-algorithm",
        "RSAES_OAEP_SHA_256",
        "--out",
        "rsa.ct",
    ]);
    kms.ok(&[
        "decrypt",
        "--ciphertext-file",
        "rsa.ct",
        "--key-id",
        &rsa,
        "--encryption-algorithm",
        "RSAES_OAEP_SHA_256",
        "--plaintext-out",
        "rsa.out",
    ]);
    assert_eq!(kms.read("rsa.out"), b"sign me");
}

#[test]
fn every_verb_speaks_json() {
    let kms = Kms::new();
    let key = kms.create_key(&["--alias", "alias/j"]);
    let ecc = kms.create_key(&["--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY"]);
    let msg = kms.write("msg", b"m");
    kms.ok(&[
        "sign",
        &ecc,
        "--message-file",
        s(&msg),
        "--signing-algorithm",
        "ECDSA_SHA_256",
        "--out",
        "m.sig",
    ]);
    kms.ok(&[
        "generate-data-key-without-plaintext",
        &key,
        "--ciphertext-out",
        "j.blob",
    ]);
    let runs: Vec<Vec<&str>> = vec![
        vec!["describe-key", &key],
        vec!["list-keys"],
        vec!["create-alias", "alias/j2", &key],
        vec!["update-alias", "alias/j2", &key],
        vec!["list-aliases", "--key-id", &key],
        vec!["delete-alias", "alias/j2"],
        vec!["disable-key", &key],
        vec!["enable-key", &key],
        vec!["enable-key-rotation", &key],
        vec!["get-key-rotation-status", &key],
        vec!["disable-key-rotation", &key],
        vec!["rotate-key-on-demand", &key],
        vec!["list-key-rotations", &key],
        vec!["generate-data-key", &key, "--plaintext-out", "j.key"],
        vec!["generate-data-key-without-plaintext", &key],
        vec!["encrypt", &key, "--plaintext-file", s(&msg)],
        vec![
            "decrypt",
            "--ciphertext-file",
            "j.blob",
            "--plaintext-out",
            "j.out",
        ],
        vec![
            "re-encrypt",
            "--ciphertext-file",
            "j.blob",
            "--destination-key-id",
            &key,
        ],
        vec!["get-public-key", &ecc],
        vec![
            "sign",
            &ecc,
            "--message-file",
            s(&msg),
            "--signing-algorithm",
            "ECDSA_SHA_256",
        ],
        vec![
            "verify",
            &ecc,
            "--message-file",
            s(&msg),
            "--signing-algorithm",
            "ECDSA_SHA_256",
            "--signature-file",
            "m.sig",
        ],
        vec!["audit", "verify"],
        vec!["schedule-key-deletion", &key],
        vec!["cancel-key-deletion", &key],
    ];
    for args in runs {
        let v: Value = kms.json(&args);
        assert!(v.is_object(), "{args:?}: {v}");
    }
}

#[test]
fn the_store_is_private_and_its_root_key_can_live_elsewhere() {
    let kms = Kms::new();
    let elsewhere = kms.path("secret-root.key");
    let run = |args: &[&str], root: &std::path::Path| {
        let mut cmd = kms.command(args);
        cmd.env("NBDCRYPT_KMS_ROOT_KEY", root);
        cmd.output().unwrap()
    };
    let out = run(&["create-key", "--alias", "alias/r"], &elsewhere);
    assert!(out.status.success());
    assert!(elsewhere.exists() && !kms.dir().join("root.key").exists());
    assert!(
        run(&["describe-key", "alias/r"], &elsewhere)
            .status
            .success()
    );
    // Without it, the store does not open, and nothing is recreated.
    let out = kms.run(&["describe-key", "alias/r"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root key") && err.contains("NBDCRYPT_KMS_ROOT_KEY"),
        "{err}"
    );
    assert!(!kms.dir().join("root.key").exists());
    // Another root key is named as the wrong one.
    let other = kms.path("other.key");
    std::fs::write(&other, [9u8; 32]).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = run(&["list-keys"], &other);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not belong"));

    // Readable by others: refused, with the fix.
    let store = kms.dir().join("keystore");
    std::fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = run(&["list-keys"], &elsewhere);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("AccessDeniedException") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn processes_sharing_a_store_do_not_corrupt_it() {
    let kms = Kms::new();
    kms.create_key(&[]);
    let children: Vec<_> = (0..6)
        .map(|i| {
            let alias = format!("alias/p{i}");
            kms.command(&["create-key", "--alias", &alias])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(
        kms.json(&["list-keys"])["Keys"].as_array().unwrap().len(),
        7
    );
    assert_eq!(
        kms.json(&["list-aliases"])["Aliases"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    let v = kms.json(&["audit", "verify"]);
    assert_eq!(v["Records"], 1 + 6 * 2 + 2);
}
