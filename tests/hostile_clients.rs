//! 200 hostile clients at once against one `nbdcrypt serve`: slow ones
//! (one byte a second, in the handshake and in a write's payload), ones that
//! vanish mid-payload, ones that announce 4 GiB lengths, ones that send
//! garbage, and ones that flood maximal reads without ever reading a reply.
//! Meanwhile well-behaved clients keep writing and reading back, and must
//! see every byte right; the server's memory stays under the bound its
//! limits give; and once the hostile clients are gone the server holds no
//! more descriptors (so no connection or task) than before they came.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::Client;
use common::{Env, Server};
use nbdcrypt::nbd::proto::transmission::RequestHeader;
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags, IHAVEOPT, OptionCode};

const MIB: u64 = 1 << 20;

/// A field of /proc/PID/status, in kB (or a count).
fn status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn request(command: Command, offset: u64, length: u32) -> [u8; RequestHeader::LEN] {
    RequestHeader {
        flags: CommandFlags::EMPTY,
        command,
        cookie: 7,
        offset,
        length,
    }
    .encode()
}

/// A raw connection past `NBD_OPT_GO` to the default export, with the
/// replies of the handshake read.
fn transmission(socket: &Path) -> UnixStream {
    let client = Client::connect(socket, "").unwrap();
    client.into_stream()
}

