//! A crash (kill -9) in the middle of key-store updates must leave a store
//! that opens, lists every key it kept, and decrypts everything those keys
//! made; the audit chain must still verify.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::kms::Kms;
use common::s;

/// xorshift64: kill moments vary between runs without a dependency.
struct Moments(u64);

impl Moments {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Self(nanos | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Spawns `kms args` and SIGKILLs it after `ms` milliseconds; true if the
/// kill landed before the process finished.
fn kill_after(kms: &Kms, args: &[&str], ms: u64) -> bool {
    let mut child = kms
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let landed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    child.wait().unwrap();
    landed
}

#[test]
fn kill_9_during_key_store_updates_leaves_a_usable_store() {
    let kms = Kms::new();
    let mut moments = Moments::new();
    let first = kms.create_key(&["--alias", "alias/first"]);
    let msg = kms.write("msg", b"made before the crashes");
    kms.ok(&[
        "encrypt",
        &first,
        "--plaintext-file",
        s(&msg),
        "--out",
        "first.blob",
    ]);
    std::fs::create_dir(kms.path("blobs")).unwrap();

    let mut landed = 0;
    for i in 0..45u32 {
        let alias = format!("alias/k{i}");
        let older = format!("alias/k{}", i.saturating_sub(2));
        let blob = format!("blobs/k{}.blob", i.saturating_sub(2));
        let args: Vec<&str> = match i % 3 {
            0 => vec!["create-key", "--alias", &alias],
            1 => vec!["rotate-key-on-demand", &first],
            _ => vec![
                "encrypt",
                &older,
                "--plaintext-file",
                s(&msg),
                "--out",
                &blob,
            ],
        };
        if kill_after(&kms, &args, moments.below(16)) {
            landed += 1;
        }
    }
    eprintln!("{landed} of 45 processes were killed before they finished");

    // The store opens and every key it lists works.
    let keys = kms.json(&["list-keys"]);
    let keys = keys["Keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for (n, k) in keys.iter().enumerate() {
        let id = k["KeyId"].as_str().unwrap();
        let out = format!("rt{n}.blob");
        kms.ok(&["encrypt", id, "--plaintext-file", s(&msg), "--out", &out]);
        kms.ok(&[
            "decrypt",
            "--ciphertext-file",
            &out,
            "--plaintext-out",
            &format!("rt{n}.out"),
        ]);
        assert_eq!(kms.read(&format!("rt{n}.out")), b"made before the crashes");
    }
    // Every blob that was completely written decrypts, including the one
    // made before the first key's material was rotated under the kills.
    let mut blobs = vec!["first.blob".to_owned()];
    for entry in std::fs::read_dir(kms.path("blobs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".blob") {
            blobs.push(format!("blobs/{name}"));
        }
    }
    for (n, blob) in blobs.iter().enumerate() {
        let out = format!("b{n}.out");
        kms.ok(&[
            "decrypt",
            "--ciphertext-file",
            blob,
            "--plaintext-out",
            &out,
        ]);
        assert_eq!(kms.read(&out), b"made before the crashes", "{blob}");
    }
    // No key the aliases name is missing, and the audit chain holds.
    for a in kms.json(&["list-aliases"])["Aliases"].as_array().unwrap() {
        kms.ok(&["describe-key", a["TargetKeyId"].as_str().unwrap()]);
    }
    kms.ok(&["audit", "verify"]);
}

#[test]
fn kill_9_while_a_new_kms_directory_is_made() {
    let mut moments = Moments::new();
    for _ in 0..8 {
        let kms = Kms::new();
        kill_after(&kms, &["create-key"], moments.below(12));
        let listed = kms.json(&["list-keys"]);
        assert!(listed["Keys"].as_array().unwrap().len() <= 1);
        kms.create_key(&[]);
        kms.ok(&["audit", "verify"]);
    }
}
