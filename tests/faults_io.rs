//! I/O faults of the backing store reach the client as the NBD error they
//! are, and cost nothing else: the connection and the server stay up, and
//! every acknowledged write is still there afterwards, across a restart.
//!
//! - ENOSPC: the volume lives on a small ext4 file system on a loop device;
//!   the volume file is sparse, so writes fill the file system up.
//! - A preallocated volume on the same kind of file system is written in
//!   full after everything else on it filled up.
//! - EIO: the volume file is served by nbdkit's file plugin under its error
//!   filter and seen through nbdfuse as a file (device-mapper's `error`
//!   target is not available on these machines); a trigger file turns
//!   write or read errors on and off.
//! - A failed flush: the volume file lies on a small tmpfs and is served
//!   through a loop device, so writes are taken into the device's page cache
//!   and fail only when `fdatasync` writes them back.
//!
//! Needs root (losetup, mount), nbdkit and nbdfuse, as scripts/test.sh sets
//! up.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use common::client::Client;
use common::{Env, Loop, Mount, Server, create_args, s, tool, tool_ok};
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags};

const MIB: u64 = 1 << 20;
const ENOSPC: u32 = 28;
const EIO: u32 = 5;

/// Writes `data` at `offset` with FUA; `Ok(error)` is the NBD error value.
fn write(c: &mut Client, offset: u64, data: &[u8]) -> u32 {
    c.send(
        Command::WRITE,
        CommandFlags::FUA,
        1,
        offset,
        data.len() as u32,
        data,
    )
    .unwrap();
    c.push().unwrap();
    c.reply(|_| 0).unwrap().error
}

/// A loop-mounted ext4 file system; unmounted and detached when dropped.
struct SmallFs {
    mnt: PathBuf,
    device: String,
}

impl SmallFs {
    fn new(env: &Env, size: &str) -> Self {
        let image = env.path("fs.img");
        tool_ok("truncate", &["-s", size, image.to_str().unwrap()]);
        // No blocks reserved for root: the test runs as root.
        tool_ok("mkfs.ext4", &["-q", "-m", "0", image.to_str().unwrap()]);
        let device = tool_ok("losetup", &["-f", "--show", image.to_str().unwrap()])
            .trim()
            .to_owned();
        let mnt = env.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = SmallFs { mnt, device };
        tool_ok("mount", &[&fs.device, fs.mnt.to_str().unwrap()]);
        fs
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        tool("umount", &[self.mnt.to_str().unwrap()]);
        tool("losetup", &["-d", &self.device]);
    }
}

