//! Offline snapshots and restores through the CLI: what the snapshot file
//! holds (ciphertext only, holes kept, a LUKS2 container cryptsetup reads),
//! which context unlocks it, restores under a new identity, another CMK or a
//! new data key, and every refusal, with nothing half-made left behind.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use common::{
    DB, Env, Mount, attach_args, export_key, inspect, plaintext, random_bytes, s, sha256_file,
    snapshot_args, tool_ok,
};
use serde_json::Value;

const VOL: &str = "vol-ad8c6542";
const SNAP: &str = "snap-0a1b2c3d";
const MIB: usize = 1 << 20;

/// A 32 MiB volume holding random data in [0, 3 MiB) and [20, 21) MiB, the
/// rest holes; returns it and its plaintext.
fn volume_with_data(env: &Env) -> (PathBuf, Vec<u8>) {
    volume_with_data_at(env, "orders.vol")
}

/// The same, at `name` in the environment's folder.
fn volume_with_data_at(env: &Env, name: &str) -> (PathBuf, Vec<u8>) {
    env.key("alias/orders");
    let vol = env.volume(name, "32M", "alias/orders", VOL);
    let mut image = vec![0u8; 32 * MIB];
    image[..3 * MIB].copy_from_slice(&random_bytes(3 * MIB));
    image[20 * MIB..21 * MIB].copy_from_slice(&random_bytes(MIB));
    let raw = env.path("image.raw");
    std::fs::write(&raw, &image).unwrap();
    env.ok(&attach_args("import", s(&vol), s(&raw)));
    (vol, image)
}

fn snapshot(env: &Env, vol: &Path, id: &str, out: &Path) -> Value {
    let mut args = snapshot_args(s(vol), id, s(out)).to_vec();
    args.push("--json");
    let json = env.ok(&args);
    serde_json::from_str(&json).unwrap()
}

