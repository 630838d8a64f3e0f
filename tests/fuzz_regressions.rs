//! Replays every seed in `fuzz/corpus/<target>/` and every input a fuzzer
//! once crashed on in `fuzz/regressions/<target>/` through the fuzz
//! targets' own entry points (`fuzz/src/lib.rs`, included here), so they
//! run in every test run without cargo-fuzz or a nightly compiler.
//!
//! The seeds are made by the code itself:
//! `cargo test --test fuzz_regressions -- --ignored write_seed_corpus`
//! rewrites them (after a format change, say).

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)] // the replay uses the entry points, not every helper
mod targets;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nbdcrypt::kms::{CreateKeyRequest, EncryptionContext, KeySpec, Kms, LocalKms};
use nbdcrypt::nbd::proto::transmission::RequestHeader;
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags, IHAVEOPT, InfoType, OptionCode};
use nbdcrypt::secret::SecretBytes;
use nbdcrypt::volume::luks2::{FormatParams, Header, KmsToken};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_corpus_and_regression_input_replays_cleanly() {
    let mut replayed = 0;
    let mut failed = Vec::new();
    for folder in ["corpus", "regressions"] {
        for (target, run) in targets::TARGETS {
            let dir = fuzz_dir().join(folder).join(target);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    failed.push(path.display().to_string());
                }
                replayed += 1;
            }
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:#?}");
    let seeds = fs::read_dir(fuzz_dir().join("corpus")).unwrap().count();
    assert_eq!(seeds, targets::TARGETS.len(), "a seed corpus per target");
    assert!(
        replayed >= 2 * targets::TARGETS.len(),
        "only {replayed} inputs"
    );
}

