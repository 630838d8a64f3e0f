//! The volume's data path without the network, one thread: whole-sector
//! reads and writes of 4 KiB and 1 MiB on a 64 MiB volume whose backing file
//! is in the page cache, as the server's requests run them (reads through
//! `read_cached` as on the reactor, and through `read` as on the blocking
//! pool). Each iteration moves to the next offset of a fixed stride, so the
//! cipher sees fresh tweaks and the page cache fresh pages.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nbdcrypt::kms::{CreateKeyRequest, KeySpec, LocalKms};
use nbdcrypt::volume::{AttachOptions, CreateOptions, Volume, create};

const SIZE: u64 = 64 << 20;
const DB: &str = "db-BENCH00000000000000000001";

/// A fresh volume with real ciphertext everywhere, in the page cache.
fn volume(dir: &std::path::Path) -> Volume {
    let kms = LocalKms::open(&dir.join("kms")).expect("a fresh local KMS");
    let key = kms
        .create_key(&CreateKeyRequest {
            description: "bench".into(),
            key_spec: KeySpec::SymmetricDefault,
            key_usage: None,
        })
        .expect("a symmetric key");
    let path = dir.join("bench.vol");
    let opts = CreateOptions {
        size: Some(SIZE),
        sector_size: 4096,
        kms_key: key.key_id,
        db_id: DB.into(),
        vol_id: "vol-bench".into(),
        force: false,
        preallocate: false,
    };
    create(&path, &kms, &opts).expect("a new volume");
    let attach = AttachOptions {
        db_id: DB.into(),
        read_only: false,
        allow_discards: false,
    };
    let vol = Volume::open(&path, &kms, &attach).expect("the volume unlocks");
    let mut fill = vec![0x5au8; 1 << 20];
    for offset in (0..SIZE).step_by(fill.len()) {
        vol.write(offset, &mut fill).expect("prefill");
    }
    vol
}

fn data_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let vol = volume(dir.path());

    let mut group = c.benchmark_group("volume");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    for len in [4096usize, 1 << 20] {
        let label = if len == 4096 { "4k" } else { "1m" };
        let mut buf = vec![0x33u8; len];
        let mut at = 0u64;
        let mut next = move || {
            at = (at + len as u64 * 7) % (SIZE - len as u64) / 4096 * 4096;
            at
        };
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("read_cached/{label}"), |b| {
            b.iter(|| {
                assert!(vol.read_cached(next(), black_box(&mut buf)).unwrap());
            })
        });
        group.bench_function(format!("read/{label}"), |b| {
            b.iter(|| vol.read(next(), black_box(&mut buf)).unwrap())
        });
        group.bench_function(format!("write_cached/{label}"), |b| {
            b.iter(|| {
                assert!(vol.write_cached(next(), black_box(&mut buf)).unwrap());
            })
        });
        group.bench_function(format!("write/{label}"), |b| {
            b.iter(|| vol.write(next(), black_box(&mut buf)).unwrap())
        });
    }
    group.finish();
}

/// The same data path from one thread and from two at once, each on its
/// own half of the volume, as the blocking pool runs one connection's large
/// requests: whether crypto and I/O grow with cores when no client shares
/// them (end to end on two CPUs, the client takes a share).
fn threads(c: &mut Criterion) {
    const LEN: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let vol = volume(dir.path());

    let mut group = c.benchmark_group("volume_threads");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(LEN as u64));
    for write in [false, true] {
        for threads in [1u64, 2] {
            let name = format!("{}/{threads}", if write { "write" } else { "read" });
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let vol = &vol;
                            s.spawn(move || {
                                let mut buf = vec![0x33u8; LEN];
                                let half = SIZE / threads;
                                let slots = half / LEN as u64;
                                for i in (t..iters).step_by(threads as usize) {
                                    let k = i / threads;
                                    let at = t * half + (k * 7 % slots) * LEN as u64;
                                    if write {
                                        vol.write(at, black_box(&mut buf)).unwrap();
                                    } else {
                                        vol.read(at, black_box(&mut buf)).unwrap();
                                    }
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, data_path, threads);
criterion_main!(benches);
