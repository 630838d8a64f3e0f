//! AES-XTS over whole sectors, as dm-crypt and LUKS2 name it
//! `aes-xts-plain64`: a 512-bit key split into the data key K1 and the tweak
//! key K2, and for sector `n` the initial tweak `AES_K2(n)` with `n` as a
//! 64-bit little-endian number zero-padded to 16 bytes (IEEE 1619-2018 §5.1).
//! Sectors are whole multiples of 16 bytes, so no ciphertext stealing.
//!
//! Speed comes from the `aes` crate's multi-block backends (VAES-512 works on
//! 64 blocks at once). The whole XTS pass runs as a closure *inside* the
//! backend: the backend calls it from a function compiled with its target
//! features (AVX-512 and VAES, AVX2 and VAES, AES-NI, or none for the portable
//! fixsliced AES), so the tweak arithmetic and the XORs are vectorised to the
//! same width as the AES rounds without any CPU detection of our own. On
//! CPUs with VAES our own engine (`xts/vaes256.rs`) beats the crate's
//! backends; [`AesEngine::fastest`] times them and picks.

use aes::cipher::consts::U16;
use aes::cipher::typenum::Unsigned;
use aes::cipher::{
    BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit, ParBlocksSizeUser,
};
use aes::{Aes256, Aes256Enc, Block};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::tweak::{LANES, TweakSequence, xor_in_place};
use crate::secret::{SecretBytes, constant_time_eq, scrub_stack_bytes};

const BLOCK_LEN: usize = 16;

/// Sectors whose initial tweaks are computed in one batch through K2, and
/// whose data then goes through K1 in one backend call. 64 matches the widest
/// backend's batch; the initial tweaks take 1 KiB of stack.
const SECTORS_PER_BATCH: usize = 64;

/// Upper bound on the blocks whitened per window (4 KiB of tweaks on the
/// stack): one 4096-byte sector; tweaks and data stay in L1 between the XOR
/// before and the XOR after the AES pass. 128 measured no better.
const MAX_WINDOW_BLOCKS: usize = 256;

/// Stack wiped after every pass of the crate's backends: the initial
/// tweaks (1 KiB), the tweak window (4 KiB) and the backend's frames, which
/// spill pieces of the round keys (a memory scan found 24 bytes in dead
/// stack after one write; thread stacks are neither locked nor ever wiped).
/// Such a pass reaches 14 KiB below its caller in a release build and 19 KiB
/// in a debug one (measured by painting the stack, as
/// `tests::the_stack_wipe_covers_every_pass` does).
const CRATE_PASS_STACK: usize = 32 * 1024;

/// Why a key or sector size cannot make a [`SectorCipher`].
#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    /// The key is not two AES-256 keys.
    #[error(
        "the AES-XTS key is {len} bytes, aes-xts-plain64 needs 64 (two AES-256 keys); use a 512-bit volume key"
    )]
    KeyLength { len: usize },
    /// K1 = K2 makes XTS the XEX construction with a known weakness
    /// (Rogaway 2004); FIPS 140-3 IG C.I requires `Key_1 ≠ Key_2` to be
    /// checked before any use, as IEEE 1619-2018 has implementations do.
    #[error(
        "the two halves of the AES-XTS key are equal, which IEEE 1619 forbids; generate a new volume key"
    )]
    EqualKeyHalves,
    /// LUKS2 allows 512..=4096 in powers of two.
    #[error("sector size {size} is not supported; use a power of two from 512 to 4096")]
    SectorSize { size: usize },
    #[error("this CPU cannot run {engine:?} AES")]
    EngineUnavailable { engine: AesEngine },
}

