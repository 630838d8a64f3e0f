//! The one shared test helper: a private KMS directory, the `nbdcrypt`
//! binary run against it, volumes made through the CLI, and servers started
//! on Unix sockets and stopped by the pid we started.
#![allow(dead_code)] // each test binary uses a different part of it

pub mod client;
pub mod kms;
pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const DB: &str = "db-CQYSMDPBRZ7BPMH7Y3RTDG5QY";

/// A temporary folder with its own KMS; removed when dropped.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn kms_dir(&self) -> PathBuf {
        self.path("kms")
    }

    /// `nbdcrypt` with this environment's KMS.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
        c.env("NBDCRYPT_KMS_DIR", self.kms_dir())
            .env_remove("RUST_LOG");
        c
    }

    /// Runs `nbdcrypt ARGS` and returns its output, whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run nbdcrypt")
    }

    /// Runs `nbdcrypt ARGS`, panicking with its stderr if it fails; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "nbdcrypt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs `nbdcrypt ARGS`, expecting exit code 1; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "nbdcrypt {args:?} should fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }

    /// Creates a symmetric CMK under `alias`.
    pub fn key(&self, alias: &str) {
        self.ok(&[
            "kms",
            "create-key",
            "--alias",
            alias,
            "--description",
            "test key",
        ]);
    }

    /// Creates a volume of `size` under `alias`, for DB and `vol_id`.
    pub fn volume(&self, name: &str, size: &str, alias: &str, vol_id: &str) -> PathBuf {
        let path = self.path(name);
        self.ok(&create_args(path.to_str().unwrap(), size, alias, vol_id));
        path
    }

    /// The audit records, oldest first, as `kms audit --json` prints them.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.ok(&["kms", "audit", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// The newest audit record, read from the log itself.
    pub fn last_audit(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.kms_dir().join("audit.log")).expect("audit log");
        serde_json::from_str(text.lines().last().expect("an audit record")).expect("JSON record")
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The arguments of `nbdcrypt volume create PATH --size SIZE --kms-key KEY
/// --db-id DB --vol-id VOL_ID`; more may be appended.
pub fn create_args<'a>(
    path: &'a str,
    size: &'a str,
    key: &'a str,
    vol_id: &'a str,
) -> Vec<&'a str> {
    vec![
        "volume",
        "create",
        path,
        "--size",
        size,
        "--kms-key",
        key,
        "--db-id",
        DB,
        "--vol-id",
        vol_id,
    ]
}

/// The arguments of `nbdcrypt volume VERB VOL FLAG PATH --db-id DB` for the
/// verbs that attach a volume: import (--from), export (--to) and
/// export-key (--out).
pub fn attach_args<'a>(verb: &'a str, vol: &'a str, path: &'a str) -> [&'a str; 7] {
    let flag = match verb {
        "import" => "--from",
        "export" => "--to",
        "export-key" => "--out",
        _ => panic!("{verb} does not attach a volume"),
    };
    ["volume", verb, vol, flag, path, "--db-id", DB]
}

/// The arguments of `nbdcrypt snapshot create VOL --db-id DB --snapshot-id
/// ID --out DIR`: an offline snapshot.
pub fn snapshot_args<'a>(vol: &'a str, id: &'a str, out: &'a str) -> [&'a str; 9] {
    [
        "snapshot",
        "create",
        vol,
        "--db-id",
        DB,
        "--snapshot-id",
        id,
        "--out",
        out,
    ]
}

/// Random bytes from the OS.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    getrandom::fill(&mut v).expect("random");
    v
}

/// Runs an external tool and returns its output; panics if it cannot start.
pub fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test.sh installs it)"))
}

