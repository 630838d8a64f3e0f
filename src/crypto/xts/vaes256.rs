//! AES-XTS on 256-bit VAES, in two builds: one for CPUs with AVX-512 whose
//! 512-bit AES is the slower, one for CPUs with VAES but no AVX-512.
//!
//! With AVX-512: the `aes` crate takes its VAES-512 backend on any CPU with
//! AVX-512, and offers no way to choose; but AMD Zen 4 runs 512-bit AES
//! instructions in two halves. On one (1 MiB, one thread), the crate's raw
//! AES-256-ECB ran at 7.3 GiB/s on VAES-512 and at 12.9 GiB/s on its VAES-256
//! backend, and our XTS over the crate at 8.6 GiB/s (4096-byte sectors).
//!
//! Without it (AMD Zen 3): the crate's VAES-256 backend ran raw AES-256-ECB
//! at 5.5 GiB/s and our XTS over it at 2.9 GiB/s, where the CPU issues two
//! 256-bit AES instructions per cycle (12.7 GiB/s of AES-256). Its 16 YMM
//! registers do not hold 16 blocks and 15 round keys at once, and the
//! compiler then ran each register through all rounds before the next: a
//! chain of 14 dependent instructions, each waiting out the latency of the
//! one before: the AVX-512 build's code, compiled for AVX2, ran at 6.0
//! GiB/s. This build takes eight registers (16 blocks) at a time, the round
//! keys as memory operands, and keeps the rounds in order with an empty
//! `asm!` per instruction: 8.6-9.2 GiB/s, and 9.1-9.5 with the next group's
//! tweaks computed in the same pass (`rounds`).
//!
//! Both expand the round keys with AES-NI and send each group of 32 tweaks
//! with its 32 blocks through the rounds, XORed in on the way into the
//! registers and, folded into the last round key, on the way out. The tweak
//! arithmetic is what limits XTS at this width: the generic pass
//! (`Pass::run`, whose per-lane expansion of each group costs as much as the
//! AES) ran the AVX-512 build at 7.0 GiB/s. So only a sector's first group
//! is expanded; each next one is the last times α^32, four vector
//! instructions per two tweaks (shift, carry-less multiply, XOR), which
//! brought it to 10.8 GiB/s on Zen 4, before the AVX2 build reshaped
//! `rounds` (the AVX-512 build still runs 16 registers round by round, one
//! round key load per round; not measured on Zen 4 since).
//! `SectorCipher::new` times the engines on the CPU at hand and keeps the
//! fastest.

use core::arch::asm;
use core::arch::x86_64::*;

use aes::Block;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::Pass;
use crate::crypto::tweak::{LANES, expand};
use crate::secret::scrub_stack_bytes;

/// AES-256 has 14 rounds, so 15 round keys.
const ROUND_KEYS: usize = 15;

/// The instruction set an engine build is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// 32 vector registers: the rounds take all 32 blocks of a tweak group
    /// at once, their tweaks kept in registers for the last round.
    Avx512,
    /// 16 vector registers: 16 blocks at a time, the round keys from memory.
    Avx2,
}

impl Isa {
    /// Whether this CPU has the instructions: AES-NI for the key schedule,
    /// VAES for the rounds, VPCLMULQDQ for the tweaks, AVX2 for 256-bit
    /// integer vectors, and for [`Isa::Avx512`] AVX-512 (F, VL, BW).
    pub(super) fn available(self) -> bool {
        let base = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("avx2");
        match self {
            Isa::Avx512 => {
                base && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            Isa::Avx2 => base,
        }
    }
}

/// The expanded data key K1: the schedule for encryption and the one of the
/// equivalent inverse cipher for decryption (FIPS 197 §5.3.5). It holds the
/// key itself (the first two round keys), so it is wiped on drop, and it
/// lives inline in the `SectorCipher`, whose memory the volume locks.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct RoundKeys {
    enc: [[u8; 16]; ROUND_KEYS],
    dec: [[u8; 16]; ROUND_KEYS],
    /// The build that runs them, which `new` checked the CPU has.
    #[zeroize(skip)]
    isa: Isa,
}