/// The code that runs AES-XTS over the data (the initial tweak of each
/// sector, one block, always goes through the `aes` crate). Both give the
/// same ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesEngine {
    /// The `aes` crate's backend for this CPU: VAES-512, VAES-256, AES-NI,
    /// or portable fixsliced AES.
    Crate,
    /// AES-XTS on 256-bit VAES (x86-64 with VAES, VPCLMULQDQ and AVX-512),
    /// for CPUs whose 512-bit AES is the slower, such as AMD Zen 4 (see
    /// `xts/vaes256.rs`).
    Vaes256Avx512,
    /// The same on CPUs with VAES and AVX2 but no AVX-512, such as AMD
    /// Zen 3, where the crate's backend runs at half the AES rate.
    Vaes256Avx2,
}

impl AesEngine {
    /// Every engine, whether or not this CPU has it.
    pub const ALL: [AesEngine; 3] = [
        AesEngine::Crate,
        AesEngine::Vaes256Avx512,
        AesEngine::Vaes256Avx2,
    ];

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            AesEngine::Crate => true,
            #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
            engine => engine.vaes256().is_some_and(vaes256::Isa::available),
            #[cfg(not(all(target_arch = "x86_64", not(aes_backend = "soft"))))]
            _ => false,
        }
    }

    /// The build of the VAES-256 engine it names, on x86-64 with hardware
    /// AES.
    #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
    fn vaes256(self) -> Option<vaes256::Isa> {
        match self {
            AesEngine::Crate => None,
            AesEngine::Vaes256Avx512 => Some(vaes256::Isa::Avx512),
            AesEngine::Vaes256Avx2 => Some(vaes256::Isa::Avx2),
        }
    }

    /// The fastest of the engines this CPU has, timed once per process on a
    /// throwaway key, as Linux picks its RAID routines at boot: the best of
    /// eight alternating passes over 64 KiB each, well under a millisecond.
    pub fn fastest() -> AesEngine {
        static FASTEST: OnceLock<AesEngine> = OnceLock::new();
        *FASTEST.get_or_init(|| {
            let key = SecretBytes::copy_from(&std::array::from_fn::<u8, 64, _>(|i| i as u8));
            let mut candidates: Vec<_> = AesEngine::ALL
                .into_iter()
                .filter(|engine| engine.available())
                .map(|engine| {
                    let cipher = SectorCipher::with_engine(&key, 4096, engine).expect("available");
                    (cipher, Duration::MAX)
                })
                .collect();
            if candidates.len() > 1 {
                let mut data = vec![0u8; 64 * 1024];
                for _ in 0..8 {
                    for (cipher, best) in &mut candidates {
                        let start = Instant::now();
                        cipher.encrypt(0, &mut data);
                        *best = (*best).min(start.elapsed());
                    }
                }
            }
            let (fastest, _) = candidates
                .iter()
                .min_by_key(|(_, best)| *best)
                .expect("the crate's engine runs anywhere");
            fastest.engine()
        })
    }
}

/// K1, expanded for the engine that runs the data.
enum DataCipher {
    Crate(Aes256),
    #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
    Vaes256(vaes256::RoundKeys),
}

/// The sector cipher of a volume: encrypts and decrypts whole sectors in
/// place, each with the tweak of its sector number.
///
/// The round keys live in the `aes` types and in `vaes256::RoundKeys`, which
/// wipe them on drop; no other copy of the key is kept.
pub struct SectorCipher {
    data: DataCipher,
    tweak: Aes256Enc,
    sector_size: usize,
}

impl SectorCipher {
    /// Key length: K1 followed by K2, 32 bytes each.
    pub const KEY_LEN: usize = 64;

    /// On the fastest engine this CPU has ([`AesEngine::fastest`]).
    pub fn new(key: &SecretBytes, sector_size: usize) -> Result<Self, CipherError> {
        Self::with_engine(key, sector_size, AesEngine::fastest())
    }