/// Like [`tool`], but the tool must succeed; returns stdout.
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let out = tool(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256_file(path: &Path) -> String {
    tool_ok("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A `nbdcrypt serve` process on a Unix socket; SIGTERM and reaped on drop.
pub struct Server {
    pub child: std::process::Child,
    pub socket: PathBuf,
}

impl Server {
    /// Starts `nbdcrypt serve --unix SOCK --db-id DB ARGS…` and waits until a
    /// full NBD handshake succeeds.
    pub fn start(env: &Env, socket_name: &str, args: &[&str]) -> Self {
        let socket = env.path(socket_name);
        let child = env
            .cmd()
            .args(["serve", "--unix", socket.to_str().unwrap(), "--db-id", DB])
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn nbdcrypt serve");
        let mut server = Self { child, socket };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nbdcrypt serve exited early: {status}");
            }
            if self.socket.exists() && tool("nbdinfo", &["--size", &self.uri("")]).status.success()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("nbdcrypt serve did not answer a handshake within 10 s");
    }

    /// `nbd+unix:///EXPORT?socket=…`; an empty export is the default one.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// SIGKILL: a crash, as far as the volume can tell.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait for nbdcrypt serve")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// A file system mounted on a fresh folder of the environment (the tests
/// run as root); unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// A tmpfs: a small one runs out of space on demand; a read-only one is
    /// a directory even root cannot write to.
    pub fn tmpfs(env: &Env, name: &str, size: &str, read_only: bool) -> Self {
        let mode = if read_only { "ro" } else { "rw" };
        Self::new(
            env,
            name,
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},{mode},mode=0755"),
                "tmpfs",
            ],
        )
    }

    /// A ramfs: a file system without `fallocate`, so a loop device over
    /// one of its files can neither discard nor zero by itself.
    pub fn ramfs(env: &Env, name: &str) -> Self {
        Self::new(env, name, &["-t", "ramfs", "ramfs"])
    }

    /// XFS with reflink, on a sparse image file: a file system that shares
    /// blocks between files (FICLONERANGE).
    pub fn xfs(env: &Env, name: &str) -> Self {
        let image = env.path(&format!("{name}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(320 << 20))
            .expect("xfs image");
        tool_ok(
            "mkfs.xfs",
            &["-q", "-m", "reflink=1", image.to_str().unwrap()],
        );
        Self::new(env, name, &["-o", "loop", image.to_str().unwrap()])
    }

    fn new(env: &Env, name: &str, args: &[&str]) -> Self {
        let dir = env.path(name);
        std::fs::create_dir(&dir).expect("mount point");
        let mut all = args.to_vec();
        all.push(dir.to_str().unwrap());
        tool_ok("mount", &all);
        Self { dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = tool("umount", &[self.dir.to_str().unwrap()]);
    }
}

/// A loop device over a file; detached when dropped.
pub struct Loop(pub String);

impl Loop {
    pub fn new(file: &Path) -> Self {
        Self(
            tool_ok("losetup", &["-f", "--show", file.to_str().unwrap()])
                .trim()
                .to_owned(),
        )
    }

    /// One of the device's queue limits in sysfs, in bytes.
    pub fn limit(&self, name: &str) -> u64 {
        let device = Path::new(&self.0).file_name().unwrap().to_str().unwrap();
        std::fs::read_to_string(format!("/sys/block/{device}/queue/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        tool("losetup", &["-d", &self.0]);
    }
}

/// The volume's key as `volume export-key` writes it (break glass, audited).
pub fn export_key(env: &Env, volume: &Path, db: &str, name: &str) -> Vec<u8> {
    let out = env.path(name);
    env.ok(&[
        "volume",
        "export-key",
        volume.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--db-id",
        db,
    ]);
    std::fs::read(out).expect("key file")
}

/// The volume's plaintext, through `volume export` to a raw image.
pub fn plaintext(env: &Env, volume: &Path, db: &str, name: &str) -> Vec<u8> {
    let out = env.path(name);
    env.ok(&[
        "volume",
        "export",
        volume.to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
        "--db-id",
        db,
    ]);
    std::fs::read(out).expect("raw image")
}

/// `volume inspect --json`.
pub fn inspect(env: &Env, volume: &Path) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["volume", "inspect", volume.to_str().unwrap(), "--json"]))
        .expect("inspect prints JSON")
}
