//! Keys stay secret: no byte of a volume key or of the KMS root key shows
//! in any output at any verbosity (-vvv), in any error message, in `Debug`
//! output, in the audit log or in any file the commands leave, except the
//! one `volume export-key` writes on purpose (which is how the test learns
//! the key). A serving process is non-dumpable, has no core size, and has
//! memory locked.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::client::Client;
use common::{DB, Env, attach_args, create_args, s};

/// The volume at `path`, unlocked in this process under the test's DB id.
fn open(path: &Path, kms: &nbdcrypt::kms::LocalKms, read_only: bool) -> nbdcrypt::volume::Volume {
    let opts = nbdcrypt::volume::AttachOptions {
        db_id: DB.into(),
        read_only,
        allow_discards: false,
    };
    nbdcrypt::volume::Volume::open(path, kms, &opts).unwrap()
}

/// Every 16-byte window of every secret: any of them found anywhere, raw,
/// in hex or in base64, is a leak.
struct Secrets(HashSet<Vec<u8>>);

impl Secrets {
    fn new(secrets: &[&[u8]]) -> Self {
        Secrets(
            secrets
                .iter()
                .flat_map(|s| s.windows(16))
                .map(<[u8]>::to_vec)
                .collect(),
        )
    }

    fn holds(&self, bytes: &[u8]) -> bool {
        bytes.windows(16).any(|w| self.0.contains(w))
    }

    /// How a secret shows in `bytes`, if it does.
    fn leak(&self, bytes: &[u8]) -> Option<String> {
        if self.holds(bytes) {
            return Some("raw bytes".into());
        }
        // Decode every long enough run of hex or base64 characters, at
        // each alignment a secret's encoding could start on.
        let text = String::from_utf8_lossy(bytes);
        let hex_runs = text.split(|c: char| !c.is_ascii_hexdigit());
        for run in hex_runs.filter(|r| r.len() >= 32) {
            for skip in 0..2 {
                let body = &run[skip..skip + (run.len() - skip) / 2 * 2];
                if hex::decode(body).is_ok_and(|d| self.holds(&d)) {
                    return Some(format!("hex {run}"));
                }
            }
        }
        let b64_runs = text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/_-".contains(c)));
        for run in b64_runs.filter(|r| r.len() >= 22) {
            for skip in 0..4 {
                let body = &run[skip..skip + (run.len() - skip) / 4 * 4];
                for engine in [
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ] {
                    if engine.decode(body).is_ok_and(|d| self.holds(&d)) {
                        return Some(format!("base64 {run}"));
                    }
                }
            }
        }
        None
    }

    fn assert_absent(&self, what: &str, bytes: &[u8]) {
        if let Some(leak) = self.leak(bytes) {
            panic!("key material in {what}: {leak}");
        }
    }
}

/// All files under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

/// `nbdcrypt -vvv serve` with its stderr in a file, ready for clients.
fn serve(env: &Env, args: &[&str], log: &Path) -> Child {
    let socket = env.path("nbd.sock");
    let mut child = env
        .cmd()
        .args(["-vvv", "serve", "--unix", socket.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(log.with_extension("out")).unwrap())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            let log = fs::read_to_string(log).unwrap();
            panic!(
                "serve exited early: {}",
                &log[log.len().saturating_sub(2000)..]
            );
        }
        if Client::connect(&socket, "").is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("serve did not come up");
}

fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn no_key_bytes_in_output_logs_errors_debug_or_files() {
    let env = Env::new();
    let mut transcript: Vec<u8> = Vec::new();
    let mut run = |args: &[&str]| -> bool {
        let out = env.cmd().arg("-vvv").args(args).output().unwrap();
        transcript.extend_from_slice(&out.stdout);
        transcript.extend_from_slice(&out.stderr);
        out.status.success()
    };
    assert!(run(&[
        "kms",
        "create-key",
        "--alias",
        "alias/s",
        "--description",
        "s"
    ]));
    assert!(run(&[
        "kms",
        "create-key",
        "--alias",
        "alias/t",
        "--description",
        "t"
    ]));
    let vol = env.path("s.vol");
    let vol_s = vol.to_str().unwrap();
    assert!(run(&create_args(vol_s, "64M", "alias/s", "vol-secret")));
    let key_file = env.path("vk.bin");
    assert!(run(&attach_args("export-key", vol_s, s(&key_file))));
    let volume_key = fs::read(&key_file).unwrap();
    assert_eq!(volume_key.len(), 64);
    let root_key = fs::read(env.kms_dir().join("root.key")).unwrap();
    let secrets = Secrets::new(&[&volume_key, &root_key]);

    let key_id = |alias: &str| -> String {
        let out = env.ok(&["kms", "describe-key", alias, "--json"]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        json["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned()
    };
    let (s_id, t_id) = (key_id("alias/s"), key_id("alias/t"));
    let mut run = |args: &[&str]| -> bool {
        let out = env.cmd().arg("-vvv").args(args).output().unwrap();
        transcript.extend_from_slice(&out.stdout);
        transcript.extend_from_slice(&out.stderr);
        out.status.success()
    };

    // Successes and failures, every one at -vvv.
    assert!(run(&["volume", "inspect", vol_s]));
    assert!(run(&["volume", "inspect", "--json", vol_s]));
    assert!(run(&["kms", "rotate-key-on-demand", &s_id]));
    assert!(run(&["volume", "rekey", vol_s, "--db-id", DB]));
    assert!(run(&[
        "volume",
        "rekey",
        vol_s,
        "--db-id",
        DB,
        "--kms-key",
        "alias/t"
    ]));
    assert!(!run(&[
        "volume",
        "export-key",
        vol_s,
        "--out",
        env.path("no.bin").to_str().unwrap(),
        "--db-id",
        "db-SOMEONEELSE",
    ]));
    assert!(run(&["kms", "disable-key", &t_id]));
    assert!(!run(&attach_args("export-key", vol_s, "/dev/null")));
    assert!(run(&["kms", "enable-key", &t_id]));
    let other = env.path("other.vol");
    fs::write(&other, vec![0x4c; 1 << 20]).unwrap();
    assert!(!run(&["volume", "inspect", other.to_str().unwrap()]));
    assert!(run(&["kms", "audit"]));
    assert!(run(&["kms", "audit", "--json"]));
    assert!(run(&["kms", "audit", "verify"]));
    assert!(!fs::exists(env.path("no.bin")).unwrap());

    // The server at trace level, through a session of every kind of I/O,
    // and refusing a wrong DB id.
    let log = env.path("serve.log");
    let server = serve(&env, &[vol_s, "--allow-discards", "--db-id", DB], &log);
    let mut c = Client::connect(&env.path("nbd.sock"), "").unwrap();
    c.write(4096, &[0xa5; 8192], true).unwrap();
    c.write(100, &[0x5a; 1000], false).unwrap();
    c.read(0, 65536).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();
    terminate(server);
    transcript.extend_from_slice(&fs::read(&log).unwrap());
    let refused = env
        .cmd()
        .args([
            "-vvv",
            "serve",
            "--unix",
            env.path("x.sock").to_str().unwrap(),
        ])
        .args(["--db-id", "db-SOMEONEELSE", vol_s])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    transcript.extend_from_slice(&refused.stderr);
    assert!(
        String::from_utf8_lossy(&transcript).contains("DEBUG"),
        "-vvv logs everything down to debug and trace"
    );
    secrets.assert_absent("the commands' output", &transcript);

    // Debug output of everything that holds or wraps a key.
    let kms = nbdcrypt::kms::LocalKms::open(&env.kms_dir()).unwrap();
    let volume = open(&vol, &kms, true);
    let file = fs::File::open(&vol).unwrap();
    let (header, key) = nbdcrypt::volume::unlock(&vol, &file, &kms, DB).unwrap();
    assert_eq!(
        key.expose(),
        &volume_key[..],
        "the exported key is the volume's"
    );
    let debug = format!("{volume:?} {header:?} {key:?} {:?}", header.kms_token());
    secrets.assert_absent("Debug output", debug.as_bytes());
    drop((volume, kms));

    // No file but the exported key holds a key: not the volume's header
    // area, the key store, the audit log or anything else left behind.
    for path in files(env.dir.path()) {
        if path == key_file || path.file_name().unwrap() == "root.key" {
            continue;
        }
        let bytes = fs::read(&path).unwrap();
        let scanned = if path == vol {
            &bytes[..16 << 20]
        } else {
            &bytes[..]
        };
        secrets.assert_absent(&path.display().to_string(), scanned);
    }
    // The test can fail: the exported key itself is found.
    assert!(secrets.leak(&volume_key).is_some());
    assert!(
        secrets
            .leak(hex::encode(&volume_key[20..40]).as_bytes())
            .is_some()
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&volume_key[5..30]);
    assert!(secrets.leak(format!("key=\"{b64}\"").as_bytes()).is_some());
}

fn proc_status(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field}"))
        .to_owned()
}

/// Runs `nbdcrypt` (or `program`) as the unprivileged user `nobody`, so
/// that /proc shows whether the process is dumpable: the files of a
/// non-dumpable process belong to root, a dumpable one's to its user.
fn as_nobody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    c
}

