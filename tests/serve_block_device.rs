//! A volume zeroes and discards only as its storage can. NBD's FAST_ZERO
//! promises a zeroing quicker than a write, or an ENOTSUP before anything
//! changes; a device that cannot zero by itself has the kernel write the
//! zeros, which is no quicker. TRIM is advisory, so storage that takes no
//! discards leaves the range as it is, without an error.
//!
//! Two loop devices: one over a file of the test's own file system, which
//! zeroes and discards by punching holes in it, and one over a file on a
//! ramfs, which has no `fallocate` and so can do neither. And a volume file
//! on that ramfs, where the server finds out on the first hole it tries.
//!
//! Needs root (losetup, mount), as scripts/test.sh runs it.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::client::Client;
use common::{Env, Loop, Mount, Server, create_args, s};
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags};

const KIB: u64 = 1024;
const ENOTSUP: u32 = 95;

/// Sends one request without payload and returns its NBD error value.
fn request(c: &mut Client, command: Command, flags: CommandFlags, offset: u64, len: u64) -> u32 {
    c.send(command, flags, 1, offset, len as u32, &[]).unwrap();
    c.push().unwrap();
    c.reply(|_| 0).unwrap().error
}

/// Whether `len` bytes of the device at `offset` are all zeros.
fn raw_zeros(device: &Loop, offset: u64, len: u64) -> bool {
    let mut raw = vec![1u8; len as usize];
    File::open(&device.0)
        .unwrap()
        .read_exact_at(&mut raw, offset)
        .unwrap();
    raw.iter().all(|&b| b == 0)
}

#[test]
fn fast_zero_and_trim_follow_what_the_device_can_do() {
    let env = Env::new();
    env.key("alias/device");
    let ram = Mount::ramfs(&env, "ram");
    for (file, offloads) in [
        (env.path("disk.img"), true),
        (ram.dir.join("disk.img"), false),
    ] {
        File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .unwrap();
        let device = Loop::new(&file);
        assert_eq!(
            (
                device.limit("write_zeroes_max_bytes") > 0,
                device.limit("discard_max_bytes") > 0
            ),
            (offloads, offloads),
            "the fixture: {}",
            file.display()
        );
        env.ok(&create_args(&device.0, "32M", "alias/device", "vol-device"));
        let info: serde_json::Value =
            serde_json::from_str(&env.ok(&["volume", "inspect", "--json", &device.0])).unwrap();
        let data_offset = info["data_offset"].as_u64().unwrap();
        let server = Server::start(&env, "nbd.sock", &["--allow-discards", &device.0]);
        let mut c = Client::connect(&server.socket, "").unwrap();
        let data = common::random_bytes(768 * KIB as usize);
        c.write(0, &data, true).unwrap();

        // FAST_ZERO: done by the device, or refused with nothing changed.
        let fast = request(
            &mut c,
            Command::WRITE_ZEROES,
            CommandFlags::FAST_ZERO,
            0,
            256 * KIB,
        );
        let first = c.read(0, 256 * KIB as u32).unwrap();
        if offloads {
            assert_eq!(fast, 0, "a device that zeroes by itself zeroes fast");
            assert!(first.iter().all(|&b| b == 0), "reads as zeros");
            assert!(
                raw_zeros(&device, data_offset, 256 * KIB),
                "zeroed on the device, not written as encrypted zeros"
            );
        } else {
            assert_eq!(fast, ENOTSUP, "the kernel would write the zeros: not fast");
            assert_eq!(
                first,
                data[..256 * KIB as usize],
                "refused, nothing changed"
            );
        }

        // Without FAST_ZERO every device zeroes, one way or the other.
        let zero = request(
            &mut c,
            Command::WRITE_ZEROES,
            CommandFlags(0),
            256 * KIB,
            256 * KIB,
        );
        assert_eq!(zero, 0, "{}", file.display());
        let second = c.read(256 * KIB, 256 * KIB as u32).unwrap();
        assert!(second.iter().all(|&b| b == 0), "{}", file.display());

        // TRIM succeeds either way; the rest of the volume is untouched.
        let trim = request(&mut c, Command::TRIM, CommandFlags(0), 512 * KIB, 256 * KIB);
        assert_eq!(trim, 0, "TRIM is advisory: {}", file.display());
        c.flush().unwrap();
        if offloads {
            assert!(
                raw_zeros(&device, data_offset + 512 * KIB, 256 * KIB),
                "discarded on the device"
            );
        }
        drop(c);
        assert!(server.stop().success());
        let server = Server::start(&env, "nbd.sock", &[&device.0]);
        let mut c = Client::connect(&server.socket, "").unwrap();
        if !offloads {
            assert_eq!(
                c.read(512 * KIB, 256 * KIB as u32).unwrap(),
                data[512 * KIB as usize..],
                "a device without discards keeps the trimmed range"
            );
        }
        assert_eq!(
            c.read(0, 512 * KIB as u32).unwrap(),
            [&first[..], &second[..]].concat(),
            "what was zeroed, or refused, is the same after a restart"
        );
        drop(c);
        assert!(server.stop().success());
    }
}

/// A file system that punches no holes (NFS before v4.2, FAT; here a
/// ramfs): zeroing writes encrypted zeros instead, TRIM does nothing, and
/// once the server knows, FAST_ZERO is refused.
#[test]
fn a_file_system_without_holes_gets_zeros_written() {
    let env = Env::new();
    env.key("alias/device");
    let ram = Mount::ramfs(&env, "ram");
    let path = ram.dir.join("v.vol");
    env.ok(&create_args(s(&path), "32M", "alias/device", "vol-ramfs"));
    let server = Server::start(&env, "nbd.sock", &["--allow-discards", s(&path)]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    let data = common::random_bytes(768 * KIB as usize);
    c.write(0, &data, true).unwrap();

    let zero = request(&mut c, Command::WRITE_ZEROES, CommandFlags(0), 0, 256 * KIB);
    assert_eq!(zero, 0, "zeros written instead of a hole");
    let trim = request(&mut c, Command::TRIM, CommandFlags(0), 256 * KIB, 256 * KIB);
    assert_eq!(trim, 0, "TRIM is advisory");
    let fast = request(
        &mut c,
        Command::WRITE_ZEROES,
        CommandFlags::FAST_ZERO,
        512 * KIB,
        256 * KIB,
    );
    assert_eq!(fast, ENOTSUP, "known now: no hole can be punched");
    c.flush().unwrap();
    drop(c);
    assert!(server.stop().success());

    let server = Server::start(&env, "nbd.sock", &[s(&path)]);
    let mut c = Client::connect(&server.socket, "").unwrap();
    let read = c.read(0, 768 * KIB as u32).unwrap();
    let zeros = vec![0u8; 256 * KIB as usize];
    let expected = [&zeros[..], &data[256 * KIB as usize..]].concat();
    assert_eq!(
        read, expected,
        "zeroed, trimmed (untouched), refused (untouched)"
    );
    drop(c);
    assert!(server.stop().success());
}
