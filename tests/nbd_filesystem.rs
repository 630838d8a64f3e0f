//! A real block device and a real filesystem on the NBD server: nbdfuse
//! exposes the export as a file, losetup makes it a kernel block device,
//! and ext4 runs on it through a server restart. Needs root, FUSE and loop
//! devices (scripts/test.sh runs as root).

#[path = "common/nbd.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FileBackend, TestServer, export, random_bytes, run, run_ok};

/// Undoes the mount, the loop device and the FUSE mount in that order, even
/// when the test fails half-way, so the next test finds them free.
#[derive(Default)]
struct Attached {
    mount: Option<PathBuf>,
    loop_device: Option<String>,
    fuse: Option<(PathBuf, Child)>,
}

impl Attached {
    fn unmount(&mut self) {
        if let Some(mount) = self.mount.take() {
            run_ok(Command::new("umount").arg(&mount));
        }
    }

    fn detach(&mut self) {
        if let Some(mount) = self.mount.take() {
            run(Command::new("umount").arg(&mount));
        }
        if let Some(device) = self.loop_device.take() {
            run(Command::new("losetup").args(["-d", &device]));
        }
        if let Some((dir, mut nbdfuse)) = self.fuse.take() {
            run(Command::new("fusermount3").arg("-u").arg(&dir));
            // nbdfuse exits once unmounted; kill it by its pid if not.
            let deadline = Instant::now() + Duration::from_secs(30);
            while nbdfuse.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = nbdfuse.kill();
                    let _ = nbdfuse.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The export as a file under `dir/fuse`, then as a loop device.
fn attach(server: &TestServer, dir: &Path, attached: &mut Attached) -> String {
    let fuse = dir.join("fuse");
    std::fs::create_dir_all(&fuse).unwrap();
    let file = fuse.join("disk");
    let nbdfuse = Command::new("nbdfuse")
        .arg(&file)
        .arg("--unix")
        .arg(&server.socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("nbdfuse");
    attached.fuse = Some((fuse, nbdfuse));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not expose the export"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let device = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
    let device = device.trim().to_owned();
    attached.loop_device = Some(device.clone());
    device
}

fn serve(dir: tempfile::TempDir, image: &Path) -> TestServer {
    let backend = Arc::new(FileBackend::open(image, 4096, true));
    TestServer::start(dir, vec![export("disk", backend, false)])
}

#[test]
fn ext4_on_a_loop_device_over_nbdfuse_survives_a_server_restart() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.img");
    drop(FileBackend::create(&image, 256 << 20, 4096, true));
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                format!("file{i}"),
                random_bytes((i + 1) * 1_000_003, i as u64 + 10),
            )
        })
        .collect();

    let server = serve(tempfile::tempdir().unwrap(), &image);
    let mut attached = Attached::default();
    let device = attach(&server, work.path(), &mut attached);
    run_ok(Command::new("mkfs.ext4").args(["-q", &device]));
    run_ok(Command::new("mount").arg(&device).arg(&mnt));
    attached.mount = Some(mnt.clone());
    for (name, data) in &files {
        std::fs::write(mnt.join(name), data).unwrap();
    }
    attached.unmount();
    run_ok(Command::new("e2fsck").args(["-fn", &device]));
    attached.detach();
    server.stop().unwrap();

    // A new server on the same backing file: everything is there.
    let server = serve(tempfile::tempdir().unwrap(), &image);
    let mut attached = Attached::default();
    let device = attach(&server, work.path(), &mut attached);
    run_ok(Command::new("mount").arg(&device).arg(&mnt));
    attached.mount = Some(mnt.clone());
    for (name, data) in &files {
        assert!(
            std::fs::read(mnt.join(name)).unwrap() == *data,
            "{name} differs"
        );
    }
    attached.unmount();
    run_ok(Command::new("e2fsck").args(["-fn", &device]));
    attached.detach();
    server.stop().unwrap();
}
