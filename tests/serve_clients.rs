//! Encrypted volumes served by `nbdcrypt serve`, driven by real NBD clients:
//! libnbd's nbdinfo and nbdcopy, QEMU's qemu-img and qemu-io, and fio's nbd
//! engine.

mod common;

use common::{Env, Server, random_bytes, sha256_file, tool, tool_ok};

fn two_volumes(env: &Env) -> (String, String) {
    env.key("alias/k");
    let a = env.volume("a.vol", "256M", "alias/k", "vol-aaaa1111");
    let b = env.volume("b.vol", "16M", "alias/k", "vol-bbbb2222");
    (
        a.to_str().unwrap().to_owned(),
        format!("{}:ro", b.to_str().unwrap()),
    )
}

#[test]
fn nbdinfo_sees_the_exports_flags_and_block_sizes() {
    let env = Env::new();
    let (a, b) = two_volumes(&env);
    let server = Server::start(&env, "s.sock", &[&a, &b]);

    let list: serde_json::Value =
        serde_json::from_str(&tool_ok("nbdinfo", &["--list", "--json", &server.uri("")])).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"vol-aaaa1111") && names.contains(&"vol-bbbb2222"),
        "{names:?}"
    );

    let info: serde_json::Value =
        serde_json::from_str(&tool_ok("nbdinfo", &["--json", &server.uri("")])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(
        e["export-size"],
        256 << 20,
        "the default export is the first volume: {e}"
    );
    for flag in [
        "can_flush",
        "can_fua",
        "can_zero",
        "can_cache",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(
        e["can_trim"], false,
        "no TRIM without --allow-discards: {e}"
    );
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(
        e["description"], "nbdcrypt volume vol-aaaa1111, 4096-byte sectors",
        "the description names no path: {e}"
    );
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{e}"
    );

    let info: serde_json::Value = serde_json::from_str(&tool_ok(
        "nbdinfo",
        &["--json", &server.uri("vol-bbbb2222")],
    ))
    .unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    assert_eq!(info["exports"][0]["export-size"], 16 << 20);
    assert_eq!(
        server.stop().code(),
        Some(0),
        "SIGTERM stops the server cleanly"
    );
}

#[test]
fn nbdcopy_in_and_out_and_qemu_compare() {
    let env = Env::new();
    let (a, _) = two_volumes(&env);
    let server = Server::start(&env, "s.sock", &[&a]);
    let src = env.path("src.raw");
    std::fs::write(&src, random_bytes(256 << 20)).unwrap();
    tool_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &server.uri("")],
    );
    let back = env.path("back.raw");
    tool_ok("nbdcopy", &[&server.uri(""), back.to_str().unwrap()]);
    assert_eq!(sha256_file(&src), sha256_file(&back));
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &server.uri(""),
        ],
    );

    drop(server);

    // And after a restart (keys unwrapped afresh), the same bytes.
    let server = Server::start(&env, "s2.sock", &[&a]);
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &server.uri(""),
        ],
    );
}

#[test]
fn qemu_io_unaligned_and_zeroing() {
    let env = Env::new();
    let (a, b) = two_volumes(&env);
    let server = Server::start(&env, "s.sock", &[&a, &b]);
    let uri = server.uri("vol-aaaa1111");
    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(&uri);
        let out = tool("qemu-io", &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success()
                && !text.contains("Pattern verification failed")
                && !text.contains("failed"),
            "{cmds:?}: {text}"
        );
        text
    };
    io(&[
        "write -P 0x11 0 64k",
        "write -P 0x22 1000 3000",
        "write -P 0x33 4095 2",
        "write -P 0x44 8191 8194",
    ]);
    io(&[
        "read -P 0x11 0 1000",
        "read -P 0x22 1000 3000",
        "read -P 0x11 4000 95",
        "read -P 0x33 4095 2",
        "read -P 0x11 4097 4094",
        "read -P 0x44 8191 8194",
        "read -P 0x11 16385 49151",
    ]);
    io(&[
        "write -z 4096 8192",
        "read -P 0 4096 8192",
        "read -P 0x22 1000 3000",
        "read -P 0x44 12288 4097",
    ]);
    io(&[
        "write -z 100 10",
        "read -P 0 100 10",
        "read -P 0x11 0 100",
        "read -P 0x22 1000 3000",
    ]);
    io(&["read -P 0 128M 1M"]);

    let ro = server.uri("vol-bbbb2222");
    let out = tool("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &ro]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("ermission"),
        "{text}"
    );
}

#[test]
fn fio_verified_random_writes_on_two_connections() {
    let env = Env::new();
    let (a, _) = two_volumes(&env);
    let server = Server::start(&env, "s.sock", &[&a]);
    let uri = server.uri("");
    let fio = |name: &str, offset: &str| {
        let report = env.path(&format!("{name}.json"));
        let out = std::process::Command::new("fio")
            .args([
                &format!("--name={name}"),
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                &format!("--offset={offset}"),
                "--size=64M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
                &format!("--output={}", report.display()),
            ])
            .output()
            .expect("fio (scripts/test.sh installs it)");
        (out, std::fs::read(&report).unwrap_or_default())
    };
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(|| fio("one", "0"));
        let two = s.spawn(|| fio("two", "128M"));
        (one.join().unwrap(), two.join().unwrap())
    });
    for (out, report) in [one, two] {
        assert!(
            out.status.success(),
            "fio: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&report).unwrap();
        assert_eq!(json["jobs"][0]["error"], 0);
        assert!(json["jobs"][0]["write"]["io_bytes"].as_u64().unwrap() >= 64 << 20);
    }
}

/// TRIM reaches the backing store only with --allow-discards, and then
/// punches real holes that base:allocation reports.
#[test]
fn allow_discards_punches_holes_that_block_status_reports() {
    let env = Env::new();
    env.key("alias/k");
    let vol = env.volume("d.vol", "64M", "alias/k", "vol-d15c");
    let v = vol.to_str().unwrap();
    let server = Server::start(&env, "d.sock", &["--allow-discards", v]);
    let uri = server.uri("");
    let info: serde_json::Value =
        serde_json::from_str(&tool_ok("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(info["exports"][0]["can_trim"], true);
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&vol).unwrap().blocks() * 512
    };
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 32M", &uri]);
    let full = allocated();
    assert!(full >= 32 << 20, "{full}");
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "discard 0 16M",
            "-c",
            "read -P 0x5a 16M 16M",
            &uri,
        ],
    );
    assert!(
        allocated() <= full - (16 << 20),
        "the discarded range is a hole in the volume file"
    );
    let map: serde_json::Value =
        serde_json::from_str(&tool_ok("nbdinfo", &["--map", "--json", &uri])).unwrap();
    let first = &map.as_array().unwrap()[0];
    assert_eq!(first["offset"], 0);
    assert!(first["length"].as_u64().unwrap() >= 16 << 20, "{first}");
    assert_eq!(first["type"], 3, "hole and zero: {first}");
}
