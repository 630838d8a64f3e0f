//! AES-XTS on 256-bit VAES, for CPUs with AVX-512 whose 512-bit AES is the
//! slower. The `aes` crate takes its VAES-512 backend on any CPU with
//! AVX-512, and offers no way to choose; but AMD Zen 4 runs 512-bit AES
//! instructions in two halves. On one (1 MiB, one thread), the crate's raw
//! AES-256-ECB ran at 7.3 GiB/s on VAES-512 and at 12.9 GiB/s on its VAES-256
//! backend, and our XTS over the crate at 8.6 GiB/s (4096-byte sectors).
//!
//! Here the round keys are expanded with AES-NI and each group of 32 tweaks
//! goes with its 32 blocks through the rounds in sixteen YMM registers, XORed
//! in on the way into the registers and, folded into the last round key, on
//! the way out. The tweak arithmetic is what limits XTS at this width: the
//! generic pass (`Pass::run`, whose per-lane expansion of each group costs as
//! much as the AES) ran this kernel at 7.0 GiB/s. So only a sector's first
//! group is expanded; each next one is the last times α^32, four vector
//! instructions per two tweaks (shift, carry-less multiply, XOR), which
//! brought it to 10.8 GiB/s. `SectorCipher::new` times both engines on the
//! CPU at hand and keeps the faster.

use core::arch::x86_64::*;

use aes::Block;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::Pass;
use crate::crypto::tweak::{LANES, expand};

/// AES-256 has 14 rounds, so 15 round keys.
const ROUND_KEYS: usize = 15;

/// Stack wiped after every pass of this engine (`SectorCipher::encrypt`),
/// whose broadcast round keys live on the stack: a pass reaches 5.4 KiB in
/// a release build and 10.1 KiB in a debug one. The wipe is one `memset`
/// per call, which a 4 KiB request pays whole: under 4k random reads a
/// 32 KiB wipe took as much of the server's CPU as the decryption (perf),
/// and a call for one 4096-byte sector took 690-715 ns with it, 520-555
/// with this one (8 KiB, too shallow for a debug build: 450-475).
pub(super) const PASS_STACK: usize = 16 * 1024;

/// Whether this CPU has the instructions: AES-NI for the key schedule,
/// VAES for the rounds, VPCLMULQDQ for the tweaks, and AVX-512 (VL, BW)
/// for 32 vector registers and three-way XORs. Where AVX-512 is missing,
/// the crate takes its own 256-bit backend anyway.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// The expanded data key K1: the schedule for encryption and the one of the
/// equivalent inverse cipher for decryption (FIPS 197 §5.3.5). It holds the
/// key itself (the first two round keys), so it is wiped on drop, and it
/// lives inline in the `SectorCipher`, whose memory the volume locks.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct RoundKeys {
    enc: [[u8; 16]; ROUND_KEYS],
    dec: [[u8; 16]; ROUND_KEYS],
}

impl RoundKeys {
    /// # Panics
    /// If the CPU lacks the instructions ([`available`]): a caller bug.
    pub(super) fn new(key: &[u8; 32]) -> Self {
        assert!(available(), "VAES-256 AES on a CPU without it");
        // SAFETY: the CPU has AES-NI (checked above).
        unsafe { expand_key(key) }
    }

    /// Encrypts the pass's sectors in place.
    pub(super) fn encrypt(&self, pass: Pass<'_>) {
        // SAFETY: `new` checked that the CPU has every feature `run` uses.
        unsafe { run::<true>(&self.enc, pass) }
    }

    /// Decrypts the pass's sectors in place.
    pub(super) fn decrypt(&self, pass: Pass<'_>) {
        // SAFETY: as for `encrypt`.
        unsafe { run::<false>(&self.dec, pass) }
    }
}

/// `k ^ (k << 32) ^ (k << 64) ^ (k << 96) ^ t`: a round key of AES-256 from
/// the one two before it, `k`, and the transformed word `t`.
#[target_feature(enable = "aes")]
fn mix(k: __m128i, t: __m128i) -> __m128i {
    let s1 = _mm_slli_si128::<4>(k);
    let s2 = _mm_slli_si128::<4>(s1);
    let s3 = _mm_slli_si128::<4>(s2);
    _mm_xor_si128(
        _mm_xor_si128(k, s1),
        _mm_xor_si128(_mm_xor_si128(s2, s3), t),
    )
}

