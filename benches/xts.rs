//! Sector cipher throughput, one thread, over a 1 MiB buffer: our XTS in both
//! directions at 4096- and 512-byte sectors, beside the ceiling (raw AES-256
//! in ECB, both directions, through the same `aes` backend) and the
//! `xts-mode` crate (one block at a time); and the time of a call for one
//! 4096-byte sector. `scripts/bench.sh` turns the results into GB/s and
//! ratios.

use std::hint::black_box;
use std::time::Duration;

use aes::Aes256;
use aes::cipher::{Block, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nbdcrypt::crypto::SectorCipher;
use nbdcrypt::secret::SecretBytes;
use xts_mode::{Xts128, get_tweak_default};

const BUFFER: usize = 1 << 20;
/// Away from zero so that the sector numbers are not a special case.
const FIRST_SECTOR: u64 = 1 << 33;

fn xts(c: &mut Criterion) {
    let key = SecretBytes::random(SectorCipher::KEY_LEN);
    let mut data = vec![0x5au8; BUFFER];

    let mut group = c.benchmark_group("xts");
    group.throughput(Throughput::Bytes(BUFFER as u64));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    // xts-mode needs milliseconds per iteration; 30 samples fit in the time.
    group.sample_size(30);

    for sector_size in [4096, 512] {
        let cipher = SectorCipher::new(&key, sector_size).expect("valid key and sector size");
        group.bench_function(format!("encrypt/{sector_size}"), |b| {
            b.iter(|| cipher.encrypt(black_box(FIRST_SECTOR), black_box(&mut data)))
        });
        group.bench_function(format!("decrypt/{sector_size}"), |b| {
            b.iter(|| cipher.decrypt(black_box(FIRST_SECTOR), black_box(&mut data)))
        });
    }

    let (data_key, tweak_key) = key.expose().split_at(32);
    let ecb = Aes256::new_from_slice(data_key).expect("32-byte key");
    group.bench_function("aes256-ecb/encrypt", |b| {
        b.iter(|| {
            let (blocks, _) = Block::<Aes256>::slice_as_chunks_mut(black_box(&mut data));
            ecb.encrypt_blocks(blocks)
        })
    });
    group.bench_function("aes256-ecb/decrypt", |b| {
        b.iter(|| {
            let (blocks, _) = Block::<Aes256>::slice_as_chunks_mut(black_box(&mut data));
            ecb.decrypt_blocks(blocks)
        })
    });

    let oracle = Xts128::new(
        Aes256::new_from_slice(data_key).expect("32-byte key"),
        Aes256::new_from_slice(tweak_key).expect("32-byte key"),
    );
    group.bench_function("xts-mode/encrypt/4096", |b| {
        b.iter(|| {
            oracle.encrypt_area(
                black_box(&mut data),
                4096,
                FIRST_SECTOR.into(),
                get_tweak_default,
            )
        })
    });
    group.finish();
}

/// One 4 KiB request, as a 4k random read or write makes it: a call for a
/// single sector pays the per-call costs (the initial tweak, the stack
/// wipe) that a 1 MiB buffer spreads out.
fn request(c: &mut Criterion) {
    let key = SecretBytes::random(SectorCipher::KEY_LEN);
    let cipher = SectorCipher::new(&key, 4096).expect("valid key and sector size");
    let mut data = vec![0x5au8; 4096];
    let mut group = c.benchmark_group("xts-request");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("encrypt/4096", |b| {
        b.iter(|| cipher.encrypt(black_box(FIRST_SECTOR), black_box(&mut data)))
    });
    group.bench_function("decrypt/4096", |b| {
        b.iter(|| cipher.decrypt(black_box(FIRST_SECTOR), black_box(&mut data)))
    });
    group.finish();
}

criterion_group!(benches, xts, request);
criterion_main!(benches);