#[test]
fn a_full_file_system_gives_enospc_and_loses_nothing() {
    let env = Env::new();
    env.key("alias/faults");
    let fs = SmallFs::new(&env, "40M");
    // A filler to delete later, so the file system has room again.
    let filler = fs.mnt.join("filler");
    std::fs::write(&filler, vec![7u8; 4 * MIB as usize]).unwrap();
    let path = fs.mnt.join("v.vol");
    env.ok(&create_args(s(&path), "128M", "alias/faults", "vol-full"));
    let server = Server::start(&env, "nbd.sock", &[path.to_str().unwrap()]);
    let mut c = Client::connect(&server.socket, "").unwrap();

    // Fill it: 1 MiB writes, every other one unaligned, until ENOSPC.
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut offset = 0;
    let refused = loop {
        let data = common::random_bytes(MIB as usize);
        let at = offset + if acked.len() % 2 == 1 { 1000 } else { 0 };
        match write(&mut c, at, &data) {
            0 => acked.push((at, data)),
            error => break error,
        }
        offset += 2 * MIB;
        assert!(offset < 128 * MIB, "the file system never filled up");
    };
    assert_eq!(refused, ENOSPC, "a full file system is NBD_ENOSPC");
    assert!(acked.len() > 5, "only {} writes fit", acked.len());

    // The connection is up: flush, and everything acknowledged reads back.
    c.flush().unwrap();
    for (at, data) in &acked {
        assert_eq!(&c.read(*at, data.len() as u32).unwrap(), data);
    }
    // With room again, the same connection writes again.
    std::fs::remove_file(&filler).unwrap();
    let data = common::random_bytes(MIB as usize);
    assert_eq!(
        write(&mut c, offset, &data),
        0,
        "writes resume once there is room"
    );
    acked.push((offset, data));
    drop(c);

    // A clean stop (its final flush) and a restart: nothing acknowledged
    // is lost, and the volume's header is intact.
    assert!(server.stop().success());
    let server = Server::start(&env, "nbd.sock", &[path.to_str().unwrap()]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    for (at, data) in &acked {
        assert_eq!(&c.read(*at, data.len() as u32).unwrap(), data);
    }
    drop(c);
    assert!(server.stop().success());
}

#[test]
fn a_preallocated_volume_never_runs_out_of_space() {
    let env = Env::new();
    env.key("alias/faults");
    let fs = SmallFs::new(&env, "40M");
    let path = fs.mnt.join("v.vol");
    let thick = |path, size, vol_id| {
        let mut args = create_args(path, size, "alias/faults", vol_id);
        args.push("--preallocate");
        args
    };
    let err = env.fails(&thick(s(&path), "64M", "vol-thick"));
    assert!(
        err.contains("cannot reserve") && err.contains("No space left"),
        "{err}"
    );
    assert!(!path.exists(), "a failed create leaves nothing behind");
    // Nor in a file that was there: it is empty, and can be used sparse.
    let old = fs.mnt.join("old.vol");
    std::fs::File::create(&old).unwrap();
    env.fails(&thick(s(&old), "64M", "vol-old"));
    assert_eq!(std::fs::metadata(&old).unwrap().blocks(), 0);
    env.ok(&create_args(s(&old), "64M", "alias/faults", "vol-old"));
    std::fs::remove_file(&old).unwrap();

    env.ok(&thick(s(&path), "12M", "vol-thick"));
    let reserved = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(reserved >= 12 * MIB, "only {reserved} bytes reserved");
    // Everything else on the file system is taken.
    let mut filler = std::fs::File::create(fs.mnt.join("filler")).unwrap();
    let chunk = vec![7u8; MIB as usize];
    while filler
        .write_all(&chunk)
        .and_then(|()| filler.sync_all())
        .is_ok()
    {}

    // Every byte of the volume can still be written, at any alignment.
    let server = Server::start(&env, "nbd.sock", &[path.to_str().unwrap()]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    let data = common::random_bytes(12 * MIB as usize);
    let piece = MIB as usize - 1000;
    for (i, part) in data.chunks(piece).enumerate() {
        assert_eq!(write(&mut c, (i * piece) as u64, part), 0, "write {i}");
    }
    c.flush().unwrap();
    drop(c);
    assert!(server.stop().success());
    let server = Server::start(&env, "nbd.sock", &[path.to_str().unwrap()]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    for (i, part) in data.chunks(MIB as usize).enumerate() {
        assert_eq!(c.read(i as u64 * MIB, part.len() as u32).unwrap(), part);
    }
    drop(c);
    assert!(server.stop().success());
}

/// nbdkit serving a file under its error filter, mounted as a file by
/// nbdfuse; torn down in order when dropped.
struct FaultyFile {
    nbdkit: Child,
    nbdfuse: Option<Child>,
    fuse_dir: PathBuf,
    file: PathBuf,
}

impl FaultyFile {
    /// `write_trigger` and `read_trigger`: while the file exists, every
    /// write (read) fails with EIO.
    fn new(env: &Env, image: &Path, write_trigger: &Path, read_trigger: &Path) -> Self {
        let socket = env.path("nbdkit.sock");
        let nbdkit = Process::new("nbdkit")
            .args([
                "--foreground",
                "-U",
                socket.to_str().unwrap(),
                "--filter=error",
            ])
            .arg("file")
            .arg(image)
            .args(["error-pwrite=EIO", "error-pwrite-rate=100%"])
            .arg(format!("error-pwrite-file={}", write_trigger.display()))
            .args(["error-pread=EIO", "error-pread-rate=100%"])
            .arg(format!("error-pread-file={}", read_trigger.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("nbdkit (scripts/test.sh installs it)");
        let fuse_dir = env.path("fuse");
        std::fs::create_dir(&fuse_dir).unwrap();
        let file = fuse_dir.join("disk");
        let mut faulty = FaultyFile {
            nbdkit,
            nbdfuse: None,
            fuse_dir,
            file,
        };
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // nbdfuse serves the file until it is unmounted.
        let nbdfuse = Process::new("nbdfuse")
            .arg(&faulty.file)
            .arg("--unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("nbdfuse (scripts/test.sh installs it)");
        faulty.nbdfuse = Some(nbdfuse);
        faulty.wait_for_file();
        faulty
    }

    fn wait_for_file(&mut self) {
        for _ in 0..100 {
            if self.file.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nbdfuse did not show the file");
    }
}

impl Drop for FaultyFile {
    fn drop(&mut self) {
        tool("fusermount3", &["-u", self.fuse_dir.to_str().unwrap()]);
        if let Some(mut nbdfuse) = self.nbdfuse.take() {
            let _ = nbdfuse.wait();
        }
        let _ = self.nbdkit.kill();
        let _ = self.nbdkit.wait();
    }
}

#[test]
fn backing_store_eio_is_nbd_eio_and_loses_nothing() {
    let env = Env::new();
    env.key("alias/faults");
    let image = env.volume("v.vol", "32M", "alias/faults", "vol-eio");
    let (write_trigger, read_trigger) = (env.path("fail-writes"), env.path("fail-reads"));
    let faulty = FaultyFile::new(&env, &image, &write_trigger, &read_trigger);
    let served = faulty.file.to_str().unwrap().to_owned();
    let server = Server::start(&env, "nbd.sock", &[&served]);
    let mut c = Client::connect(&server.socket, "").unwrap();

    let before = common::random_bytes(256 << 10);
    assert_eq!(write(&mut c, 4096, &before), 0);

    // Writes fail: EIO, aligned or read-modify-write, and the connection
    // stays up.
    std::fs::write(&write_trigger, b"").unwrap();
    assert_eq!(write(&mut c, 8 * MIB, &[1; 65536]), EIO);
    assert_eq!(write(&mut c, 8 * MIB + 100, &[2; 1000]), EIO);
    assert_eq!(&c.read(4096, before.len() as u32).unwrap(), &before);
    std::fs::remove_file(&write_trigger).unwrap();

    // Reads fail: EIO, then succeed again.
    std::fs::write(&read_trigger, b"").unwrap();
    c.send(Command::READ, CommandFlags::EMPTY, 9, 20 * MIB, 65536, &[])
        .unwrap();
    c.push().unwrap();
    assert_eq!(c.reply(|_| 65536).unwrap().error, EIO);
    std::fs::remove_file(&read_trigger).unwrap();
    assert_eq!(c.read(20 * MIB, 65536).unwrap(), vec![0; 65536]);

    // Writes work again, on the same connection.
    let after = common::random_bytes(100_000);
    assert_eq!(write(&mut c, 12 * MIB + 17, &after), 0);
    c.flush().unwrap();
    drop(c);
    assert!(server.stop().success());

    // Restart on the same faulty path: nothing acknowledged was lost.
    let server = Server::start(&env, "nbd.sock", &[&served]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    assert_eq!(&c.read(4096, before.len() as u32).unwrap(), &before);
    assert_eq!(&c.read(12 * MIB + 17, after.len() as u32).unwrap(), &after);
    drop(c);
    assert!(server.stop().success());
    drop(faulty);
}

/// After a failed `fdatasync` the kernel may have dropped the pages it could
/// not write, and a second `fdatasync` succeeds: a flush that then said
/// "durable" would lie. So once a flush has failed, every later flush and
/// FUA write fails too, even when the store has room again, until the
/// volume is opened anew.
#[test]
fn after_a_failed_flush_every_flush_fails() {
    let env = Env::new();
    env.key("alias/faults");
    let small = Mount::tmpfs(&env, "small", "24M", false);
    let path = small.dir.join("v.vol");
    env.ok(&create_args(s(&path), "64M", "alias/faults", "vol-flush"));
    let device = Loop::new(&path);
    let server = Server::start(&env, "nbd.sock", &[&device.0]);
    let mut c = Client::connect(&server.socket, "").unwrap();

    // Acknowledged into the device's page cache: more than the tmpfs holds.
    let data = common::random_bytes(MIB as usize);
    for i in 0..32 {
        c.write(i * MIB, &data, false).unwrap();
    }
    let err = c.flush().expect_err("writeback to a full tmpfs fails");
    assert!(err.to_string().contains(&format!("error {EIO}")), "{err}");

    // Room again: the kernel would now report success, the server does not.
    tool_ok(
        "mount",
        &["-o", "remount,size=256M", small.dir.to_str().unwrap()],
    );
    let err = c.flush().expect_err("a flush after a failed one fails");
    assert!(err.to_string().contains(&format!("error {EIO}")), "{err}");
    assert_eq!(write(&mut c, 40 * MIB, &data), EIO, "FUA writes fail too");
    // Reads and plain writes go on; the connection is up.
    c.write(40 * MIB, &data, false).unwrap();
    assert_eq!(c.read(40 * MIB, MIB as u32).unwrap(), data);
    drop(c);
    server.kill();

    // Opened anew, the volume flushes again.
    let server = Server::start(&env, "nbd.sock", &[&device.0]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    c.write(48 * MIB, &data, true).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(server.stop().success());
}