fn restore(env: &Env, snap: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let path = env.path(name);
    let mut args = vec![
        "snapshot",
        "restore",
        snap.to_str().unwrap(),
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    env.ok(&args);
    path
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_snapshot_is_ciphertext_copied_as_is_under_its_own_context() {
    let env = Env::new();
    let (vol, image) = volume_with_data(&env);
    let snaps = env.path("snaps");
    std::fs::create_dir(&snaps).unwrap();
    let created = snapshot(&env, &vol, SNAP, &snaps);
    let snap = snaps.join(SNAP);
    assert_eq!(created["path"], snap.to_str().unwrap());
    assert_eq!(created["source_volume"], VOL);
    assert_eq!(created["db_id"], DB);
    assert_eq!(created["size"], 32 * MIB);

    // The data segment is the volume's ciphertext, byte for byte, and holds
    // none of the plaintext; holes stayed holes.
    let (v, s) = (std::fs::read(&vol).unwrap(), std::fs::read(&snap).unwrap());
    assert_eq!(s.len(), v.len());
    assert!(s[16 * MIB..] == v[16 * MIB..], "ciphertext copied as is");
    for at in [0, MIB + 17, 20 * MIB + 4096] {
        assert!(
            !contains(&s, &image[at..at + 32]),
            "plaintext at {at} found in the snapshot"
        );
    }
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert!(
        allocated(&snap) <= allocated(&vol) && allocated(&snap) < 16 * MIB as u64,
        "only the volume's allocated extents take space: {} of {}",
        allocated(&snap),
        allocated(&vol)
    );

    // A LUKS2 container cryptsetup reads, labelled with the snapshot id.
    let dump = tool_ok("cryptsetup", &["luksDump", snap.to_str().unwrap()]);
    for want in [SNAP, "aes-xts-plain64", "nbdcrypt-kms", "nbdcrypt-snapshot"] {
        assert!(dump.contains(want), "{want} missing from luksDump:\n{dump}");
    }

    // The wrapped key opens under the snapshot's context only, and is the
    // volume's key.
    let info = inspect(&env, &snap);
    assert_eq!(info["volume_id"], SNAP);
    assert_eq!(info["encryption_context"]["aws:ebs:id"], SNAP);
    assert_eq!(info["encryption_context"]["aws:rds:db-id"], DB);
    assert_eq!(info["kms_key_id"], inspect(&env, &vol)["kms_key_id"]);
    let token = info["metadata"]["tokens"]
        .as_object()
        .unwrap()
        .values()
        .find(|t| t["type"] == "nbdcrypt-kms")
        .unwrap();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(token["ciphertext_blob"].as_str().unwrap())
        .unwrap();
    let blob_file = env.path("blob.bin");
    std::fs::write(&blob_file, blob).unwrap();
    let decrypt = |ebs: &str, out: &str| {
        env.run(&[
            "kms",
            "decrypt",
            "--ciphertext-file",
            blob_file.to_str().unwrap(),
            "-c",
            &format!("aws:rds:db-id={DB}"),
            "-c",
            &format!("aws:ebs:id={ebs}"),
            "--plaintext-out",
            env.path(out).to_str().unwrap(),
        ])
    };
    let refused = decrypt(VOL, "as-volume.key");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("InvalidCiphertextException"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(decrypt(SNAP, "as-snapshot.key").status.success());
    assert_eq!(
        std::fs::read(env.path("as-snapshot.key")).unwrap(),
        export_key(&env, &vol, DB, "volume.key")
    );
    // cryptsetup checks that key against the snapshot's own digest (on a
    // copy: adding a keyslot writes the header).
    let copy = env.path("snap-copy");
    std::fs::copy(&snap, &copy).unwrap();
    let pass = env.path("pass.txt");
    std::fs::write(&pass, "recovery passphrase").unwrap();
    tool_ok(
        "cryptsetup",
        &[
            "luksAddKey",
            "--batch-mode",
            "--key-size",
            "512",
            "--volume-key-file",
            env.path("as-snapshot.key").to_str().unwrap(),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            copy.to_str().unwrap(),
            pass.to_str().unwrap(),
        ],
    );

    // The listing.
    let list: Value =
        serde_json::from_str(&env.ok(&["snapshot", "list", snaps.to_str().unwrap(), "--json"]))
            .unwrap();
    let entries = list["snapshots"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    let e = &entries[0];
    assert_eq!(e["snapshot_id"], SNAP);
    assert_eq!(e["source_volume"], VOL);
    assert_eq!(e["db_id"], DB);
    assert_eq!(e["size"], 32 * MIB);
    assert_eq!(e["kms_key_id"], info["kms_key_id"]);
    assert!(e["created"].as_str().unwrap().ends_with('Z'), "{e}");
    let human = env.ok(&["snapshot", "list", snaps.to_str().unwrap()]);
    assert!(human.contains(SNAP) && human.contains(VOL) && human.contains(DB));
}

#[test]
fn restore_binds_the_copy_to_a_new_identity() {
    let env = Env::new();
    let (vol, image) = volume_with_data(&env);
    snapshot(&env, &vol, SNAP, env.dir.path());
    let snap = env.path(SNAP);
    const NEW_DB: &str = "db-NEWINSTANCE1";

    let restored = restore(
        &env,
        &snap,
        "restored.vol",
        &["--db-id", NEW_DB, "--vol-id", "vol-0000new1"],
    );
    let info = inspect(&env, &restored);
    assert_eq!(info["volume_id"], "vol-0000new1");
    assert_eq!(info["encryption_context"]["aws:rds:db-id"], NEW_DB);
    assert!(plaintext(&env, &restored, NEW_DB, "restored.raw") == image);
    // Re-wrapped, not replaced: the same volume key.
    assert_eq!(
        export_key(&env, &restored, NEW_DB, "restored.key"),
        export_key(&env, &vol, DB, "source.key")
    );
    // The old DB instance cannot open it.
    let old = env.path("old.raw");
    let err = env.fails(&attach_args("export", s(&restored), s(&old)));
    assert!(err.contains("InvalidCiphertextException"), "{err}");

    // Under another CMK.
    env.key("alias/other");
    let other: Value =
        serde_json::from_str(&env.ok(&["kms", "describe-key", "alias/other", "--json"])).unwrap();
    let moved = restore(
        &env,
        &snap,
        "moved.vol",
        &[
            "--db-id",
            NEW_DB,
            "--vol-id",
            "vol-0000new2",
            "--kms-key",
            "alias/other",
        ],
    );
    assert_eq!(
        inspect(&env, &moved)["kms_key_id"],
        other["KeyMetadata"]["Arn"]
    );
    assert!(plaintext(&env, &moved, NEW_DB, "moved.raw") == image);
    let reencrypt = env
        .audit()
        .into_iter()
        .rev()
        .find(|r| r["eventName"] == "ReEncrypt")
        .expect("a ReEncrypt record");
    assert_eq!(
        reencrypt["requestParameters"]["destinationEncryptionContext"]["aws:ebs:id"],
        "vol-0000new2",
        "{reencrypt}"
    );
}

#[test]
fn a_new_data_key_re_encrypts_every_sector() {
    let env = Env::new();
    let (vol, image) = volume_with_data(&env);
    snapshot(&env, &vol, SNAP, env.dir.path());
    let out: Value = serde_json::from_str(&env.ok(&[
        "snapshot",
        "restore",
        env.path(SNAP).to_str().unwrap(),
        env.path("fresh.vol").to_str().unwrap(),
        "--db-id",
        "db-FRESH1",
        "--vol-id",
        "vol-fresh1",
        "--new-data-key",
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["new_data_key"], true);
    let fresh = env.path("fresh.vol");
    assert!(plaintext(&env, &fresh, "db-FRESH1", "fresh.raw") == image);
    assert_ne!(
        export_key(&env, &fresh, "db-FRESH1", "fresh.key"),
        export_key(&env, &vol, DB, "source.key")
    );
    let (v, f) = (std::fs::read(&vol).unwrap(), std::fs::read(&fresh).unwrap());
    assert!(v[16 * MIB..17 * MIB] != f[16 * MIB..17 * MIB]);
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert!(
        allocated(&fresh) <= allocated(&vol),
        "holes kept: {} of {}",
        allocated(&fresh),
        allocated(&vol)
    );
}

/// Runs a failing `snapshot create` and checks the common promises: one
/// clear line, the volume untouched, nothing left in `out` but `keep`.
fn refused(env: &Env, vol: &Path, id: &str, out: &Path, keep: &[&str], reason: &str) {
    let before = sha256_file(vol);
    let err = env.fails(&snapshot_args(s(vol), id, s(out)));
    assert!(err.contains(reason), "expected {reason:?} in {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert_eq!(sha256_file(vol), before, "the volume is untouched");
    if let Ok(entries) = std::fs::read_dir(out) {
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, keep, "only {keep:?} in {}", out.display());
    }
}

#[test]
fn refusals_are_clear_and_leave_nothing_that_looks_complete() {
    let env = Env::new();
    let (vol, _) = volume_with_data(&env);
    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();
    snapshot(&env, &vol, SNAP, &out);

    refused(&env, &vol, SNAP, &out, &[SNAP], "exists already");
    refused(&env, &vol, "snapshot1", &out, &[SNAP], "not valid");
    refused(
        &env,
        &vol,
        "snap-2",
        &env.path("missing"),
        &[],
        "No such file",
    );
    let ro = Mount::tmpfs(&env, "ro", "1M", true);
    refused(&env, &vol, "snap-3", &ro.dir, &[], "Read-only file system");
    // 4 MiB of data does not fit in 2 MiB: out of space during the copy.
    let small = Mount::tmpfs(&env, "small", "2M", false);
    refused(&env, &vol, "snap-4", &small.dir, &[], "no space left");
    // A leftover of a killed attempt is named, not overwritten.
    std::fs::write(out.join(".snap-5.partial"), b"").unwrap();
    refused(
        &env,
        &vol,
        "snap-5",
        &out,
        &[".snap-5.partial", SNAP],
        "earlier attempt",
    );
    // Restores refuse to overwrite, and refuse what is not a snapshot.
    let err = env.fails(&[
        "snapshot",
        "restore",
        out.join(SNAP).to_str().unwrap(),
        vol.to_str().unwrap(),
        "--db-id",
        DB,
        "--vol-id",
        "vol-x1",
    ]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    let err = env.fails(&[
        "snapshot",
        "restore",
        vol.to_str().unwrap(),
        env.path("x.vol").to_str().unwrap(),
        "--db-id",
        DB,
        "--vol-id",
        "vol-x1",
    ]);
    assert!(err.contains("not a snapshot"), "{err}");
    assert!(!env.path("x.vol").exists() && !env.path(".x.vol.partial").exists());
}

#[test]
fn on_xfs_snapshots_and_restores_share_blocks_instead_of_copying() {
    let env = Env::new();
    let xfs = Mount::xfs(&env, "xfs");
    let (vol, image) = volume_with_data_at(&env, "xfs/orders.vol");
    let created = snapshot(&env, &vol, SNAP, &xfs.dir);
    assert_eq!(created["bytes_copied"], 0, "{created}");
    assert!(
        created["bytes_reflinked"].as_u64().unwrap() >= 4 * MIB as u64,
        "{created}"
    );
    let snap = xfs.dir.join(SNAP);
    let extents = tool_ok("filefrag", &["-v", snap.to_str().unwrap()]);
    assert!(extents.contains("shared"), "{extents}");

    let restored = restore(
        &env,
        &snap,
        "xfs/restored.vol",
        &["--db-id", "db-XFS1", "--vol-id", "vol-xfs1"],
    );
    assert!(plaintext(&env, &restored, "db-XFS1", "restored.raw") == image);
    // Writing the volume afterwards leaves the snapshot as it was.
    let before = sha256_file(&snap);
    let raw = env.path("other.raw");
    std::fs::write(&raw, random_bytes(4 * MIB)).unwrap();
    env.ok(&attach_args("import", s(&vol), s(&raw)));
    assert_eq!(sha256_file(&snap), before);
}

#[test]
fn every_snapshot_command_has_help() {
    let env = Env::new();
    for args in [
        &["snapshot", "--help"][..],
        &["snapshot", "create", "--help"],
        &["snapshot", "list", "--help"],
        &["snapshot", "restore", "--help"],
        &["admin", "--help"],
        &["serve", "--help"],
    ] {
        let out = env.ok(args);
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
    assert!(
        env.ok(&["snapshot", "restore", "--help"])
            .contains("--new-data-key")
    );
    assert!(env.ok(&["serve", "--help"]).contains("--control"));
}
