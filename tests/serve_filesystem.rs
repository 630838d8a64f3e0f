//! A real ext4 file system on a real Linux block device over an encrypted
//! export: nbdfuse shows the export as a file, losetup makes it a block
//! device. Needs root (losetup, mount), as scripts/test.sh runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{Env, Server, random_bytes, sha256_file, tool, tool_ok};

/// The export as a file through nbdfuse, and a loop device on that file;
/// taken down in the right order even when the test fails half way.
struct BlockDevice {
    fuse_dir: PathBuf,
    nbdfuse: Child,
    loop_dev: Option<String>,
    mounted: Option<PathBuf>,
}

impl BlockDevice {
    fn attach(env: &Env, server: &Server, size: u64) -> Self {
        let fuse_dir = env.path("fuse");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let disk = fuse_dir.join("disk");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&disk)
            .arg(server.uri(""))
            .spawn()
            .expect("nbdfuse (scripts/test.sh installs it)");
        let mut dev = Self {
            fuse_dir,
            nbdfuse,
            loop_dev: None,
            mounted: None,
        };
        for _ in 0..200 {
            if std::fs::metadata(&disk)
                .map(|m| m.len() == size)
                .unwrap_or(false)
            {
                let out = tool_ok("losetup", &["-f", "--show", disk.to_str().unwrap()]);
                dev.loop_dev = Some(out.trim().to_owned());
                return dev;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nbdfuse did not show the export within 10 s");
    }

    fn loop_dev(&self) -> &str {
        self.loop_dev.as_deref().expect("attached")
    }

    fn mount(&mut self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        tool_ok("mount", &[self.loop_dev(), dir.to_str().unwrap()]);
        self.mounted = Some(dir.to_owned());
    }

    fn umount(&mut self) {
        if let Some(dir) = self.mounted.take() {
            tool_ok("umount", &[dir.to_str().unwrap()]);
        }
    }

    /// Unmounts, detaches the loop device and unmounts the FUSE file, in
    /// that order; nbdfuse flushes and disconnects as it exits.
    fn detach(&mut self) {
        self.umount();
        if let Some(dev) = self.loop_dev.take() {
            let _ = tool("losetup", &["-d", &dev]);
        }
        let _ = tool("fusermount3", &["-u", self.fuse_dir.to_str().unwrap()]);
        for _ in 0..100 {
            if self.nbdfuse.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        if let Some(dir) = self.mounted.take() {
            let _ = tool("umount", &["-l", dir.to_str().unwrap()]);
        }
        self.detach();
    }
}

#[test]
fn ext4_on_an_encrypted_export_survives_a_restart_and_leaks_no_plaintext() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root for losetup and mount (scripts/test.sh runs as root)"
    );
    let env = Env::new();
    env.key("alias/fs");
    let size = 256u64 << 20;
    let vol = env.volume("fs.vol", "256M", "alias/fs", "vol-f5f5f5f5");
    let vol_arg = vol.to_str().unwrap();
    let mnt = env.path("mnt");
    let marker = format!("NBDCRYPT-PLAINTEXT-MARKER-{}", hex::encode(random_bytes(8)));

    let server = Server::start(&env, "fs.sock", &[vol_arg]);
    let mut dev = BlockDevice::attach(&env, &server, size);
    tool_ok("mkfs.ext4", &["-q", dev.loop_dev()]);
    dev.mount(&mnt);
    let mut sums = Vec::new();
    for (name, len) in [("a.bin", 3 << 20), ("b.bin", 1 << 20), ("c.bin", 12345)] {
        let path = mnt.join(name);
        std::fs::write(&path, random_bytes(len)).unwrap();
        sums.push((name, sha256_file(&path)));
    }
    std::fs::write(mnt.join("marker.txt"), marker.repeat(200)).unwrap();
    sums.push(("marker.txt", sha256_file(&mnt.join("marker.txt"))));
    tool_ok("sync", &[]);
    dev.umount();
    tool_ok("e2fsck", &["-fn", dev.loop_dev()]);
    dev.detach();
    assert_eq!(server.stop().code(), Some(0));

    // The marker went through the file system, but only ciphertext reached the volume.
    let grep = tool("grep", &["-c", "-a", "-F", &marker, vol_arg]);
    assert_eq!(
        grep.status.code(),
        Some(1),
        "plaintext marker found in the volume file"
    );

    let server = Server::start(&env, "fs2.sock", &[vol_arg]);
    let mut dev = BlockDevice::attach(&env, &server, size);
    dev.mount(&mnt);
    for (name, sum) in &sums {
        assert_eq!(
            &sha256_file(&mnt.join(name)),
            sum,
            "{name} changed across the restart"
        );
    }
    dev.umount();
    tool_ok("e2fsck", &["-fn", dev.loop_dev()]);
    dev.detach();
    assert_eq!(server.stop().code(), Some(0));
}