/// Whether the server closes the connection within `within` (reads EOF or
/// a reset after draining whatever it sent).
fn closed_by_server(stream: &mut UnixStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The hostile kinds, 200 clients in all; each returns once it has done its
/// harm, holding its socket until `release` is set.
fn hostile(kind: usize, socket: &Path, release: &AtomicBool, size: u64) {
    let hold = |stream: UnixStream| {
        while !release.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(stream);
    };
    match kind {
        // Slow in the handshake: a byte a second. The handshake deadline
        // (10 s) must close it.
        0 => {
            let mut s = UnixStream::connect(socket).unwrap();
            let mut greeting = [0; 18];
            s.read_exact(&mut greeting).unwrap();
            let mut bytes = 3u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
            let started = Instant::now();
            for b in bytes {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            assert!(
                closed_by_server(&mut s, Duration::from_secs(15)),
                "a client stuck in the handshake was not disconnected"
            );
            assert!(started.elapsed() < Duration::from_secs(20));
        }
        // Slow in a write's payload: a byte a second, for as long as the
        // test runs. NBD has no request deadline; it just holds its slot.
        1 => {
            let mut s = transmission(socket);
            s.write_all(&request(Command::WRITE, 0, MIB as u32))
                .unwrap();
            while !release.load(Ordering::SeqCst) {
                if s.write_all(&[0x55]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        // Vanishes in the middle of a write's payload.
        2 => {
            let mut s = transmission(socket);
            s.write_all(&request(Command::WRITE, 0, 4 * MIB as u32))
                .unwrap();
            s.write_all(&vec![0xee; 100_000]).unwrap();
        }
        // A 4 GiB option: refused without being read; the server hangs up.
        3 => {
            let mut s = UnixStream::connect(socket).unwrap();
            let mut greeting = [0; 18];
            s.read_exact(&mut greeting).unwrap();
            let mut msg = 3u32.to_be_bytes().to_vec();
            msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
            msg.extend_from_slice(&OptionCode::GO.0.to_be_bytes());
            msg.extend_from_slice(&u32::MAX.to_be_bytes());
            msg.extend_from_slice(&[0; 4096]);
            let _ = s.write_all(&msg);
            assert!(closed_by_server(&mut s, Duration::from_secs(15)));
        }
        // A 4 GiB write: refused, and its payload drained as it comes
        // without being stored; the client sends some and then sits.
        4 => {
            let mut s = transmission(socket);
            s.write_all(&request(Command::WRITE, 0, u32::MAX)).unwrap();
            s.write_all(&vec![0xab; 8 * MIB as usize]).unwrap();
            hold(s);
        }
        // 4 GiB reads, trims and zeroes: refused with an error each.
        5 => {
            let mut c = Client::connect(socket, "").unwrap();
            for (i, command) in [Command::READ, Command::TRIM, Command::WRITE_ZEROES]
                .into_iter()
                .enumerate()
            {
                let offset = if i == 0 { 0 } else { size - 4096 };
                c.send(command, CommandFlags::EMPTY, 1, offset, u32::MAX, &[])
                    .unwrap();
                c.push().unwrap();
                let reply = c.reply(|_| 0).unwrap();
                assert_ne!(reply.error, 0, "{command:?} of 4 GiB was not refused");
            }
            hold(c.into_stream());
        }
        // Garbage instead of the handshake: the server hangs up.
        6 => {
            let mut s = UnixStream::connect(socket).unwrap();
            let _ = s.write_all(&common::random_bytes(4096));
            assert!(closed_by_server(&mut s, Duration::from_secs(15)));
        }
        // Garbage instead of requests: the server hangs up.
        7 => {
            let mut s = transmission(socket);
            let _ = s.write_all(&common::random_bytes(4096));
            assert!(closed_by_server(&mut s, Duration::from_secs(15)));
        }
        // Floods maximal reads and never reads a reply: holds its
        // in-flight bound and its replies in the socket.
        8 => {
            let mut s = transmission(socket);
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            for i in 0..16u64 {
                let at = (i * 32 * MIB) % (size - 32 * MIB);
                if s.write_all(&request(Command::READ, at, 32 * MIB as u32))
                    .is_err()
                {
                    break;
                }
            }
            hold(s);
        }
        // Reads a maximal buffer once, takes the reply, then idles: what it
        // leaves behind is kept for reuse.
        _ => {
            let mut c = Client::connect(socket, "").unwrap();
            c.read(0, 32 * MIB as u32).unwrap();
            hold(c.into_stream());
        }
    }
}

/// How many of each kind (index = kind): 200 in all.
const MIX: [usize; 10] = [30, 30, 20, 20, 20, 20, 15, 15, 15, 15];

#[test]
fn two_hundred_hostile_clients_do_not_hurt_the_good_ones() {
    assert_eq!(MIX.iter().sum::<usize>(), 200);
    let env = Env::new();
    env.key("alias/hostile");
    let size = 256 * MIB;
    let volume = env.volume("h.vol", "256M", "alias/hostile", "vol-hostile");
    let server = Server::start(
        &env,
        "nbd.sock",
        &[
            volume.to_str().unwrap(),
            "--max-connections",
            "256",
            "--max-inflight-total",
            "256M",
            "--reply-timeout",
            "2",
        ],
    );
    let pid = server.child.id();
    let socket = server.socket.clone();

    // Warm up: one connection's worth of everything, then the baseline.
    {
        let mut c = Client::connect(&socket, "").unwrap();
        c.write(0, &[1; 4096], true).unwrap();
        c.read(0, 4096).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (base_fds, base_rss) = (open_fds(pid), status(pid, "VmRSS:"));

    let release = Arc::new(AtomicBool::new(false));
    let stop_good = Arc::new(AtomicBool::new(false));
    let good_ops = Arc::new(AtomicU64::new(0));

    // Four well-behaved clients, each in its own 16 MiB region at the end
    // of the volume, where no hostile write lands.
    let good: Vec<_> = (0..4u64)
        .map(|i| {
            let (socket, stop, ops) = (socket.clone(), stop_good.clone(), good_ops.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket, "").unwrap();
                let region = size - (i + 1) * 16 * MIB;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let data = common::random_bytes(65536 + n as usize % 3000);
                    let at = region + (n * 70_001) % (15 * MIB);
                    c.write(at, &data, n.is_multiple_of(8)).unwrap();
                    assert_eq!(c.read(at, data.len() as u32).unwrap(), data);
                    if n.is_multiple_of(16) {
                        c.flush().unwrap();
                    }
                    n += 1;
                    ops.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let mut hostiles = Vec::new();
    for (kind, &count) in MIX.iter().enumerate() {
        for _ in 0..count {
            let (socket, release) = (socket.clone(), release.clone());
            hostiles.push(std::thread::spawn(move || {
                hostile(kind, &socket, &release, size)
            }));
        }
    }

    // Twelve seconds under attack, long enough for the handshake deadline.
    let rss = Mutex::new(Vec::new());
    let started = Instant::now();
    let mut ops_before = 0;
    while started.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(500));
        rss.lock().unwrap().push(status(pid, "VmRSS:"));
        let ops = good_ops.load(Ordering::SeqCst);
        ops_before = ops_before.max(ops);
    }
    let ops_during = good_ops.load(Ordering::SeqCst);
    release.store(true, Ordering::SeqCst);
    for h in hostiles {
        h.join().unwrap();
    }
    stop_good.store(true, Ordering::SeqCst);
    for g in good {
        g.join().unwrap();
    }
    let hwm = status(pid, "VmHWM:");
    let samples = rss.into_inner().unwrap();
    eprintln!(
        "hostile clients: baseline RSS {base_rss} kB, {base_fds} fds; RSS during {samples:?} kB; high-water mark {hwm} kB; {ops_during} good round trips under attack"
    );
    assert!(
        ops_during > 20,
        "the good clients were starved: {ops_during} round trips"
    );
    // The bound the limits give: the server-wide in-flight bytes (256 MiB
    // here), idle pooled buffers (half as much), and per connection its
    // read and write buffers and at most one handshake option (64 KiB
    // each), plus 32 MiB for the runtime, its threads and the allocator.
    let bound_kb = base_rss + (256 + 128 + 32) * 1024 + 201 * 3 * 64;
    assert!(
        hwm <= bound_kb,
        "the server's memory peaked at {hwm} kB, over the {bound_kb} kB its limits allow"
    );

    // Every hostile connection is gone: the server's descriptors come back
    // to the baseline (a leaked connection or task would hold its socket).
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds(pid) > base_fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(open_fds(pid), base_fds, "connections leaked");
    // And it still serves.
    let mut c = Client::connect(&socket, "").unwrap();
    c.read(0, 4096).unwrap();
    drop(c);
    assert!(server.stop().success());
}