    pub fn with_engine(
        key: &SecretBytes,
        sector_size: usize,
        engine: AesEngine,
    ) -> Result<Self, CipherError> {
        if !engine.available() {
            return Err(CipherError::EngineUnavailable { engine });
        }
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(CipherError::SectorSize { size: sector_size });
        }
        let key = key.expose();
        if key.len() != Self::KEY_LEN {
            return Err(CipherError::KeyLength { len: key.len() });
        }
        let (data_key, tweak_key) = key.split_at(Self::KEY_LEN / 2);
        if constant_time_eq(data_key, tweak_key) {
            return Err(CipherError::EqualKeyHalves);
        }
        // `new_from_slice` borrows the key as an array in place: no copy of
        // the key is left on the stack.
        let data = match engine {
            AesEngine::Crate => DataCipher::Crate(
                Aes256::new_from_slice(data_key).expect("32-byte half of a 64-byte key"),
            ),
            #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
            engine @ (AesEngine::Vaes256Avx512 | AesEngine::Vaes256Avx2) => {
                DataCipher::Vaes256(vaes256::RoundKeys::new(
                    data_key.try_into().expect("32-byte half of a 64-byte key"),
                    engine.vaes256().expect("a VAES-256 engine"),
                ))
            }
            #[cfg(not(all(target_arch = "x86_64", not(aes_backend = "soft"))))]
            AesEngine::Vaes256Avx512 | AesEngine::Vaes256Avx2 => {
                unreachable!("checked available above")
            }
        };
        let tweak = Aes256Enc::new_from_slice(tweak_key).expect("32-byte half of a 64-byte key");
        Ok(SectorCipher {
            data,
            tweak,
            sector_size,
        })
    }

    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    pub fn engine(&self) -> AesEngine {
        match &self.data {
            DataCipher::Crate(_) => AesEngine::Crate,
            #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
            DataCipher::Vaes256(keys) => match keys.isa() {
                vaes256::Isa::Avx512 => AesEngine::Vaes256Avx512,
                vaes256::Isa::Avx2 => AesEngine::Vaes256Avx2,
            },
        }
    }

    /// Encrypts whole sectors in place; sector `i` of `data` is sector
    /// `first_sector + i` (wrapping at 2^64, as a u64 IV does).
    ///
    /// # Panics
    /// If `data.len()` is not a multiple of the sector size: a caller bug.
    pub fn encrypt(&self, first_sector: u64, data: &mut [u8]) {
        match &self.data {
            DataCipher::Crate(aes) => {
                self.for_each_batch(first_sector, data, |pass| aes.encrypt_with_backend(pass));
                scrub_stack_bytes::<CRATE_PASS_STACK>();
            }
            #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
            DataCipher::Vaes256(keys) => {
                self.for_each_batch(first_sector, data, |pass| keys.encrypt(pass));
                keys.scrub_pass_stack();
            }
        }
    }

    /// Decrypts whole sectors in place; the inverse of [`Self::encrypt`].
    ///
    /// # Panics
    /// If `data.len()` is not a multiple of the sector size: a caller bug.
    pub fn decrypt(&self, first_sector: u64, data: &mut [u8]) {
        match &self.data {
            DataCipher::Crate(aes) => {
                self.for_each_batch(first_sector, data, |pass| aes.decrypt_with_backend(pass));
                scrub_stack_bytes::<CRATE_PASS_STACK>();
            }
            #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
            DataCipher::Vaes256(keys) => {
                self.for_each_batch(first_sector, data, |pass| keys.decrypt(pass));
                keys.scrub_pass_stack();
            }
        }
    }

    /// Splits `data` into batches of sectors, computes each batch's initial
    /// tweaks with K2 in one multi-block call, and hands the batch to `run`.
    /// Never inlined, so that its frame lies below the caller's and is wiped.
    /// Each engine calls it with a closure of its own: one closure that
    /// matched on the engine would reserve the frames of both, and deepen
    /// the VAES-256 engine's pass from 5.4 KiB to 9.2 (release build).
    #[inline(never)]
    fn for_each_batch(&self, first_sector: u64, data: &mut [u8], mut run: impl FnMut(Pass<'_>)) {
        assert!(
            data.len().is_multiple_of(self.sector_size),
            "sector cipher given {} bytes, not a multiple of the {}-byte sector",
            data.len(),
            self.sector_size
        );
        let (blocks, _) = Block::slice_as_chunks_mut(data);
        let blocks_per_sector = self.sector_size / BLOCK_LEN;
        let mut starts = [Block::default(); SECTORS_PER_BATCH];
        let mut sector = first_sector;
        for batch in blocks.chunks_mut(SECTORS_PER_BATCH * blocks_per_sector) {
            let starts = &mut starts[..batch.len() / blocks_per_sector];
            for start in starts.iter_mut() {
                // plain64: the sector number, 64-bit little-endian, zero-padded.
                start[..8].copy_from_slice(&sector.to_le_bytes());
                start[8..].fill(0);
                sector = sector.wrapping_add(1);
            }
            self.tweak.encrypt_blocks(starts);
            run(Pass {
                starts,
                blocks: batch,
                blocks_per_sector,
            });
        }
    }
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("sector_size", &self.sector_size)
            .field("engine", &self.engine())
            .field("key", &"[REDACTED]")
            .finish()
    }
}