#[test]
fn a_serving_process_is_non_dumpable_with_no_core_and_locked_memory() {
    let env = Env::new();
    env.key("alias/d");
    let vol = env.volume("d.vol", "16M", "alias/d", "vol-dump");
    // Everything belongs to nobody, who runs the server.
    common::tool_ok(
        "chown",
        &["-R", "65534:65534", env.dir.path().to_str().unwrap()],
    );
    let socket = env.path("nbd.sock");
    let mut server = as_nobody(env!("CARGO_BIN_EXE_nbdcrypt"))
        .env("NBDCRYPT_KMS_DIR", env.kms_dir())
        .env_remove("RUST_LOG")
        .args(["serve", "--unix", socket.to_str().unwrap(), "--db-id", DB])
        .arg(&vol)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..200 {
        assert!(server.try_wait().unwrap().is_none(), "serve exited early");
        if Client::connect(&socket, "").is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "serve did not come up");
    let pid = server.id();
    let uid_line = proc_status(pid, "Uid:");
    assert!(uid_line.contains("65534"), "runs as nobody: {uid_line}");
    let owner = fs::metadata(format!("/proc/{pid}/status")).unwrap().uid();
    let locked: u64 = proc_status(pid, "VmLck:")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .to_owned();

    // The check tells the two apart: an ordinary process of nobody's is
    // dumpable, and its /proc files are nobody's.
    let mut plain = as_nobody("sleep").arg("5").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let plain_owner = fs::metadata(format!("/proc/{}/status", plain.id()))
        .unwrap()
        .uid();
    plain.kill().unwrap();
    plain.wait().unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(server.wait().unwrap().success());
    assert_eq!(plain_owner, 65534, "a dumpable process's /proc is its own");
    assert_eq!(
        owner, 0,
        "the server is dumpable: its /proc belongs to its user"
    );
    assert!(
        core.split_whitespace().filter(|w| *w == "0").count() >= 2,
        "core dumps are not off: {core}"
    );
    assert!(locked > 0, "no memory locked (VmLck: {locked} kB)");
}

/// A secret's 16-byte windows, remembered only as hashes (and 4-byte
/// prefixes to filter with), so that looking for copies makes none.
struct Fingerprints {
    prefixes: HashSet<[u8; 4]>,
    hashes: HashSet<u64>,
}

fn hash16(window: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(window)
}

