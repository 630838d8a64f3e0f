//! The NBD server against real clients: libnbd's nbdinfo and nbdcopy,
//! qemu-img and qemu-io, fio's nbd engine. Each test serves real encrypted
//! volumes, made under a local KMS in a temporary directory.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::nbd::{Attach, TestKms, TestServer, TestVolume, export, run, run_ok};
use common::{random_bytes, sha256_file};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The volumes behind the exports, to check what clients wrote.
struct Volumes {
    disk: Arc<TestVolume>,
    notrim: Arc<TestVolume>,
    ro: Arc<TestVolume>,
}

/// A server with a writable 4096-byte-sector export that punches holes
/// ("disk", the default), a writable 512-byte-sector export that does not
/// ("notrim"), and a read-only one ("ro").
fn server() -> (TestServer, Volumes) {
    let dir = tempfile::tempdir().unwrap();
    let kms = TestKms::new(dir.path());
    let volumes = Volumes {
        disk: Arc::new(kms.volume("disk", 64 * MIB, 4096, Attach::AllowDiscards)),
        notrim: Arc::new(kms.volume("notrim", 8 * MIB, 512, Attach::ReadWrite)),
        ro: Arc::new(kms.volume("ro", 4 * MIB, 512, Attach::ReadOnly)),
    };
    let exports = vec![
        export("disk", volumes.disk.clone(), false),
        export("notrim", volumes.notrim.clone(), false),
        export("ro", volumes.ro.clone(), true),
    ];
    (TestServer::start(dir, exports), volumes)
}

fn nbdinfo_json(uri: &str) -> Value {
    let out = run_ok(Command::new("nbdinfo").args(["--json", uri]));
    let info: Value = serde_json::from_str(&out).unwrap();
    let exports = info["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["structured"], true);
    exports[0].clone()
}

#[test]
fn nbdinfo_reports_flags_sizes_block_sizes_and_contexts() {
    let (server, _) = server();
    let disk = nbdinfo_json(&server.uri(""));
    assert_eq!(
        disk["export-name"], "disk",
        "the default export is the first, by its name"
    );
    assert_eq!(disk["description"], "disk for tests");
    assert_eq!(disk["export-size"], 64 * MIB);
    assert_eq!(disk["contexts"], serde_json::json!(["base:allocation"]));
    for flag in [
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(disk[flag], true, "{flag}");
    }
    assert_eq!(disk["is_read_only"], false);
    assert_eq!(disk["is_rotational"], false);
    assert_eq!(disk["block_size_minimum"], 1);
    assert_eq!(disk["block_size_preferred"], 4096);
    assert_eq!(disk["block_size_maximum"], 32 * MIB);

    let notrim = nbdinfo_json(&server.uri("notrim"));
    assert_eq!(notrim["export-size"], 8 * MIB);
    assert_eq!(notrim["can_trim"], false);
    assert_eq!(notrim["can_zero"], true);
    assert_eq!(notrim["block_size_preferred"], 512);

    let ro = nbdinfo_json(&server.uri("ro"));
    assert_eq!(ro["is_read_only"], true);
    for flag in ["can_fua", "can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(ro[flag], false, "{flag}");
    }
    assert_eq!(ro["can_multi_conn"], true);

    let missing = run(Command::new("nbdinfo").arg(server.uri("missing")));
    assert!(!missing.status.success());
    server.stop().unwrap();
}

#[test]
fn nbdinfo_lists_every_export() {
    let (server, _) = server();
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &server.uri("")]));
    let list: Value = serde_json::from_str(&out).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "notrim", "ro"]);
    assert_eq!(exports[2]["description"], "ro for tests");
    assert_eq!(exports[2]["is_read_only"], true);
}