impl RoundKeys {
    /// # Panics
    /// If the CPU lacks the instructions ([`Isa::available`]): a caller bug.
    pub(super) fn new(key: &[u8; 32], isa: Isa) -> Self {
        assert!(
            isa.available(),
            "VAES-256 AES ({isa:?}) on a CPU without it"
        );
        // SAFETY: the CPU has AES-NI (checked above).
        let (enc, dec) = unsafe { expand_key(key) };
        RoundKeys { enc, dec, isa }
    }

    pub(super) fn isa(&self) -> Isa {
        self.isa
    }

    /// Wipes the stack below the caller's frame after a pass of this
    /// build, whose broadcast round keys live on the stack. A pass of the
    /// AVX-512 build reaches 5.4 KiB in a release build and 10.1 KiB in a
    /// debug one, of the AVX2 build 2.5 and 3.7: each wipe covers its
    /// build's debug pass with room to spare. The wipe is one `memset` per
    /// call, which a 4 KiB request pays whole: under 4k random reads a 32
    /// KiB wipe took as much of the server's CPU as the decryption (perf).
    /// A call for one 4096-byte sector took, on Zen 4 (AVX-512), 690-715
    /// ns with 32 KiB and 520-555 with 16 KiB; on Zen 3 (AVX2), 680-830 ns
    /// with 16 KiB and 550-590 with 8 KiB (4 KiB: no faster, 520-615).
    #[inline(always)]
    pub(super) fn scrub_pass_stack(&self) {
        match self.isa {
            Isa::Avx512 => scrub_stack_bytes::<{ 16 * 1024 }>(),
            Isa::Avx2 => scrub_stack_bytes::<{ 8 * 1024 }>(),
        }
    }

    /// Encrypts the pass's sectors in place.
    pub(super) fn encrypt(&self, pass: Pass<'_>) {
        // SAFETY: `new` checked that the CPU has every feature of the build.
        unsafe {
            match self.isa {
                Isa::Avx512 => run_avx512::<true>(&self.enc, pass),
                Isa::Avx2 => run::<true, 8>(&self.enc, pass),
            }
        }
    }

    /// Decrypts the pass's sectors in place.
    pub(super) fn decrypt(&self, pass: Pass<'_>) {
        // SAFETY: as for `encrypt`.
        unsafe {
            match self.isa {
                Isa::Avx512 => run_avx512::<false>(&self.dec, pass),
                Isa::Avx2 => run::<false, 8>(&self.dec, pass),
            }
        }
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
fn expand_key(key: &[u8; 32]) -> ([[u8; 16]; ROUND_KEYS], [[u8; 16]; ROUND_KEYS]) {
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
    (bytes(&enc), bytes(&dec))
}

/// The AVX-512 build: `run` and what it calls, inlined here, get all 32
/// vector registers and AVX-512's encodings.
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,avx512f,avx512vl,avx512bw")]
fn run_avx512<const ENCRYPT: bool>(keys: &[[u8; 16]; ROUND_KEYS], pass: Pass<'_>) {
    run::<ENCRYPT, 16>(keys, pass)
}

/// The pass with these round keys, `ENCRYPT` choosing the direction: a
/// sector's first group of tweaks is expanded from its initial tweak, and
/// each group goes with its blocks through [`rounds`], `WIDTH` registers at
/// a time, which also step the tweaks on to the sector's next group.
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes")]
#[inline]
fn run<const ENCRYPT: bool, const WIDTH: usize>(keys: &[[u8; 16]; ROUND_KEYS], pass: Pass<'_>) {
    // A loop, not `array::map`, whose closure lacks the target features
    // and stays an out-of-line call per pass.
    let mut wide = [_mm256_setzero_si256(); ROUND_KEYS];
    for (wide, key) in wide.iter_mut().zip(keys) {
        // SAFETY: each key is 16 bytes; the load is an unaligned one.
        *wide = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(key.as_ptr().cast()) });
    }
    let mut tweaks = [Block::default(); LANES];
    for (sector, start) in pass
        .blocks
        .chunks_mut(pass.blocks_per_sector)
        .zip(pass.starts)
    {
        expand(u128::from_le_bytes(start.0), &mut tweaks);
        let (groups, tail) = sector.as_chunks_mut::<LANES>();
        assert!(tail.is_empty(), "sectors are whole tweak groups");
        let last = groups.len() - 1;
        for (i, group) in groups.iter_mut().enumerate() {
            // One register holds a pair of blocks.
            let (pairs, _) = group.as_chunks_mut::<2>();
            let (tweak_pairs, _) = tweaks.as_chunks_mut::<2>();
            let (slices, _) = pairs.as_chunks_mut::<WIDTH>();
            let (tweak_slices, _) = tweak_pairs.as_chunks_mut::<WIDTH>();
            for (blocks, tweaks) in slices.iter_mut().zip(tweak_slices) {
                rounds::<ENCRYPT, WIDTH>(&wide, blocks, tweaks, i < last);
            }
        }
    }
}