impl Fingerprints {
    /// Reads the secret from `path` and wipes the buffer it was read into.
    fn of_file(path: &Path) -> Self {
        use zeroize::Zeroize;
        let mut secret = fs::read(path).unwrap();
        let prints = Fingerprints {
            prefixes: secret
                .windows(16)
                .map(|w| w[..4].try_into().unwrap())
                .collect(),
            hashes: secret.windows(16).map(hash16).collect(),
        };
        secret.zeroize();
        prints
    }

    /// Windows of this process's writable memory that match: how many in
    /// all, and how many of those in memory that is not locked.
    fn copies_in_memory(&self) -> (usize, usize) {
        use std::io::{Read, Seek, SeekFrom};
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        // (start, end, writable, fully locked) of every mapping.
        let mut mappings: Vec<(u64, u64, bool, bool)> = Vec::new();
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let first = fields.next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let writable = fields.next().is_some_and(|p| p.starts_with("rw"));
                mappings.push((start, end, writable, false));
            } else if first == "Locked:" {
                let kb: u64 = fields.next().unwrap().parse().unwrap();
                let last = mappings.last_mut().unwrap();
                last.3 = kb * 1024 >= last.1 - last.0;
            }
        }
        let mut mem = fs::File::open("/proc/self/mem").unwrap();
        let (mut found, mut unlocked) = (0, 0);
        let mut chunk = vec![0u8; 1 << 20];
        for (start, end, writable, locked) in mappings {
            if !writable {
                continue;
            }
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(chunk.len());
                if mem.seek(SeekFrom::Start(at)).is_err()
                    || mem.read_exact(&mut chunk[..n]).is_err()
                {
                    break;
                }
                let here = chunk[..n]
                    .windows(16)
                    .filter(|w| {
                        self.prefixes.contains(&[w[0], w[1], w[2], w[3]])
                            && self.hashes.contains(&hash16(w))
                    })
                    .count();
                found += here;
                if !locked {
                    unlocked += here;
                }
                if at + n as u64 >= end {
                    break;
                }
                at += n as u64 - 15;
            }
        }
        // The scan's buffer holds whatever it read last.
        chunk.fill(0);
        std::hint::black_box(&chunk);
        (found, unlocked)
    }
}

#[test]
fn keys_live_only_in_locked_memory_and_not_after_the_volume_is_closed() {
    let env = Env::new();
    env.key("alias/z");
    let vol = env.volume("z.vol", "16M", "alias/z", "vol-zero");
    let key_file = env.path("vk.bin");
    env.ok(&attach_args("export-key", s(&vol), s(&key_file)));
    let key = Fingerprints::of_file(&key_file);
    let root = Fingerprints::of_file(&env.kms_dir().join("root.key"));
    assert_eq!(
        key.copies_in_memory(),
        (0, 0),
        "no copy before the volume is opened"
    );

    let kms = nbdcrypt::kms::LocalKms::open(&env.kms_dir()).unwrap();
    let volume = open(&vol, &kms, false);
    // The cipher's backends spill pieces of the round keys to the stack,
    // which the cipher wipes after every pass.
    let mut buf = vec![7; 8192];
    volume.write(4096, &mut buf).unwrap();
    volume.read(0, &mut buf).unwrap();
    let (open, open_unlocked) = key.copies_in_memory();
    let (root_copies, _) = root.copies_in_memory();
    drop(volume);
    drop(kms);
    let closed = key.copies_in_memory();
    eprintln!(
        "volume key windows in memory: {open} while open ({open_unlocked} unlocked), {closed:?} once closed; root key windows: {root_copies}"
    );
    // The scan finds the live key: the cipher's round keys begin with it.
    assert!(open > 0, "the scan does not see the live key schedule");
    assert_eq!(open_unlocked, 0, "key material in unlocked memory");
    assert_eq!(root_copies, 0, "the KMS root key is kept in memory");
    assert_eq!(
        closed,
        (0, 0),
        "copies of the volume key outlive the volume"
    );
}
