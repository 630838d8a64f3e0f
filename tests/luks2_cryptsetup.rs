//! Our LUKS2 headers against the real cryptsetup (userspace operations only:
//! no dm-crypt needed): cryptsetup reads what we write, accepts our digest,
//! adds a passphrase keyslot we then keep; and we refuse what cryptsetup
//! makes without our token.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nbdcrypt::secret::SecretBytes;
use nbdcrypt::volume::luks2::{DEFAULT_DATA_OFFSET, FormatParams, Header, HeaderError, KmsToken};

const DATA_SIZE: u64 = 8 << 20;
/// Keeps cryptsetup's keyslot PBKDF fast: these tests check formats, not strength.
const FAST_PBKDF: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

/// cryptsetup, or None (after saying why) when it is not installed.
fn cryptsetup() -> Option<()> {
    match Command::new("cryptsetup").arg("--version").output() {
        Ok(out) if out.status.success() => Some(()),
        _ => {
            eprintln!(
                "SKIPPED: cryptsetup is not installed (Debian: apt-get install cryptsetup-bin)"
            );
            None
        }
    }
}

fn run(args: &[&str]) -> Output {
    let out = Command::new("cryptsetup")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cryptsetup runs");
    eprintln!(
        "cryptsetup {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A file only its owner reads, like any key file.
fn secret_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    f.write_all(bytes).unwrap();
    p
}

fn token() -> KmsToken {
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
        ciphertext_blob: (0..=255).collect(),
    }
}

/// A sparse volume file with our header, and its key.
fn volume(dir: &Path, sector_size: u32) -> (PathBuf, Header, SecretBytes) {
    let key = SecretBytes::random(64);
    let params = FormatParams {
        uuid: uuid::Uuid::new_v4(),
        label: "vol-ad8c6542".into(),
        sector_size,
        data_offset: DEFAULT_DATA_OFFSET,
        data_size: DATA_SIZE,
    };
    let mut header = Header::format(&params, &key, &token()).unwrap();
    let p = dir.join(format!("volume-{sector_size}.img"));
    let file = File::create_new(&p).unwrap();
    file.set_len(DEFAULT_DATA_OFFSET + DATA_SIZE).unwrap();
    header.write_to(&file).unwrap();
    (p, header, key)
}