fn option(out: &mut Vec<u8>, code: OptionCode, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn sized(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn request(out: &mut Vec<u8>, command: Command, flags: CommandFlags, offset: u64, length: u32) {
    let header = RequestHeader {
        flags,
        command,
        cookie: out.len() as u64,
        offset,
        length,
    };
    out.extend_from_slice(&header.encode());
    if command == Command::WRITE {
        out.extend((0..length).map(|i| i as u8));
    }
}

/// A session's worth of requests: every command, aligned and not, with
/// the flags each accepts.
fn requests() -> Vec<u8> {
    let mut out = Vec::new();
    request(&mut out, Command::WRITE, CommandFlags::FUA, 1000, 700);
    request(&mut out, Command::READ, CommandFlags::DF, 900, 1000);
    request(
        &mut out,
        Command::BLOCK_STATUS,
        CommandFlags::REQ_ONE,
        0,
        8192,
    );
    request(
        &mut out,
        Command::BLOCK_STATUS,
        CommandFlags::EMPTY,
        0,
        1 << 16,
    );
    request(
        &mut out,
        Command::WRITE_ZEROES,
        CommandFlags::NO_HOLE,
        512,
        4096,
    );
    request(&mut out, Command::TRIM, CommandFlags::EMPTY, 4096, 4096);
    request(&mut out, Command::CACHE, CommandFlags::EMPTY, 0, 4096);
    request(&mut out, Command::FLUSH, CommandFlags::EMPTY, 0, 0);
    request(
        &mut out,
        Command::READ,
        CommandFlags::EMPTY,
        (1 << 16) - 1,
        2,
    );
    request(&mut out, Command::DISC, CommandFlags::EMPTY, 0, 0);
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// Rewrites `fuzz/corpus/`: small valid inputs of every target, made by the
/// code itself where it can make them.
#[test]
#[ignore = "writes the seed corpora into the source tree; run by hand"]
fn write_seed_corpus() {
    // The handshake: structured replies, base:allocation and GO, then
    // requests; the old-style EXPORT_NAME; LIST, INFO and ABORT.
    let mut go = 3u32.to_be_bytes().to_vec();
    option(&mut go, OptionCode::STRUCTURED_REPLY, &[]);
    let mut meta = sized("disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&sized("base:allocation"));
    option(&mut go, OptionCode::LIST_META_CONTEXT, &meta);
    option(&mut go, OptionCode::SET_META_CONTEXT, &meta);
    let mut export = sized("disk");
    export.extend_from_slice(&2u16.to_be_bytes());
    export.extend_from_slice(&InfoType::NAME.0.to_be_bytes());
    export.extend_from_slice(&InfoType::BLOCK_SIZE.0.to_be_bytes());
    option(&mut go, OptionCode::GO, &export);
    go.extend_from_slice(&requests());
    write("nbd_handshake", "go-structured", &go);

    let mut old = 1u32.to_be_bytes().to_vec();
    option(&mut old, OptionCode::LIST, &[]);
    let mut info = sized("ro");
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&InfoType::DESCRIPTION.0.to_be_bytes());
    option(&mut old, OptionCode::INFO, &info);
    option(&mut old, OptionCode::STARTTLS, &[]);
    option(&mut old, OptionCode::EXPORT_NAME, b"ro");
    request(&mut old, Command::READ, CommandFlags::EMPTY, 0, 512);
    request(&mut old, Command::WRITE, CommandFlags::EMPTY, 0, 3);
    write("nbd_handshake", "export-name", &old);

    let mut abort = 3u32.to_be_bytes().to_vec();
    option(&mut abort, OptionCode(42), b"unknown");
    option(&mut abort, OptionCode::ABORT, &[]);
    write("nbd_handshake", "abort", &abort);

    // Transmission: each session shape with the same requests.
    for shape in [0u8, 1, 3, 4, 8, 11, 0x73] {
        let mut input = vec![shape];
        input.extend_from_slice(&requests());
        write("nbd_transmission", &format!("shape-{shape:02x}"), &input);
    }

    // A LUKS2 header as `volume create` writes it, both copies; the file
    // grows to 64 MiB (bit 2) so that its data segment fits.
    let key = SecretBytes::random(64);
    let token = KmsToken {
        key_id: "arn:aws:kms:local-1:000000000000:key/00000000-0000-4000-8000-000000000000".into(),
        encryption_context: EncryptionContext::for_volume("db-SEED", "vol-seed")
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ciphertext_blob: vec![1; 49 + 64],
    };
    for (sector_size, data_size) in [(4096u32, 1u64 << 20), (512, 3 * 512)] {
        let params = FormatParams {
            uuid: uuid::Uuid::new_v4(),
            label: "vol-seed".into(),
            sector_size,
            data_offset: 16 << 20,
            data_size,
        };
        let mut header = Header::format(&params, &key, &token).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 << 20).unwrap();
        header.write_to(&file).unwrap();
        let mut image = vec![0u8; 32 << 10];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut image, 0).unwrap();
        let mut input = vec![4u8];
        input.extend_from_slice(&image);
        write("luks2_header", &format!("volume-{sector_size}"), &input);
    }

    // KMS blobs and a key store, made by the local KMS under the targets'
    // root key.
    let dir = tempfile::tempdir().unwrap();
    let kms_dir = dir.path().join("kms");
    let root = dir.path().join("root.key");
    fs::write(&root, targets::ROOT_KEY).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o600)).unwrap();
    let kms = LocalKms::open_with_root_key(&kms_dir, Some(&root)).unwrap();
    let key = kms
        .create_key(&CreateKeyRequest {
            description: "seed".into(),
            key_spec: KeySpec::SymmetricDefault,
            key_usage: None,
        })
        .unwrap();
    kms.create_alias("alias/seed", &key.key_id).unwrap();
    kms.rotate_key_on_demand(&key.key_id).unwrap();
    for len in [32, 64] {
        let data_key = kms
            .generate_data_key(&key.key_id, &targets::blob_context(), len)
            .unwrap();
        write(
            "kms_blob",
            &format!("blob-{len}"),
            &data_key.ciphertext_blob,
        );
    }
    let store = fs::read(kms_dir.join("keystore")).unwrap();
    let root_key = SecretBytes::copy_from(&targets::ROOT_KEY);
    assert_eq!(
        nbdcrypt::kms::parse::key_store(&store, &root_key).unwrap(),
        2
    );
    let mut raw = vec![0u8];
    raw.extend_from_slice(&store);
    write("kms_store", "store", &raw);
    let body = &store[store.iter().position(|&b| b == b'\n').unwrap() + 1..];
    let mut framed = vec![1u8];
    framed.extend_from_slice(body);
    write("kms_store", "store-body", &framed);
}
