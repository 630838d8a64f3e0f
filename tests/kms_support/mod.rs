//! Shared helpers of the KMS command-line tests: each test gets its own KMS
//! directory and drives the built `nbdcrypt` binary.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_nbdcrypt");

pub struct Kms {
    pub tmp: tempfile::TempDir,
}

impl Kms {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("kms")
    }

    /// A path in the test's own folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("kms")
            .args(args)
            .env("NBDCRYPT_KMS_DIR", self.dir())
            .env_remove("NBDCRYPT_KMS_ROOT_KEY")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .current_dir(self.tmp.path());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a verb that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kms {args:?} failed: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kms {args:?}: {e}: {out}"))
    }

    /// Runs a verb that must fail with `code`: exit status 1, one line on
    /// stderr naming the code, and an audit record with that errorCode.
    pub fn fails(&self, args: &[&str], code: &str) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "kms {args:?}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("nbdcrypt: error: "))
            .unwrap_or_else(|| panic!("kms {args:?}: no error line: {stderr}"));
        assert!(
            line.starts_with(&format!("nbdcrypt: error: {code}: ")),
            "kms {args:?}: {line}"
        );
        let last = self.last_audit();
        assert_eq!(last["errorCode"], code, "audit record of {args:?}: {last}");
        line.to_owned()
    }

    pub fn audit(&self) -> Vec<Value> {
        self.ok(&["--json", "audit"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn last_audit(&self) -> Value {
        let text = std::fs::read_to_string(self.dir().join("audit.log")).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    }

    /// Creates a key; its id.
    pub fn create_key(&self, extra: &[&str]) -> String {
        let mut args = vec!["create-key"];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        v["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned()
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

/// The encryption context arguments of a volume's data key.
pub const VOL_CTX: [&str; 4] = ["-c", "aws:rds:db-id=db-1", "-c", "aws:ebs:id=vol-1"];
