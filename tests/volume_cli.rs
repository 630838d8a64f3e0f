//! Volumes through the CLI: creation, conversion, interop with the real
//! cryptsetup and an independent AES-XTS, and every error a user must get.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{DB, Env, attach_args, create_args, random_bytes, tool, tool_ok};

const VOL: &str = "vol-ad8c6542";

#[test]
fn create_makes_a_sparse_volume_that_reads_as_zeros() {
    let env = Env::new();
    env.key("alias/orders-db");
    let vol = env.volume("orders.vol", "64M", "alias/orders-db", VOL);
    let meta = std::fs::metadata(&vol).unwrap();
    assert_eq!(meta.len(), (16 << 20) + (64 << 20));
    assert!(
        meta.blocks() * 512 < (1 << 20),
        "only the header is allocated: {} blocks",
        meta.blocks()
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "inspect", vol.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(info["volume_id"], VOL);
    assert_eq!(info["cipher"], "aes-xts-plain64");
    assert_eq!(info["sector_size"], 4096);
    assert_eq!(info["size"], 64 << 20);
    assert_eq!(info["encryption_context"]["aws:rds:db-id"], DB);
    assert_eq!(info["encryption_context"]["aws:ebs:id"], VOL);
    assert!(
        info["kms_key_id"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:kms:")
    );
    let human = env.ok(&["volume", "inspect", vol.to_str().unwrap()]);
    assert!(
        human.contains(VOL) && human.contains("aes-xts-plain64"),
        "{human}"
    );

    let out = env.path("zeros.raw");
    env.ok(&attach_args(
        "export",
        vol.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    let data = std::fs::read(&out).unwrap();
    assert_eq!(data.len(), 64 << 20);
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn import_export_round_trip_and_independent_decryption() {
    let env = Env::new();
    env.key("alias/k");
    for sector_size in ["512", "4096"] {
        let vol = env.path(&format!("v{sector_size}.vol"));
        let mut args = create_args(vol.to_str().unwrap(), "8M", "alias/k", VOL);
        args.extend(["--sector-size", sector_size]);
        env.ok(&args);
        // 5 MiB + 1000 bytes: the last sector is partial, the rest stays zero.
        let raw = env.path(&format!("in{sector_size}.raw"));
        let mut plain = random_bytes((5 << 20) + 1000);
        plain[4096..8192].fill(0);
        std::fs::write(&raw, &plain).unwrap();
        env.ok(&attach_args(
            "import",
            vol.to_str().unwrap(),
            raw.to_str().unwrap(),
        ));

        let out = env.path(&format!("out{sector_size}.raw"));
        env.ok(&attach_args(
            "export",
            vol.to_str().unwrap(),
            out.to_str().unwrap(),
        ));
        let back = std::fs::read(&out).unwrap();
        assert_eq!(back.len(), 8 << 20);
        assert!(
            back[..plain.len()] == plain[..],
            "exported plaintext differs"
        );
        assert!(back[plain.len()..].iter().all(|&b| b == 0));

        let key = env.path(&format!("vk{sector_size}.bin"));
        env.ok(&attach_args(
            "export-key",
            vol.to_str().unwrap(),
            key.to_str().unwrap(),
        ));
        let meta = std::fs::metadata(&key).unwrap();
        assert_eq!(meta.len(), 64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // Python's cryptography (OpenSSL) decrypts the segment sector by
        // sector: IV = little-endian sector number in sector-size units.
        let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
vol, key, ss, count = sys.argv[1], open(sys.argv[2], 'rb').read(), int(sys.argv[3]), int(sys.argv[4])
out = bytearray()
with open(vol, 'rb') as f:
    f.seek(16 << 20)
    for n in range(count):
        d = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, 'little'))).decryptor()
        out += d.update(f.read(ss)) + d.finalize()
sys.stdout.buffer.write(out)
"#;
        let sectors = (plain.len() / sector_size.parse::<usize>().unwrap()).to_string();
        let py = tool(
            "/usr/bin/python3",
            &[
                "-c",
                script,
                vol.to_str().unwrap(),
                key.to_str().unwrap(),
                sector_size,
                &sectors,
            ],
        );
        assert!(
            py.status.success(),
            "{}",
            String::from_utf8_lossy(&py.stderr)
        );
        // The zeroed 4 KiB were written (as ciphertext of zeros), so every
        // sector up to there decrypts independently to the original.
        assert_eq!(
            py.stdout.len(),
            sectors.parse::<usize>().unwrap() * sector_size.parse::<usize>().unwrap()
        );
        assert!(
            py.stdout[..] == plain[..py.stdout.len()],
            "independent AES-XTS disagrees ({sector_size})"
        );

        let again = env.fails(&attach_args(
            "export-key",
            vol.to_str().unwrap(),
            key.to_str().unwrap(),
        ));
        assert!(again.contains("refusing to overwrite"), "{again}");
    }
}

#[test]
fn cryptsetup_reads_the_header_and_accepts_the_exported_key() {
    let env = Env::new();
    env.key("alias/k");
    let vol = env.volume("c.vol", "16M", "alias/k", VOL);
    let v = vol.to_str().unwrap();
    let dump = tool_ok("cryptsetup", &["luksDump", v]);
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    assert!(dump.contains("sector: 4096"), "{dump}");
    assert!(dump.contains("nbdcrypt-kms"), "{dump}");
    assert!(dump.contains(VOL), "label: {dump}");

    let key = env.path("vk.bin");
    env.ok(&attach_args("export-key", v, key.to_str().unwrap()));
    let pass = env.path("pass.txt");
    std::fs::write(&pass, "recovery passphrase").unwrap();
    let add = |key: &std::path::Path| {
        tool(
            "cryptsetup",
            &[
                "luksAddKey",
                "--batch-mode",
                "--key-size",
                "512",
                "--volume-key-file",
                key.to_str().unwrap(),
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                v,
                pass.to_str().unwrap(),
            ],
        )
    };
    let wrong = env.path("wrong.bin");
    std::fs::write(&wrong, random_bytes(64)).unwrap();
    assert!(
        !add(&wrong).status.success(),
        "cryptsetup must refuse a wrong volume key"
    );
    let out = add(&key);
    assert!(
        out.status.success(),
        "luksAddKey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The volume still opens through the KMS with cryptsetup's keyslot in it.
    let out = env.path("after.raw");
    env.ok(&attach_args("export", v, out.to_str().unwrap()));
}

#[test]
fn a_header_made_by_cryptsetup_is_refused_not_misread() {
    let env = Env::new();
    let img = env.path("plain.luks");
    std::fs::write(&img, vec![0u8; 32 << 20]).unwrap();
    let pass = env.path("pass");
    std::fs::write(&pass, "x").unwrap();
    tool_ok(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            img.to_str().unwrap(),
            pass.to_str().unwrap(),
        ],
    );
    let err = env.fails(&["volume", "inspect", img.to_str().unwrap()]);
    assert!(err.contains("nbdcrypt-kms"), "{err}");
    env.key("alias/k");
    let out = env.path("o.raw");
    let err = env.fails(&attach_args(
        "export",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert!(err.contains("nbdcrypt-kms"), "{err}");
    assert!(!out.exists());
}

/// Asserts that the newest audit record is a failed Decrypt with `code`.
fn assert_failed_decrypt(env: &Env, code: &str) {
    let rec = env.last_audit();
    assert_eq!(rec["eventName"], "Decrypt", "{rec}");
    assert_eq!(rec["errorCode"], code, "{rec}");
}

#[test]
fn wrong_db_id_fails_in_the_kms_and_is_audited() {
    let env = Env::new();
    env.key("alias/k");
    let vol = env.volume("w.vol", "8M", "alias/k", VOL);
    let before = std::fs::read(&vol).unwrap();
    let out = env.path("o.raw");
    let err = env.fails(&[
        "volume",
        "export",
        vol.to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
        "--db-id",
        "db-SOMEONEELSE",
    ]);
    assert!(
        err.contains("InvalidCiphertextException") && err.contains("--db-id"),
        "{err}"
    );
    assert!(
        err.contains("db-SOMEONEELSE"),
        "the message names the context tried: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_failed_decrypt(&env, "InvalidCiphertextException");
    let rec = env.last_audit();
    assert_eq!(
        rec["requestParameters"]["encryptionContext"]["aws:rds:db-id"],
        "db-SOMEONEELSE"
    );
    assert!(!out.exists(), "no output left behind");
    assert!(std::fs::read(&vol).unwrap() == before, "volume untouched");
}

#[test]
fn tampered_headers_are_refused() {
    let env = Env::new();
    env.key("alias/k");
    let a = env.volume("a.vol", "8M", "alias/k", "vol-aaaa");
    let b = env.volume("b.vol", "8M", "alias/k", "vol-bbbb");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let key = env.path("k.bin");
    let key = key.to_str().unwrap();

    // The volume id (label) edited with cryptsetup: the context no longer matches.
    let c = env.volume("c.vol", "8M", "alias/k", "vol-cccc");
    tool_ok(
        "cryptsetup",
        &[
            "config",
            "--batch-mode",
            "--label",
            "vol-dddd",
            c.to_str().unwrap(),
        ],
    );
    let err = env.fails(&attach_args("export-key", c.to_str().unwrap(), key));
    assert!(err.contains("InvalidCiphertextException"), "{err}");
    assert_failed_decrypt(&env, "InvalidCiphertextException");

    // B's token moved into A: its blob is bound to vol-bbbb, not vol-aaaa.
    let token = env.path("b-token.json");
    tool_ok(
        "cryptsetup",
        &[
            "token",
            "export",
            "--token-id",
            "0",
            "--json-file",
            token.to_str().unwrap(),
            b,
        ],
    );
    tool_ok("cryptsetup", &["token", "remove", "--token-id", "0", a]);
    tool_ok(
        "cryptsetup",
        &["token", "import", "--json-file", token.to_str().unwrap(), a],
    );
    let err = env.fails(&attach_args("export-key", a, key));
    assert!(err.contains("InvalidCiphertextException"), "{err}");
    assert_failed_decrypt(&env, "InvalidCiphertextException");

    // The context stored in B's token edited (its blob is intact): refused
    // after the KMS call, because the token no longer describes the volume.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&token).unwrap()).unwrap();
    json["encryption_context"]["aws:rds:db-id"] = "db-EDITED".into();
    std::fs::write(&token, json.to_string()).unwrap();
    tool_ok("cryptsetup", &["token", "remove", "--token-id", "0", b]);
    tool_ok(
        "cryptsetup",
        &["token", "import", "--json-file", token.to_str().unwrap(), b],
    );
    let err = env.fails(&attach_args("export-key", b, key));
    assert!(err.contains("token") && err.contains("edited"), "{err}");
    assert!(!std::path::Path::new(key).exists());
}

#[test]
fn unknown_key_not_a_volume_truncated_and_bad_sizes() {
    let env = Env::new();
    env.key("alias/k");
    let p = env.path("x.vol");
    let x = p.to_str().unwrap();
    let err = env.fails(&create_args(x, "8M", "alias/nope", VOL));
    assert!(err.contains("NotFoundException"), "{err}");
    assert!(!p.exists(), "a failed create leaves nothing behind");
    assert_eq!(env.last_audit()["errorCode"], "NotFoundException");

    let err = env.fails(&create_args(x, "8000000", "alias/k", VOL));
    assert!(err.contains("multiple of the sector size"), "{err}");
    let mut args = create_args(x, "8M", "alias/k", VOL);
    args[8] = "orders";
    let err = env.fails(&args);
    assert!(err.contains("--db-id"), "{err}");

    let junk = env.path("junk.bin");
    std::fs::write(&junk, random_bytes(1 << 20)).unwrap();
    let err = env.fails(&["volume", "inspect", junk.to_str().unwrap()]);
    assert!(err.contains("not a LUKS"), "{err}");
    let err = env.fails(&create_args(junk.to_str().unwrap(), "8M", "alias/k", VOL));
    assert!(err.contains("--force"), "{err}");
    env.ok(&[
        create_args(junk.to_str().unwrap(), "8M", "alias/k", VOL),
        vec!["--force"],
    ]
    .concat());

    let t = env.volume("t.vol", "8M", "alias/k", VOL);
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len((16 << 20) + (4 << 20)).unwrap();
    let err = env.fails(&["volume", "inspect", t.to_str().unwrap()]);
    assert!(err.to_lowercase().contains("truncated"), "{err}");
}

#[test]
fn asymmetric_disabled_and_deleted_keys_refuse_with_what_to_do() {
    let env = Env::new();
    env.ok(&[
        "kms",
        "create-key",
        "--alias",
        "alias/rsa",
        "--key-spec",
        "RSA_2048",
        "--key-usage",
        "ENCRYPT_DECRYPT",
    ]);
    let p = env.path("r.vol");
    let err = env.fails(&create_args(p.to_str().unwrap(), "8M", "alias/rsa", VOL));
    assert!(
        err.contains("InvalidKeyUsageException")
            && err.contains("symmetric")
            && err.contains("describe-key"),
        "{err}"
    );
    assert!(!p.exists());
    assert_eq!(env.last_audit()["errorCode"], "InvalidKeyUsageException");

    env.key("alias/k");
    let vol = env.volume("d.vol", "8M", "alias/k", VOL);
    let v = vol.to_str().unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "inspect", v, "--json"])).unwrap();
    let arn = info["kms_key_id"].as_str().unwrap().to_owned();
    let key = env.path("k.bin");
    let export_key = || env.run(&attach_args("export-key", v, key.to_str().unwrap()));

    env.ok(&["kms", "disable-key", &arn]);
    let out = export_key();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("DisabledException") && err.contains("enable-key"),
        "{err}"
    );
    assert_failed_decrypt(&env, "DisabledException");
    env.ok(&["kms", "enable-key", &arn]);

    env.ok(&[
        "kms",
        "schedule-key-deletion",
        &arn,
        "--pending-window-in-days",
        "7",
    ]);
    let out = export_key();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KMSInvalidStateException") && err.contains("cancel-key-deletion"),
        "{err}"
    );
    assert_failed_decrypt(&env, "KMSInvalidStateException");
    env.ok(&["kms", "cancel-key-deletion", &arn]);
    let out = export_key();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DisabledException"),
        "cancelling leaves the key disabled, as in AWS"
    );
    env.ok(&["kms", "enable-key", &arn]);
    assert!(export_key().status.success());
    assert!(key.exists());
}