#[test]
fn nbdcopy_in_and_out_and_qemu_img_compare() {
    let (server, volumes) = server();
    let dir = server.dir.path();
    let source = dir.join("source.img");
    let data = random_bytes(64 * MIB as usize);
    std::fs::write(&source, &data).unwrap();
    let uri = server.uri("disk");
    run_ok(Command::new("nbdcopy").arg(&source).arg(&uri));
    let back = dir.join("back.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_eq!(sha256_file(&source), sha256_file(&back));
    // Into a pipe, nbdcopy sends one request at a time (a block status, a
    // read), each the moment the last reply is in: the server waits for
    // them on the CPU (`busy_poll`).
    let piped = run(Command::new("nbdcopy").arg(&uri).arg("-"));
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "nbdcopy to a pipe failed: {stderr}");
    assert!(piped.stdout == data, "the pipe got the volume's data");
    assert!(
        volumes.disk.plaintext() == data,
        "the volume holds what was copied"
    );
    let stored = volumes.disk.stored();
    assert!(
        stored
            .chunks(4096)
            .zip(data.chunks(4096))
            .all(|(c, p)| c != p),
        "no sector is stored in the clear"
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&uri),
    );

    // A changed byte is noticed.
    let mut changed = data;
    changed[12_345_678] ^= 1;
    std::fs::write(&source, changed).unwrap();
    let differs = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&uri));
    assert_eq!(
        differs.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&differs.stdout)
    );
    server.stop().unwrap();
}

/// Runs qemu-io commands against `uri`; fails on any error or pattern
/// mismatch it reports.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let out = run_ok(command.arg(uri));
    for bad in ["fail", "error", "Error", "mismatch"] {
        assert!(!out.contains(bad), "qemu-io reported a problem:\n{out}");
    }
    out
}

#[test]
fn qemu_io_aligned_and_unaligned_reads_and_writes() {
    let (server, volumes) = server();
    let uri = server.uri("notrim");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Unaligned, across sector and page boundaries.
            "write -P 0xcd 1000 3333",
            "read -P 0xcd 1000 3333",
            "read -P 0xab 0 1000",
            "read -P 0xab 4333 4000",
            "write -P 0x01 65535 2",
            "read -P 0x01 65535 2",
            "read -P 0xab 65534 1",
            "read -P 0 65537 511",
            // The last bytes of the export.
            "write -P 0xee 8388601 7",
            "read -P 0xee 8388601 7",
            "aio_write -P 0x55 1048576 128k",
            "aio_write -P 0x66 1179648 128k",
            "aio_flush",
            "read -P 0x55 1048576 128k",
            "read -P 0x66 1179648 128k",
            "flush",
        ],
    );
    let data = volumes.notrim.plaintext();
    assert!(data[..1000].iter().all(|&b| b == 0xab));
    assert!(data[1000..4333].iter().all(|&b| b == 0xcd));
    assert_eq!(&data[65534..65538], &[0xab, 0x01, 0x01, 0]);
    assert!(data[8388601..].iter().all(|&b| b == 0xee));
    server.stop().unwrap();
}