/// `2 * WIDTH` blocks through XTS: whitened with their tweaks, all rounds,
/// round by round so that `WIDTH` independent AES instructions cover each
/// one's latency, and the tweaks again, folded into the last round key.
/// The empty `asm!` after each instruction, which the compiler may not move
/// past another, holds it to that order.
///
/// With `advance`, the tweaks are replaced by those of the next group while
/// they are in registers; stepped in a loop of their own between groups,
/// they took a sixth of the time, and the 4096-byte pass (AVX2 build) ran
/// at 7.9-9.2 GiB/s against 9.2-9.5 this way.
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes")]
#[inline]
fn rounds<const ENCRYPT: bool, const WIDTH: usize>(
    keys: &[__m256i; ROUND_KEYS],
    blocks: &mut [[Block; 2]; WIDTH],
    tweaks: &mut [[Block; 2]; WIDTH],
    advance: bool,
) {
    let t: [__m256i; WIDTH] = std::array::from_fn(|i| load(&tweaks[i]));
    let mut x: [__m256i; WIDTH] = std::array::from_fn(|i| {
        _mm256_xor_si256(_mm256_xor_si256(load(&blocks[i]), t[i]), keys[0])
    });
    if advance {
        for (next, t) in tweaks.iter_mut().zip(&t) {
            store(next, times_alpha_32(*t));
        }
    }
    for key in &keys[1..ROUND_KEYS - 1] {
        for v in &mut x {
            *v = if ENCRYPT {
                _mm256_aesenc_epi128(*v, *key)
            } else {
                _mm256_aesdec_epi128(*v, *key)
            };
            // SAFETY: an empty template; it only names the register.
            unsafe {
                asm!(
                    "/* {0} */",
                    inout(ymm_reg) * v,
                    options(nomem, nostack, preserves_flags)
                )
            };
        }
    }
    for ((out, v), t) in blocks.iter_mut().zip(&x).zip(&t) {
        let last = _mm256_xor_si256(keys[ROUND_KEYS - 1], *t);
        store(
            out,
            if ENCRYPT {
                _mm256_aesenclast_epi128(*v, last)
            } else {
                _mm256_aesdeclast_epi128(*v, last)
            },
        );
    }
}

/// Two tweaks times α^32: a shift by 32 bits within each 128-bit lane, and
/// the 32 bits shifted out reduced by a carry-less multiplication by the
/// polynomial's low terms (x^7 + x^2 + x + 1).
#[target_feature(enable = "avx2,vpclmulqdq")]
#[inline]
fn times_alpha_32(t: __m256i) -> __m256i {
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    let reduced = _mm256_clmulepi64_epi128::<0x00>(_mm256_srli_si256::<12>(t), poly);
    _mm256_xor_si256(_mm256_slli_si256::<4>(t), reduced)
}

#[target_feature(enable = "avx2")]
#[inline]
fn load(pair: &[Block; 2]) -> __m256i {
    // SAFETY: two blocks are 32 bytes; the load is an unaligned one.
    unsafe { _mm256_loadu_si256(pair.as_ptr().cast()) }
}

#[target_feature(enable = "avx2")]
#[inline]
fn store(pair: &mut [Block; 2], v: __m256i) {
    // SAFETY: as for `load`.
    unsafe { _mm256_storeu_si256(pair.as_mut_ptr().cast(), v) }
}