/// One XTS pass over a batch of sectors, run by an AES backend: for each
/// window, whiten with the tweaks, run the blocks through the backend, XOR
/// the tweaks again (IEEE 1619-2018 §5.3.2). Encryption and decryption differ
/// only in the backend call.
struct Pass<'a> {
    starts: &'a [Block],
    blocks: &'a mut [Block],
    blocks_per_sector: usize,
}

impl Pass<'_> {
    /// `par_blocks` is the backend's batch size; `cipher` runs a slice of at
    /// most that many blocks through it.
    #[inline(always)]
    fn run(self, par_blocks: usize, mut cipher: impl FnMut(&mut [Block])) {
        let window = window_blocks(par_blocks);
        let mut tweaks = [Block::default(); MAX_WINDOW_BLOCKS];
        let mut sequence = TweakSequence::new(self.starts, self.blocks_per_sector);
        for blocks in self.blocks.chunks_mut(window) {
            let tweaks = &mut tweaks[..blocks.len()];
            sequence.whiten(blocks, tweaks);
            for (blocks, tweaks) in blocks.chunks_mut(par_blocks).zip(tweaks.chunks(par_blocks)) {
                cipher(blocks);
                xor_in_place(blocks, tweaks);
            }
        }
    }
}

/// The window: a multiple of both the backend batch (no short batch in the
/// middle of a window) and [`LANES`] (whole tweak groups), within
/// [`MAX_WINDOW_BLOCKS`]; where no such multiple fits (VAES-256 takes 30
/// blocks), the largest window, each ending in one short batch. The tweak
/// sequence carries over from one window to the next.
fn window_blocks(par_blocks: usize) -> usize {
    let unit = lcm(par_blocks, LANES);
    if unit > MAX_WINDOW_BLOCKS {
        MAX_WINDOW_BLOCKS
    } else {
        MAX_WINDOW_BLOCKS / unit * unit
    }
}

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

impl BlockSizeUser for Pass<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for Pass<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        let par_blocks = <B as ParBlocksSizeUser>::ParBlocksSize::USIZE;
        self.run(par_blocks, |blocks| match blocks.try_into() {
            Ok(par) => backend.encrypt_par_blocks_inplace(par),
            Err(_) => backend.encrypt_tail_blocks_inplace(blocks),
        });
    }
}

impl BlockCipherDecClosure for Pass<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        let par_blocks = <B as ParBlocksSizeUser>::ParBlocksSize::USIZE;
        self.run(par_blocks, |blocks| match blocks.try_into() {
            Ok(par) => backend.decrypt_par_blocks_inplace(par),
            Err(_) => backend.decrypt_tail_blocks_inplace(blocks),
        });
    }
}

#[cfg(test)]
mod tests;
#[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
mod vaes256;
