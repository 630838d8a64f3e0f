//! A header update (`volume rekey`, re-wrapping the key under new material
//! of its CMK or under another CMK) interrupted at any point leaves a
//! volume that opens, with the old header or the new one.
//!
//! The writes and syncs the real command makes are recorded with strace,
//! so the test follows whatever the code does rather than what it is meant
//! to do. A crash after any of them is simulated on a copy of the volume:
//! what was synced is on disk; of the writes since the last sync, any set
//! of 512-byte sectors may have landed (a device reorders freely between
//! flushes), so each interrupted state is tried with none, all, every
//! prefix, every suffix and random sets of their sectors. Each state must
//! read as exactly the old or the new header (LUKS2's two copies and
//! sequence ids), and both of those unlock the same volume key.

mod common;

use std::fs;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{DB, Env};
use nbdcrypt::kms::LocalKms;
use nbdcrypt::volume::{self, luks2::Header};

const SECTOR: usize = 512;

#[derive(Debug)]
enum Op {
    Write(Range<usize>),
    Sync,
}

/// The writes and syncs `nbdcrypt ARGS` makes to `volume`, in order.
fn record(env: &Env, volume: &Path, args: &[&str]) -> Vec<Op> {
    let trace = env.path("trace");
    let traced = std::process::Command::new("strace")
        .args(["-f", "-y", "-qq", "-o", trace.to_str().unwrap()])
        .args(["-e", "trace=write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,sync_file_range,ftruncate,fallocate,copy_file_range"])
        .arg(env!("CARGO_BIN_EXE_nbdcrypt"))
        .args(args)
        .env("NBDCRYPT_KMS_DIR", env.kms_dir())
        .output()
        .expect("strace (scripts/test.sh installs it)");
    assert!(
        traced.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&traced.stderr)
    );
    let marker = format!("<{}>", volume.display());
    let mut ops = Vec::new();
    for line in fs::read_to_string(&trace).unwrap().lines() {
        if !line.contains(&marker) {
            continue;
        }
        let call = line.split_whitespace().nth(1).unwrap();
        if call.starts_with("fdatasync(") || call.starts_with("fsync(") {
            ops.push(Op::Sync);
        } else if call.starts_with("pwrite64(") {
            // pwrite64(FD<path>, "data"..., LEN, OFFSET) = WRITTEN
            let (call, written) = line.rsplit_once(" = ").unwrap();
            let mut fields = call.trim_end_matches(')').rsplitn(3, ", ");
            let offset: usize = fields.next().unwrap().parse().unwrap();
            let len: usize = fields.next().unwrap().parse().unwrap();
            assert_eq!(written.trim().parse::<usize>().unwrap(), len, "{line}");
            ops.push(Op::Write(offset..offset + len));
        } else {
            panic!("the test does not model this call on the volume: {line}");
        }
    }
    ops
}

/// Sector-granular sets of the pending writes' sectors to try as "what
/// landed": none, all, prefixes, suffixes, and pseudo-random sets.
fn landed_sets(sectors: usize, seed: &mut u64) -> Vec<Vec<bool>> {
    let mut sets = Vec::new();
    for k in 0..=sectors {
        sets.push((0..sectors).map(|i| i < k).collect());
        sets.push((0..sectors).map(|i| i >= k).collect());
    }
    for _ in 0..16 {
        sets.push(
            (0..sectors)
                .map(|_| {
                    *seed ^= *seed << 13;
                    *seed ^= *seed >> 7;
                    *seed ^= *seed << 17;
                    *seed & 1 == 1
                })
                .collect(),
        );
    }
    sets
}

fn read_header(file: &fs::File) -> Header {
    Header::read_from(file).expect("the interrupted header still opens")
}

#[test]
fn an_interrupted_rekey_leaves_the_old_or_the_new_header() {
    let env = Env::new();
    env.key("alias/a");
    env.key("alias/b");
    let path = env.volume("r.vol", "4M", "alias/a", "vol-rekey");
    let p = path.to_str().unwrap();
    let scratch_path = env.path("crashed.vol");
    let kms = LocalKms::open(&env.kms_dir()).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut states = 0;

    for args in [
        vec!["volume", "rekey", p, "--db-id", DB],
        vec!["volume", "rekey", p, "--db-id", DB, "--kms-key", "alias/b"],
    ] {
        let old_image = fs::read(&path).unwrap();
        let old = read_header(&fs::File::open(&path).unwrap());
        let ops = record(&env, &path, &args);
        let new_image = fs::read(&path).unwrap();
        let new = read_header(&fs::File::open(&path).unwrap());
        assert!(new.seqid() > old.seqid(), "{args:?} updated the header");
        assert_ne!(new.metadata(), old.metadata());
        let writes: Vec<&Range<usize>> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Write(r) => Some(r),
                Op::Sync => None,
            })
            .collect();
        assert!(!writes.is_empty(), "{args:?} wrote nothing: {ops:?}");
        for (i, a) in writes.iter().enumerate() {
            assert!(a.start % SECTOR == 0 && a.end % SECTOR == 0, "{a:?}");
            for b in &writes[i + 1..] {
                assert!(a.end <= b.start || b.end <= a.start, "overlapping writes");
            }
        }
        // Both ends unlock, to the same key.
        let unlock = |image: &[u8]| {
            fs::write(&scratch_path, image).unwrap();
            let file = fs::File::open(&scratch_path).unwrap();
            volume::unlock(&scratch_path, &file, &kms, DB).unwrap().1
        };
        assert_eq!(unlock(&old_image), unlock(&new_image));

        // A crash after each op: synced writes landed; of the writes since
        // the last sync, any set of sectors did.
        fs::write(&scratch_path, &old_image).unwrap();
        let scratch = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&scratch_path)
            .unwrap();
        for crash in 0..=ops.len() {
            let last_sync = ops[..crash]
                .iter()
                .rposition(|op| matches!(op, Op::Sync))
                .map_or(0, |i| i + 1);
            let durable = ops[..last_sync].iter();
            let pending: Vec<usize> = ops[last_sync..crash]
                .iter()
                .filter_map(|op| match op {
                    Op::Write(r) => Some(r.clone().step_by(SECTOR)),
                    Op::Sync => None,
                })
                .flatten()
                .collect();
            for landed in landed_sets(pending.len(), &mut seed) {
                let mut image = old_image[..new_image.len().min(old_image.len())].to_vec();
                for op in durable.clone() {
                    if let Op::Write(r) = op {
                        image[r.clone()].copy_from_slice(&new_image[r.clone()]);
                    }
                }
                for (&at, &yes) in pending.iter().zip(&landed) {
                    if yes {
                        image[at..at + SECTOR].copy_from_slice(&new_image[at..at + SECTOR]);
                    }
                }
                // Only the written ranges differ between the images.
                for r in &writes {
                    scratch
                        .write_all_at(&image[(*r).clone()], r.start as u64)
                        .unwrap();
                }
                let got = read_header(&scratch);
                assert!(
                    (got.seqid(), got.metadata()) == (old.seqid(), old.metadata())
                        || (got.seqid(), got.metadata()) == (new.seqid(), new.metadata()),
                    "{args:?}, crash after op {crash} of {ops:?}: seqid {} is neither the old header ({}) nor the new ({})",
                    got.seqid(),
                    old.seqid(),
                    new.seqid()
                );
                states += 1;
            }
        }
    }
    assert!(states > 100, "only {states} crash states tried");
}
