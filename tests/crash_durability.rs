//! Durability under `kill -9`: `nbdcrypt serve` is killed at random moments
//! while clients write, and after every restart each volume holds exactly
//! what NBD promises.
//!
//! What NBD promises (proto.md, "Ordering of messages and writes"): a write
//! is durable once a FLUSH sent after its reply has completed, or once its
//! own reply arrives if it carried FUA. Everything else, acknowledged or
//! still in flight when the server died, may read back old or new; never
//! anything else, and never a mix within a sector, the unit of encryption
//! (a torn sector would decrypt to noise).
//!
//! The clients keep a model of each volume: the content that is durable
//! and, over it, the writes not yet known durable (kept byte-disjoint, so
//! that any subset of them landing is one state). Writes are aligned and
//! unaligned (read-modify-write of partial sectors), several share a sector
//! in one batch, and they are pipelined, so the server has many in flight
//! when it dies. After each restart every sector is checked against the
//! model and the model takes what the volume now holds.
//!
//! SIGKILL loses no page cache, so this proves the server acknowledges
//! nothing it has not handed to the kernel, tears no sector, and keeps its
//! header intact; the fdatasync ordering behind FLUSH on power loss is not
//! something a process kill can show.
//!
//! `NBDCRYPT_CRASH_KILLS` (default 60) and `NBDCRYPT_CRASH_SEED` tune a run.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::client::{Client, is_disconnect};
use common::{Env, Server};
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags};

/// xorshift64*: small, seedable, good enough to pick offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// A write not yet known durable.
struct Patch {
    offset: u64,
    data: Vec<u8>,
}

impl Patch {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// What a volume must hold after a crash.
struct Model {
    export: String,
    sector: u64,
    durable: Vec<u8>,
    /// Byte-disjoint.
    patches: Vec<Patch>,
}

impl Model {
    fn free(&self, offset: u64, len: u64) -> bool {
        self.patches
            .iter()
            .all(|p| offset + len <= p.offset || p.end() <= offset)
    }

    /// The volume as the server must show it now: every write applied.
    fn current(&self) -> Vec<u8> {
        let mut v = self.durable.clone();
        for p in &self.patches {
            v[p.offset as usize..p.end() as usize].copy_from_slice(&p.data);
        }
        v
    }

    fn make_durable(&mut self, index: usize) {
        let p = self.patches.swap_remove(index);
        self.durable[p.offset as usize..p.end() as usize].copy_from_slice(&p.data);
    }

    /// Checks what a restarted server reads against the model, sector by
    /// sector, then adopts it as the new durable state.
    fn check_after_crash(&mut self, actual: Vec<u8>, kill: usize) {
        assert_eq!(actual.len(), self.durable.len());
        let mut covered = vec![false; actual.len()];
        for p in &self.patches {
            // Each piece of the write within one sector is old or new.
            let mut at = p.offset;
            while at < p.end() {
                let piece_end = ((at / self.sector + 1) * self.sector).min(p.end());
                let range = at as usize..piece_end as usize;
                let new = &p.data[(at - p.offset) as usize..(piece_end - p.offset) as usize];
                assert!(
                    actual[range.clone()] == self.durable[range.clone()]
                        || &actual[range.clone()] == new,
                    "kill {kill}, export {}: bytes {range:?} of an unflushed write are neither old nor new",
                    self.export
                );
                covered[range].fill(true);
                at = piece_end;
            }
        }
        if let Some(bad) = (0..actual.len()).find(|&i| !covered[i] && actual[i] != self.durable[i])
        {
            let sector = bad as u64 / self.sector;
            panic!(
                "kill {kill}, export {}: byte {bad} (sector {sector}) lost a durable write or was torn: {:#x} instead of {:#x}",
                self.export, actual[bad], self.durable[bad]
            );
        }
        self.durable = actual;
        self.patches.clear();
    }