#[test]
fn trim_zeroes_and_block_status_through_qemu_io_and_nbdinfo_map() {
    let (server, _) = server();
    let uri = server.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "discard 0 256k",
            "read -P 0 0 256k",
            "write -z 256k 256k",
            "read -P 0 256k 256k",
            "write -z -u 512k 64k",
            "read -P 0 512k 64k",
            "read -P 0x11 576k 448k",
            "flush",
        ],
    );
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let map: Vec<Value> = serde_json::from_str(&out).unwrap();
    let extents: Vec<(u64, u64, u64)> = map
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    // Trimmed, then zeroed with NO_HOLE (written), zeroed with holes
    // allowed (punched), data, and the never-written rest.
    assert_eq!(
        extents,
        [
            (0, 256 * 1024, 3),
            (256 * 1024, 256 * 1024, 0),
            (512 * 1024, 64 * 1024, 3),
            (576 * 1024, 448 * 1024, 0),
            (MIB, 63 * MIB, 3),
        ]
    );
    // The same through the libnbd REQ_ONE path, one extent at a time.
    let totals = run_ok(Command::new("nbdinfo").args(["--map", "--totals", &uri]));
    assert!(totals.contains("hole,zero"), "{totals}");

    // No trim on an export without it: qemu-io's discard is a no-op there
    // (the client does not send it), and zeroing still reads as zeros.
    let notrim = server.uri("notrim");
    qemu_io(
        &notrim,
        &[
            "write -P 0x22 0 64k",
            "write -z 0 4k",
            "read -P 0 0 4k",
            "read -P 0x22 4k 60k",
        ],
    );

    // nbdcopy zeroes the destination with FAST_ZERO first; where holes may
    // not be punched that fails fast with ENOTSUP, and it falls back to
    // writing zeros: the copy is exact either way.
    let dir = server.dir.path();
    let mut sparse = vec![0u8; 8 * MIB as usize];
    sparse[MIB as usize..2 * MIB as usize].copy_from_slice(&random_bytes(MIB as usize));
    std::fs::write(dir.join("sparse.img"), &sparse).unwrap();
    for target in [&notrim, &uri] {
        qemu_io(target, &["write -P 0x33 0 8M"]);
        run_ok(
            Command::new("nbdcopy")
                .arg(dir.join("sparse.img"))
                .arg(target),
        );
        run_ok(
            Command::new("nbdcopy")
                .arg(target)
                .arg(dir.join("back.img")),
        );
        let back = std::fs::read(dir.join("back.img")).unwrap();
        assert!(back[..8 * MIB as usize] == sparse[..], "{target}");
    }
    server.stop().unwrap();
}

/// fio with crc32c verification; it runs in `dir`, where it leaves its
/// verify state files.
fn fio(dir: &std::path::Path, uri: &str, name: &str, extra: &[&str]) -> Command {
    let mut command = Command::new("fio");
    command.current_dir(dir);
    command.args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]);
    command.args(extra);
    command
}

fn fio_errors(out: &str) -> u64 {
    let report: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    report["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["error"].as_u64().unwrap())
        .sum()
}

#[test]
fn fio_random_writes_verify_at_iodepth_32() {
    let (server, _) = server();
    let out = run_ok(&mut fio(
        server.dir.path(),
        &server.uri("disk"),
        "verify",
        &["--size=16M"],
    ));
    assert_eq!(fio_errors(&out), 0);
    server.stop().unwrap();
}

#[test]
fn two_fio_processes_on_two_connections_at_once() {
    let (server, _) = server();
    let uri = server.uri("disk");
    let dir = server.dir.path();
    let mut first = fio(dir, &uri, "low", &["--offset=0", "--size=16M"]);
    let mut second = fio(dir, &uri, "high", &["--offset=32M", "--size=16M"]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_ok(&mut first));
        let b = s.spawn(|| run_ok(&mut second));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(fio_errors(&a) + fio_errors(&b), 0);
    server.stop().unwrap();
}

#[test]
fn read_only_export_refuses_writers() {
    let (server, volumes) = server();
    let dir = server.dir.path();
    let source = dir.join("small.img");
    std::fs::write(&source, random_bytes(MIB as usize)).unwrap();
    let copy = run(Command::new("nbdcopy").arg(&source).arg(server.uri("ro")));
    assert!(!copy.status.success());
    assert!(volumes.ro.plaintext().iter().all(|&b| b == 0));
    assert!(
        volumes.ro.stored().iter().all(|&b| b == 0),
        "nothing reached the backing file"
    );
    server.stop().unwrap();
}

#[test]
fn tcp_clients_are_served_too() {
    let (server, _) = server();
    let uri = server.tcp_uri("notrim");
    let info = nbdinfo_json(&uri);
    assert_eq!(info["export-size"], 8 * MIB);
    qemu_io(
        &uri,
        &[
            "write -P 0x42 4095 8194",
            "read -P 0x42 4095 8194",
            "read -P 0 0 4095",
        ],
    );
    let default = run_ok(Command::new("nbdinfo").args(["--size", &server.tcp_uri("")]));
    assert_eq!(default.trim(), (64 * MIB).to_string());
    server.stop().unwrap();
}