/// The AES-256 key schedule (FIPS 197 §5.2) by AESKEYGENASSIST, and the
/// decryption schedule from it by AESIMC.
#[target_feature(enable = "aes")]
fn expand_key(key: &[u8; 32]) -> RoundKeys {
    let mut enc = [_mm_setzero_si128(); ROUND_KEYS];
    // SAFETY: both halves are 16 bytes; the loads are unaligned ones.
    let (mut a, mut b) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key[16..].as_ptr().cast()),
        )
    };
    enc[0] = a;
    enc[1] = b;
    // Round keys 2i and 2i + 1 from the two before, with the round constant
    // of step i; the last step makes only key 14.
    macro_rules! even {
        ($i:literal, $rcon:literal) => {
            a = mix(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            enc[$i] = a;
        };
    }
    macro_rules! pair {
        ($($i:literal $rcon:literal),*) => {$(
            even!($i, $rcon);
            b = mix(b, _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)));
            enc[$i + 1] = b;
        )*};
    }
    pair!(2 0x01, 4 0x02, 6 0x04, 8 0x08, 10 0x10, 12 0x20);
    even!(14, 0x40);
    let mut dec = [_mm_setzero_si128(); ROUND_KEYS];
    dec[0] = enc[ROUND_KEYS - 1];
    for i in 1..ROUND_KEYS - 1 {
        dec[i] = _mm_aesimc_si128(enc[ROUND_KEYS - 1 - i]);
    }
    dec[ROUND_KEYS - 1] = enc[0];
    let bytes = |keys: &[__m128i; ROUND_KEYS]| {
        // SAFETY: __m128i and [u8; 16] have the same size, any bits valid.
        keys.map(|k| unsafe { std::mem::transmute::<__m128i, [u8; 16]>(k) })
    };
    RoundKeys {
        enc: bytes(&enc),
        dec: bytes(&dec),
    }
}

/// The pass with these round keys, `ENCRYPT` choosing the direction: each
/// group of tweaks goes with one batch of blocks through [`rounds`], which
/// XORs them in on the way into the registers and out of them.
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,avx512f,avx512vl,avx512bw")]
fn run<const ENCRYPT: bool>(keys: &[[u8; 16]; ROUND_KEYS], pass: Pass<'_>) {
    // SAFETY: each key is 16 bytes; the loads are unaligned ones.
    let wide =
        keys.map(|k| unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(k.as_ptr().cast())) });
    let mut tweaks = [Block::default(); LANES];
    for (sector, start) in pass
        .blocks
        .chunks_mut(pass.blocks_per_sector)
        .zip(pass.starts)
    {
        expand(u128::from_le_bytes(start.0), &mut tweaks);
        let (batches, tail) = sector.as_chunks_mut::<LANES>();
        assert!(tail.is_empty(), "sectors are whole tweak groups");
        for (i, batch) in batches.iter_mut().enumerate() {
            if i > 0 {
                next_group(&mut tweaks);
            }
            rounds::<ENCRYPT>(&wide, batch, &tweaks);
        }
    }
}

/// Each tweak times α^32: a shift by 32 bits within each 128-bit lane, and
/// the 32 bits shifted out reduced by a carry-less multiplication by the
/// polynomial's low terms (x^7 + x^2 + x + 1).
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,avx512f,avx512vl,avx512bw")]
fn next_group(tweaks: &mut [Block; LANES]) {
    let ptr: *mut __m256i = tweaks.as_mut_ptr().cast();
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    for i in 0..LANES / 2 {
        // SAFETY: 32 blocks are 16 registers; unaligned loads and stores.
        unsafe {
            let t = _mm256_loadu_si256(ptr.add(i));
            let out = _mm256_srli_si256::<12>(t);
            let reduced = _mm256_clmulepi64_epi128::<0x00>(out, poly);
            _mm256_storeu_si256(
                ptr.add(i),
                _mm256_xor_si256(_mm256_slli_si256::<4>(t), reduced),
            );
        }
    }
}

/// 32 blocks through XTS: whitened with their tweaks, all rounds, round by
/// round so that sixteen independent AES instructions cover each one's
/// latency, and the tweaks again, folded into the last round key.
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,avx512f,avx512vl,avx512bw")]
fn rounds<const ENCRYPT: bool>(
    keys: &[__m256i; ROUND_KEYS],
    blocks: &mut [Block; LANES],
    tweaks: &[Block; LANES],
) {
    let ptr: *mut __m256i = blocks.as_mut_ptr().cast();
    let tw: *const __m256i = tweaks.as_ptr().cast();
    // SAFETY: 32 blocks of 16 bytes are 16 registers of 32; the loads and
    // stores are unaligned ones.
    let mut x: [__m256i; LANES / 2] = std::array::from_fn(|i| unsafe {
        _mm256_xor_si256(
            _mm256_xor_si256(
                _mm256_loadu_si256(ptr.add(i)),
                _mm256_loadu_si256(tw.add(i)),
            ),
            keys[0],
        )
    });
    for key in &keys[1..ROUND_KEYS - 1] {
        for v in &mut x {
            *v = if ENCRYPT {
                _mm256_aesenc_epi128(*v, *key)
            } else {
                _mm256_aesdec_epi128(*v, *key)
            };
        }
    }
    for (i, v) in x.iter().enumerate() {
        // SAFETY: as for the loads.
        unsafe {
            let last = _mm256_xor_si256(keys[ROUND_KEYS - 1], _mm256_loadu_si256(tw.add(i)));
            let out = if ENCRYPT {
                _mm256_aesenclast_epi128(*v, last)
            } else {
                _mm256_aesdeclast_epi128(*v, last)
            };
            _mm256_storeu_si256(ptr.add(i), out);
        }
    }
}