    /// A write that touches no byte of a pending one: aligned, unaligned
    /// across sectors, or a few bytes inside one sector (several of which
    /// then share a sector and race through read-modify-write).
    fn pick(&self, rng: &mut Rng) -> Option<(u64, usize)> {
        let size = self.durable.len() as u64;
        for _ in 0..20 {
            // Half the writes land in a hot region, so sectors are shared.
            let span = if rng.below(2) == 0 { 64 << 10 } else { size };
            let (offset, len) = match rng.below(3) {
                0 => {
                    let sectors = 1 + rng.below(16);
                    let offset = rng.below(span / self.sector) * self.sector;
                    (offset, sectors * self.sector)
                }
                1 => (rng.below(span), 1 + rng.below(3 * self.sector + 7)),
                _ => (rng.below(span), 1 + rng.below(64)),
            };
            let len = len.min(size - offset);
            if self.free(offset, len) {
                return Some((offset, len as usize));
            }
        }
        None
    }
}

/// Drives one connection until the server dies: batches of pipelined
/// writes (some FUA, some write-zeroes), their replies, often a flush, and
/// a read-back of everything the server has acknowledged.
fn drive(socket: &std::path::Path, model: &mut Model, rng: &mut Rng) -> usize {
    let mut acked = 0;
    let mut run = || -> std::io::Result<()> {
        let mut client = Client::connect(socket, &model.export)?;
        assert_eq!(client.size, model.durable.len() as u64);
        let mut cookie = 0u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mut fua = HashSet::new();
            let mut sent: HashMap<u64, (u64, usize)> = HashMap::new();
            for _ in 0..1 + rng.below(16) {
                let Some((offset, len)) = model.pick(rng) else {
                    break;
                };
                cookie += 1;
                let zeroes = rng.below(8) == 0;
                let data = if zeroes { vec![0; len] } else { rng.bytes(len) };
                let flags = if rng.below(4) == 0 {
                    fua.insert(cookie);
                    CommandFlags::FUA
                } else {
                    CommandFlags::EMPTY
                };
                if zeroes {
                    client.send(
                        Command::WRITE_ZEROES,
                        flags,
                        cookie,
                        offset,
                        len as u32,
                        &[],
                    )?;
                } else {
                    client.send(Command::WRITE, flags, cookie, offset, len as u32, &data)?;
                }
                sent.insert(cookie, (offset, len));
                model.patches.push(Patch { offset, data });
            }
            client.push()?;
            let mut durable_now = Vec::new();
            for _ in 0..sent.len() {
                let reply = client.reply(|_| 0)?;
                assert_eq!(reply.error, 0, "write {:?} failed", sent.get(&reply.cookie));
                acked += 1;
                if fua.contains(&reply.cookie) {
                    let (offset, _) = sent[&reply.cookie];
                    durable_now.push(offset);
                }
            }
            // FUA writes are durable on their reply.
            for offset in durable_now {
                let i = model
                    .patches
                    .iter()
                    .position(|p| p.offset == offset)
                    .unwrap();
                model.make_durable(i);
            }
            // Every write of the batch is acknowledged: a read sees them all.
            let at = rng.below(model.durable.len() as u64 - 65536);
            let got = client.read(at, 65536)?;
            assert_eq!(
                got,
                model.current()[at as usize..at as usize + 65536],
                "export {}: a read after the replies does not show the writes",
                model.export
            );
            if rng.below(2) == 0 || model.patches.len() > 48 {
                client.flush()?;
                for i in (0..model.patches.len()).rev() {
                    model.make_durable(i);
                }
            }
        }
        panic!("the server was not killed within 20 s");
    };
    match run() {
        Ok(()) => unreachable!(),
        Err(e) if is_disconnect(&e) => acked,
        Err(e) => panic!("export {}: {e}", model.export),
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

#[test]
fn acknowledged_flushed_writes_survive_kill_9() {
    let kills = env_number("NBDCRYPT_CRASH_KILLS", 60) as usize;
    let seed = env_number(
        "NBDCRYPT_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("crash test: {kills} kills, NBDCRYPT_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);

    let env = Env::new();
    env.key("alias/crash");
    let size = 4u64 << 20;
    let mut volumes = Vec::new();
    for (name, sector, vol_id) in [("a.vol", 4096, "vol-a4096"), ("b.vol", 512, "vol-b512")] {
        let path = env.path(name);
        env.ok(&[
            "volume",
            "create",
            path.to_str().unwrap(),
            "--size",
            &size.to_string(),
            "--sector-size",
            &sector.to_string(),
            "--kms-key",
            "alias/crash",
            "--db-id",
            common::DB,
            "--vol-id",
            vol_id,
        ]);
        volumes.push(path.to_str().unwrap().to_owned());
    }
    let mut models: Vec<Model> = [("vol-a4096", 4096), ("vol-b512", 512)]
        .into_iter()
        .map(|(export, sector)| Model {
            export: export.into(),
            sector,
            durable: vec![0; size as usize],
            patches: Vec::new(),
        })
        .collect();
    let args: Vec<&str> = volumes.iter().map(String::as_str).collect();

    let started = Instant::now();
    let (mut acked, mut unsettled) = (0, 0);
    for kill in 0..kills {
        let server = Server::start(&env, "nbd.sock", &args);
        if kill > 0 {
            for model in &mut models {
                let mut client = Client::connect(&server.socket, &model.export).unwrap();
                model.check_after_crash(client.read_all(1 << 20).unwrap(), kill);
            }
        }
        // The kill comes at a random moment of the traffic, sometimes at once.
        let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
        let delay = Duration::from_millis(rng.below(150));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        });
        let socket = server.socket.clone();
        let seeds: Vec<u64> = models.iter().map(|_| rng.next() | 1).collect();
        let counts: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = models
                .iter_mut()
                .zip(seeds)
                .map(|(model, seed)| {
                    let socket = &socket;
                    s.spawn(move || drive(socket, model, &mut Rng(seed)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        acked += counts.iter().sum::<usize>();
        unsettled += models.iter().map(|m| m.patches.len()).sum::<usize>();
        // The pid is reaped only after the killer has used it.
        killer.join().unwrap();
        server.kill();
    }
    let server = Server::start(&env, "nbd.sock", &args);
    for model in &mut models {
        let mut client = Client::connect(&server.socket, &model.export).unwrap();
        model.check_after_crash(client.read_all(1 << 20).unwrap(), kills);
    }
    assert!(server.stop().success());
    eprintln!(
        "crash test: {kills} kills in {:?}; {acked} writes acknowledged, {unsettled} unflushed or in flight at a kill",
        started.elapsed()
    );
    assert!(acked > kills, "the clients barely wrote: {acked} writes");
}