fn open(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn cryptsetup_dumps_our_header() {
    let Some(()) = cryptsetup() else { return };
    let dir = tempfile::tempdir().unwrap();
    for sector_size in [4096, 512] {
        let (vol, header, _) = volume(dir.path(), sector_size);
        let out = run(&["luksDump", path(&vol)]);
        assert!(out.status.success());
        let dump = String::from_utf8(out.stdout).unwrap();
        for expected in [
            "Version:       \t2".to_string(),
            format!("UUID:          \t{}", header.uuid()),
            "Label:         \tvol-ad8c6542".into(),
            "Subsystem:     \tnbdcrypt".into(),
            "Metadata area: \t16384 [bytes]".into(),
            format!("offset: {DEFAULT_DATA_OFFSET} [bytes]"),
            format!("length: {DATA_SIZE} [bytes]"),
            "cipher: aes-xts-plain64".into(),
            format!("sector: {sector_size} [bytes]"),
            "  0: nbdcrypt-kms".into(),
            "Iterations: 100000".into(),
        ] {
            assert!(
                dump.contains(&expected),
                "{expected:?} missing from:\n{dump}"
            );
        }

        // cryptsetup parses the very metadata we hold.
        let out = run(&["luksDump", "--dump-json-metadata", path(&vol)]);
        assert!(out.status.success());
        let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(&theirs, header.metadata());

        // Our secondary copy alone satisfies cryptsetup, and its repair of
        // the primary satisfies us.
        let file = open(&vol);
        std::os::unix::fs::FileExt::write_all_at(&file, b"XXXX", 0).unwrap();
        assert!(Header::read_from(&file).unwrap().damage().is_some());
        assert!(run(&["luksDump", path(&vol)]).status.success());
        assert!(
            run(&["repair", "--batch-mode", path(&vol)])
                .status
                .success()
        );
        let repaired = Header::read_from(&file).unwrap();
        assert_eq!(repaired.damage(), None);
        assert_eq!(repaired.metadata(), header.metadata());
    }
}

#[test]
fn cryptsetup_adds_a_keyslot_with_our_key_and_we_keep_it() {
    let Some(()) = cryptsetup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (vol, _, key) = volume(dir.path(), 4096);
    let key_file = secret_file(dir.path(), "volume.key", key.expose());
    let wrong_file = secret_file(dir.path(), "wrong.key", SecretBytes::random(64).expose());
    let pass_file = secret_file(dir.path(), "passphrase", b"correct horse battery staple");
    let add_key = |vk: &Path| {
        let mut args = vec![
            "luksAddKey",
            "--batch-mode",
            "--key-size",
            "512",
            "--volume-key-file",
            path(vk),
        ];
        args.extend(FAST_PBKDF);
        args.extend([path(&vol), path(&pass_file)]);
        run(&args)
    };

    // Our digest is the one cryptsetup checks: a wrong key is refused...
    let out = add_key(&wrong_file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));
    assert_eq!(
        Header::read_from(&open(&vol)).unwrap().metadata()["keyslots"],
        serde_json::json!({})
    );
    // ...and the right one accepted.
    assert!(add_key(&key_file).status.success());

    // We still read the header, keep the keyslot, and our token is intact.
    let file = open(&vol);
    let mut header = Header::read_from(&file).unwrap();
    assert_eq!(header.damage(), None);
    assert_eq!(header.metadata()["keyslots"]["0"]["type"], "luks2");
    assert_eq!(
        header.metadata()["digests"]["0"]["keyslots"],
        serde_json::json!(["0"])
    );
    assert_eq!(header.kms_token().unwrap(), token());
    header.verify_volume_key(&key).unwrap();

    // Our own update (a re-wrapped key) keeps the keyslot usable.
    let mut rewrapped = token();
    rewrapped.ciphertext_blob = vec![42; 300];
    header.set_kms_token(&rewrapped);
    header.write_to(&file).unwrap();
    let out = run(&["luksDump", path(&vol)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Keyslots:\n  0: luks2"));

    // The passphrase gives back the very key (the recovery path).
    let dumped = dir.path().join("dumped.key");
    let out = run(&[
        "luksDump",
        "--dump-volume-key",
        "--batch-mode",
        "--key-file",
        path(&pass_file),
        "--volume-key-file",
        path(&dumped),
        path(&vol),
    ]);
    assert!(out.status.success());
    assert_eq!(std::fs::read(&dumped).unwrap(), key.expose());
    let reread = Header::read_from(&open(&vol)).unwrap();
    assert_eq!(reread.kms_token().unwrap(), rewrapped);
}

#[test]
fn headers_made_by_cryptsetup_are_refused() {
    let Some(()) = cryptsetup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pass_file = secret_file(dir.path(), "passphrase", b"pw");
    for (kind, check) in [
        (
            "luks2",
            (|e| matches!(e, HeaderError::NoKmsToken)) as fn(&HeaderError) -> bool,
        ),
        ("luks1", |e| matches!(e, HeaderError::UnsupportedVersion(1))),
    ] {
        let vol = dir.path().join(format!("{kind}.img"));
        File::create_new(&vol)
            .unwrap()
            .set_len(DEFAULT_DATA_OFFSET + DATA_SIZE)
            .unwrap();
        let mut args = vec![
            "luksFormat",
            "--type",
            kind,
            "--batch-mode",
            "--key-file",
            path(&pass_file),
        ];
        args.extend(if kind == "luks2" {
            &FAST_PBKDF[..]
        } else {
            &FAST_PBKDF[2..]
        });
        args.push(path(&vol));
        assert!(run(&args).status.success());
        let err = Header::read_from(&open(&vol)).unwrap_err();
        assert!(check(&err), "{kind}: {err:?}");
        eprintln!("{kind}: {err}");
    }
}

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", path(file)])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: losetup cannot attach a loop device: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Loop(
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn headers_on_block_devices() {
    let Some(()) = cryptsetup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (vol, header, key) = volume(dir.path(), 4096);
    let Some(dev) = Loop::attach(&vol) else {
        return;
    };
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev.0)
        .unwrap();
    assert_eq!(
        nbdcrypt::volume::device_size(&device).unwrap(),
        DEFAULT_DATA_OFFSET + DATA_SIZE
    );
    let mut read = Header::read_from(&device).unwrap();
    assert_eq!(read.metadata(), header.metadata());
    read.verify_volume_key(&key).unwrap();
    read.write_to(&device).unwrap();
    assert!(run(&["luksDump", &dev.0]).status.success());
    drop((device, dev));

    // A device shorter than the volume it holds.
    File::options()
        .write(true)
        .open(&vol)
        .unwrap()
        .set_len(DEFAULT_DATA_OFFSET + DATA_SIZE / 2)
        .unwrap();
    let Some(dev) = Loop::attach(&vol) else {
        return;
    };
    let device = File::open(&dev.0).unwrap();
    assert!(matches!(
        Header::read_from(&device),
        Err(HeaderError::Truncated { .. })
    ));
}
