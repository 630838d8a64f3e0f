//! The KMS command-line tests' view of an [`Env`]: every call is a
//! `nbdcrypt kms` verb, and a failure must name its AWS error code.

use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

use super::Env;

pub const BIN: &str = env!("CARGO_BIN_EXE_nbdcrypt");

pub struct Kms {
    pub env: Env,
}

impl Deref for Kms {
    type Target = Env;

    fn deref(&self) -> &Env {
        &self.env
    }
}

impl Kms {
    pub fn new() -> Self {
        Self { env: Env::new() }
    }

    pub fn dir(&self) -> PathBuf {
        self.env.kms_dir()
    }

    /// `nbdcrypt kms ARGS…`, run in the test's folder.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.cmd();
        cmd.arg("kms").args(args).current_dir(self.env.dir.path());
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

    /// Creates a key; its id.
    pub fn create_key(&self, extra: &[&str]) -> String {
        let mut args = vec!["create-key"];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        v["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned()
    }
}

/// The encryption context arguments of a volume's data key.
pub const VOL_CTX: [&str; 4] = ["-c", "aws:rds:db-id=db-1", "-c", "aws:ebs:id=vol-1"];