#[test]
fn rekey_rewraps_under_new_material_or_another_cmk_and_keeps_the_data() {
    let env = Env::new();
    env.key("alias/old");
    env.key("alias/new");
    let vol = env.volume("r.vol", "8M", "alias/old", VOL);
    let v = vol.to_str().unwrap();
    let raw = env.path("in.raw");
    std::fs::write(&raw, random_bytes(1 << 20)).unwrap();
    env.ok(&attach_args("import", v, raw.to_str().unwrap()));
    let key_of = |name: &str| {
        let out = env.path(name);
        env.ok(&attach_args("export-key", v, out.to_str().unwrap()));
        std::fs::read(out).unwrap()
    };
    let info = |v: &str| -> serde_json::Value {
        serde_json::from_str(&env.ok(&["volume", "inspect", v, "--json"])).unwrap()
    };
    let before = info(v);
    let vk = key_of("k0");

    env.ok(&[
        "kms",
        "rotate-key-on-demand",
        before["kms_key_id"].as_str().unwrap(),
    ]);
    env.ok(&["volume", "rekey", v, "--db-id", DB]);
    let rotated = info(v);
    assert_eq!(rotated["kms_key_id"], before["kms_key_id"]);
    assert_ne!(
        rotated["metadata"]["tokens"], before["metadata"]["tokens"],
        "a new blob"
    );
    assert_eq!(env.last_audit()["eventName"], "ReEncrypt");

    let err = env.fails(&[
        "volume",
        "rekey",
        v,
        "--db-id",
        "db-OTHER",
        "--kms-key",
        "alias/new",
    ]);
    assert!(err.contains("InvalidCiphertextException"), "{err}");
    env.ok(&[
        "volume",
        "rekey",
        v,
        "--db-id",
        DB,
        "--kms-key",
        "alias/new",
    ]);
    let moved = info(v);
    assert_ne!(moved["kms_key_id"], before["kms_key_id"]);
    assert!(key_of("k1") == vk, "the volume key itself never changes");
    let out = env.path("out.raw");
    env.ok(&attach_args("export", v, out.to_str().unwrap()));
    assert!(std::fs::read(&out).unwrap()[..1 << 20] == std::fs::read(&raw).unwrap()[..]);
    assert!(cryptsetup_dump_ok(v));
}

fn cryptsetup_dump_ok(path: &str) -> bool {
    tool("cryptsetup", &["luksDump", path]).status.success()
}
