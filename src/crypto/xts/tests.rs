use std::cell::Cell;
use std::marker::PhantomData;

use aes::cipher::array::ArraySize;
use aes::cipher::consts::{U4, U8, U30, U64};
use aes::cipher::{InOut, ParBlocks};
use proptest::prelude::*;
use xts_mode::{Xts128, get_tweak_default};

use super::*;

/// The key of IEEE 1619-2007 Annex B vectors 10–14: the digits of e, then of π.
const IEEE_KEY: &str = concat!(
    "2718281828459045235360287471352662497757247093699959574966967627",
    "3141592653589793238462643383279502884197169399375105820974944592",
);

struct Vector {
    number: u32,
    /// The data unit sequence number, i.e. the sector number.
    data_unit: u64,
    ciphertext: &'static str,
}

/// IEEE 1619-2007 Annex B, XTS-AES-256 vectors 10–14 (512-byte data units,
/// plaintext the bytes 0..=255 twice).
const VECTORS: &[Vector] = &[
    Vector {
        number: 10,
        data_unit: 0xff,
        ciphertext: concat!(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
            "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
            "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
            "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
            "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
            "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
            "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
            "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
            "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
            "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
            "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
            "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
            "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
            "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
            "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
            "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        ),
    },
    Vector {
        number: 11,
        data_unit: 0xffff,
        ciphertext: concat!(
            "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11",
            "e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2",
            "469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d",
            "3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b201",
            "3fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca179",
            "8d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a",
            "aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c6",
            "9aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80",
            "470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a",
            "bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab0",
            "18bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75",
            "bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63",
            "094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a",
            "7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca68",
            "6e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090",
            "54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
        ),
    },
    Vector {
        number: 12,
        data_unit: 0xffffff,
        ciphertext: concat!(
            "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200",
            "a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba049",
            "9298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a8",
            "7815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e1",
            "9110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf",
            "5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e",
            "62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6",
            "e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879",
            "a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe0",
            "97b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964",
            "c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799d",
            "a3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7a",
            "f08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2",
            "480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace",
            "231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36",
            "ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826",
        ),
    },
    Vector {
        number: 13,
        data_unit: 0xffffffff,
        ciphertext: concat!(
            "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5",
            "520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1",
            "c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac",
            "7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e",
            "919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d3",
            "50875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f5",
            "69768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed9",
            "0fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c",
            "1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053",
            "027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e7",
            "5d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df",
            "73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc00",
            "77ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460",
            "d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a4155",
            "6cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88c",
            "f6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220",
        ),
    },
    Vector {
        number: 14,
        data_unit: 0xffffffffff,
        ciphertext: concat!(
            "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23",
            "50eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b80",
            "8da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604",
            "e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4",
            "a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b",
            "50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434",
            "631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d8",
            "76c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff",
            "3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b",
            "f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f6",
            "85b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa",
            "6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc",
            "e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a",
            "0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd9272120546",
            "81d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de",
            "6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
        ),
    },
];

fn ieee_plaintext() -> Vec<u8> {
    (0..=255u8).chain(0..=255u8).collect()
}

fn cipher(key: &[u8], sector_size: usize) -> SectorCipher {
    SectorCipher::new(&SecretBytes::copy_from(key), sector_size).unwrap()
}

/// The cipher on every engine this CPU has, so that each is checked
/// whichever `new` would pick.
fn ciphers(key: &[u8], sector_size: usize) -> Vec<SectorCipher> {
    AesEngine::ALL
        .into_iter()
        .filter(|engine| engine.available())
        .map(|engine| {
            SectorCipher::with_engine(&SecretBytes::copy_from(key), sector_size, engine).unwrap()
        })
        .collect()
}

fn oracle(key: &[u8]) -> Xts128<Aes256> {
    Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    )
}

/// The oracle, one sector at a time, with the sector number wrapping as a u64
/// (`xts-mode` itself counts in u128).
fn oracle_apply(key: &[u8], sector_size: usize, first: u64, data: &mut [u8], encrypt: bool) {
    let xts = oracle(key);
    for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
        let tweak = get_tweak_default(first.wrapping_add(i as u64).into());
        if encrypt {
            xts.encrypt_sector(sector, tweak);
        } else {
            xts.decrypt_sector(sector, tweak);
        }
    }
}

#[test]
fn ieee_1619_vectors() {
    let key = hex::decode(IEEE_KEY).unwrap();
    for cipher in ciphers(&key, 512) {
        let engine = cipher.engine();
        for vector in VECTORS {
            let ciphertext = hex::decode(vector.ciphertext).unwrap();
            let mut data = ieee_plaintext();
            cipher.encrypt(vector.data_unit, &mut data);
            assert_eq!(
                data, ciphertext,
                "vector {} encrypt, {engine:?}",
                vector.number
            );
            cipher.decrypt(vector.data_unit, &mut data);
            assert_eq!(
                data,
                ieee_plaintext(),
                "vector {} decrypt, {engine:?}",
                vector.number
            );
        }
    }
}

/// Sector numbers the brief singles out: 0, past 2^32, and at the u64 wrap.
fn sector_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just((1u64 << 32) + 5),
        (0u64..8).prop_map(|back| u64::MAX - back),
        any::<u64>(),
    ]
}

/// Two random AES-256 keys, different (equal halves are refused).
fn xts_key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 64).prop_filter("halves differ", |k| k[..32] != k[32..])
}

/// A sector size and whole sectors of random data: up to 80 sectors of 512
/// bytes (more than one batch of initial tweaks), fewer of the larger sizes.
fn sectors() -> impl Strategy<Value = (usize, Vec<u8>)> {
    prop_oneof![
        (Just(512usize), 1usize..=80),
        (Just(1024usize), 1usize..=4),
        (Just(2048usize), 1usize..=4),
        (Just(4096usize), 1usize..=4),
    ]
    .prop_flat_map(|(size, count)| {
        (
            Just(size),
            proptest::collection::vec(any::<u8>(), size * count),
        )
    })
}

proptest! {
    #[test]
    fn encrypt_agrees_with_xts_mode(key in xts_key(), (size, plain) in sectors(), first in sector_number()) {
        let mut theirs = plain.clone();
        oracle_apply(&key, size, first, &mut theirs, true);
        for cipher in ciphers(&key, size) {
            let mut ours = plain.clone();
            cipher.encrypt(first, &mut ours);
            prop_assert_eq!(&ours, &theirs, "{:?}", cipher.engine());
        }
    }

    #[test]
    fn decrypt_agrees_with_xts_mode(key in xts_key(), (size, sealed) in sectors(), first in sector_number()) {
        let mut theirs = sealed.clone();
        oracle_apply(&key, size, first, &mut theirs, false);
        for cipher in ciphers(&key, size) {
            let mut ours = sealed.clone();
            cipher.decrypt(first, &mut ours);
            prop_assert_eq!(&ours, &theirs, "{:?}", cipher.engine());
        }
    }

    #[test]
    fn decrypt_inverts_encrypt(key in xts_key(), (size, plain) in sectors(), first in sector_number()) {
        for cipher in ciphers(&key, size) {
            let mut data = plain.clone();
            cipher.encrypt(first, &mut data);
            prop_assert_ne!(&data, &plain);
            cipher.decrypt(first, &mut data);
            prop_assert_eq!(&data, &plain);
        }
    }
}

#[test]
fn many_batches_of_large_sectors_across_the_wrap() {
    let key: Vec<u8> = (0..64u8).collect();
    let sectors = SECTORS_PER_BATCH * 2 + 3;
    let plain: Vec<u8> = (0..4096 * sectors).map(|i| (i * 7 % 251) as u8).collect();
    let first = u64::MAX - 100;
    let mut theirs = plain.clone();
    oracle_apply(&key, 4096, first, &mut theirs, true);

    for cipher in ciphers(&key, 4096) {
        let engine = cipher.engine();
        let mut ours = plain.clone();
        cipher.encrypt(first, &mut ours);
        assert!(
            ours == theirs,
            "encryption differs from xts-mode, {engine:?}"
        );
        cipher.decrypt(first, &mut ours);
        assert!(
            ours == plain,
            "decryption does not invert encryption, {engine:?}"
        );
    }
}

/// A stand-in AES backend with a batch size of `N` blocks, so that the
/// windowing of every real backend (VAES-512: 64, VAES-256: 30, AES-NI: 8,
/// fixsliced: 4) runs here whatever this CPU has. Counts the blocks it was
/// given in full batches and in short tails.
struct Batching<'a, N> {
    aes: &'a Aes256,
    in_batches: Cell<usize>,
    in_tails: Cell<usize>,
    batch: PhantomData<N>,
}

impl<'a, N: ArraySize> Batching<'a, N> {
    fn new(aes: &'a Aes256) -> Self {
        Batching {
            aes,
            in_batches: Cell::new(0),
            in_tails: Cell::new(0),
            batch: PhantomData,
        }
    }
}

impl<N: ArraySize> BlockSizeUser for Batching<'_, N> {
    type BlockSize = U16;
}

impl<N: ArraySize> ParBlocksSizeUser for Batching<'_, N> {
    type ParBlocksSize = N;
}

impl<N: ArraySize> BlockCipherEncBackend for Batching<'_, N> {
    fn encrypt_block(&self, block: InOut<'_, '_, Block>) {
        self.aes.encrypt_block_inout(block);
    }

    fn encrypt_par_blocks(&self, mut blocks: InOut<'_, '_, ParBlocks<Self>>) {
        self.in_batches.set(self.in_batches.get() + N::USIZE);
        for i in 0..N::USIZE {
            self.encrypt_block(blocks.get(i));
        }
    }

    fn encrypt_tail_blocks(&self, blocks: aes::cipher::InOutBuf<'_, '_, Block>) {
        assert!(blocks.len() < N::USIZE);
        self.in_tails.set(self.in_tails.get() + blocks.len());
        for block in blocks {
            self.encrypt_block(block);
        }
    }
}

impl<N: ArraySize> BlockCipherDecBackend for Batching<'_, N> {
    fn decrypt_block(&self, block: InOut<'_, '_, Block>) {
        self.aes.decrypt_block_inout(block);
    }
}

/// Runs `encrypt` through a `Batching<N>` backend and checks it against the
/// real backend; returns the blocks it saw in full batches and in tails.
fn through_batching<N: ArraySize>(size: usize, count: usize) -> (usize, usize) {
    let key: Vec<u8> = (100..164u8).collect();
    let cipher =
        SectorCipher::with_engine(&SecretBytes::copy_from(&key), size, AesEngine::Crate).unwrap();
    let plain: Vec<u8> = (0..size * count).map(|i| (i % 253) as u8).collect();
    let first = u64::MAX - 2;

    let aes = Aes256::new_from_slice(&key[..32]).unwrap();
    let backend = Batching::<N>::new(&aes);
    let mut ours = plain.clone();
    cipher.for_each_batch(first, &mut ours, |pass| {
        BlockCipherEncClosure::call(pass, &backend)
    });
    let mut want = plain.clone();
    cipher.encrypt(first, &mut want);
    assert!(
        ours == want,
        "batch size {} differs, sector size {size}",
        N::USIZE
    );

    cipher.for_each_batch(first, &mut ours, |pass| {
        BlockCipherDecClosure::call(pass, &backend)
    });
    assert!(ours == plain, "batch size {} does not round-trip", N::USIZE);
    (backend.in_batches.get(), backend.in_tails.get())
}

/// Checks one batch size on every sector shape: every block goes through
/// the backend, and at most one short batch ends each window, so nearly all
/// blocks go in full batches.
fn check_batch_size<N: ArraySize>() {
    for (size, count) in [(512, 1), (512, 67), (1024, 3), (4096, 1), (4096, 3)] {
        let (in_batches, in_tails) = through_batching::<N>(size, count);
        let blocks = size * count / BLOCK_LEN;
        let batch = SECTORS_PER_BATCH * size / BLOCK_LEN;
        let windows: usize = (0..blocks)
            .step_by(batch)
            .map(|start| {
                (blocks - start)
                    .min(batch)
                    .div_ceil(window_blocks(N::USIZE))
            })
            .sum();
        assert_eq!(in_batches + in_tails, blocks);
        assert!(
            in_tails < N::USIZE * windows,
            "batch size {}, {count} sectors of {size}: {in_tails} blocks in tails",
            N::USIZE
        );
    }
}

#[test]
fn every_backend_batch_size() {
    check_batch_size::<U64>();
    check_batch_size::<U30>();
    check_batch_size::<U8>();
    check_batch_size::<U4>();
}

/// Bytes of stack [`the_stack_wipe_covers_every_pass`] paints and reads.
const PAINTED: usize = 64 * 1024;
const PAINT: u8 = 0xa5;

/// Every byte a pass leaves on the stack is wiped: after painting the stack
/// and running a pass, the painted region holds paint (untouched) or zeros
/// (wiped), nothing else. Read through `/proc/self/mem`, which Rust sees as
/// I/O, not as a read of dead memory. Fails if an engine's wipe is dropped
/// or made shallower than its pass (a 2 KiB wipe in `scrub_pass_stack`), in
/// the build it runs in.
#[test]
fn the_stack_wipe_covers_every_pass() {
    use std::os::unix::fs::FileExt;
    // The top of the region holds this function's frame and, while it
    // reads, those of the read; every wipe covers it. The AVX2 build's
    // pass reaches only 2.5 KiB (release build) below it.
    const UNCHECKED: usize = 1024;
    const RESIDUE: usize = 64;
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut seen = vec![0u8; PAINTED];
    let key: Vec<u8> = (0..64u8).collect();
    for sector_size in [512, 4096] {
        for cipher in ciphers(&key, sector_size) {
            for encrypt in [true, false] {
                let engine = cipher.engine();
                // More than one batch of sectors.
                let mut data = vec![0x33; sector_size * (SECTORS_PER_BATCH + 3)];
                let here = 0u8;
                let top = std::hint::black_box(&here) as *const u8 as u64;
                // The frames of the pass land on the paint.
                crate::secret::fill_stack_bytes::<PAINTED>(PAINT);
                if encrypt {
                    cipher.encrypt(1 << 40, &mut data);
                } else {
                    cipher.decrypt(1 << 40, &mut data);
                }
                mem.read_exact_at(&mut seen, top - PAINTED as u64).unwrap();
                let checked = &seen[..PAINTED - UNCHECKED];
                // The deepest run of zeros that no spill of a pointer or
                // of ciphertext makes; none if the wipe stayed above.
                let wiped_to = checked
                    .windows(RESIDUE)
                    .position(|w| w.iter().all(|&b| b == 0))
                    .unwrap_or(checked.len());
                // Just below the wipe, its own call to `memset` leaves a
                // return address and saved registers.
                let below = &checked[..wiped_to.saturating_sub(RESIDUE)];
                let left = below
                    .iter()
                    .chain(&checked[wiped_to..])
                    .filter(|&&b| b != PAINT && b != 0)
                    .count();
                assert_eq!(
                    left, 0,
                    "{engine:?}, encrypt {encrypt}, {sector_size}-byte sectors: {left} bytes of the pass's stack left unwiped"
                );
                assert!(
                    below.contains(&PAINT),
                    "the pass ran off the painted region"
                );
            }
        }
    }
}

#[test]
fn refuses_wrong_key_lengths() {
    for len in [0, 16, 32, 63, 65, 128] {
        let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
        match SectorCipher::new(&SecretBytes::copy_from(&key), 4096) {
            Err(CipherError::KeyLength { len: got }) => assert_eq!(got, len),
            other => panic!("key of {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn refuses_equal_key_halves() {
    let half: Vec<u8> = (0..32u8).collect();
    let key = [half.as_slice(), half.as_slice()].concat();
    assert!(matches!(
        SectorCipher::new(&SecretBytes::copy_from(&key), 512),
        Err(CipherError::EqualKeyHalves)
    ));
    // One differing byte is enough.
    let mut key = key;
    key[63] ^= 1;
    assert!(SectorCipher::new(&SecretBytes::copy_from(&key), 512).is_ok());
}

#[test]
fn sector_sizes() {
    let key: Vec<u8> = (0..64u8).collect();
    let key = SecretBytes::copy_from(&key);
    for size in [512, 1024, 2048, 4096] {
        assert_eq!(SectorCipher::new(&key, size).unwrap().sector_size(), size);
    }
    for size in [0, 16, 256, 511, 513, 1000, 3072, 8192] {
        match SectorCipher::new(&key, size) {
            Err(CipherError::SectorSize { size: got }) => assert_eq!(got, size),
            other => panic!("sector size {size}: {other:?}"),
        }
    }
}

#[test]
#[should_panic(expected = "not a multiple of the 4096-byte sector")]
fn partial_sector_is_a_caller_bug() {
    let key: Vec<u8> = (0..64u8).collect();
    cipher(&key, 4096).encrypt(0, &mut [0u8; 4096 + 512]);
}

#[test]
fn empty_buffer_is_a_no_op() {
    let key: Vec<u8> = (0..64u8).collect();
    cipher(&key, 512).encrypt(7, &mut []);
}

#[test]
fn debug_shows_no_key() {
    let key: Vec<u8> = (0xa0..0xe0u8).collect();
    let shown = format!("{:?}", cipher(&key, 4096));
    assert!(shown.contains("[REDACTED]"), "{shown}");
    assert!(shown.contains("4096"), "{shown}");
    for needle in [
        hex::encode(&key[..4]),
        hex::encode(&key[32..36]),
        format!("{}", key[0]),
    ] {
        assert!(!shown.contains(&needle), "{shown} contains {needle}");
    }
}

#[test]
fn engines_are_refused_where_the_cpu_lacks_them() {
    let key = SecretBytes::copy_from(&(0..64u8).collect::<Vec<_>>());
    for engine in AesEngine::ALL {
        match SectorCipher::with_engine(&key, 512, engine) {
            Ok(cipher) => assert!(engine.available() && cipher.engine() == engine),
            Err(CipherError::EngineUnavailable { engine: refused }) => {
                assert!(!engine.available() && refused == engine)
            }
            Err(e) => panic!("{engine:?}: {e}"),
        }
    }
    assert!(AesEngine::fastest().available());
}

#[test]
fn is_send_and_sync() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<SectorCipher>();
}

/// Shows which AES backend the suite ran on. The test script runs the crypto
/// tests a second time with the portable backend forced
/// (`--cfg aes_backend="soft"`) and `NBDCRYPT_EXPECT_AES=soft`, so that the
/// fixsliced path is proven to run; without the variable there is nothing to
/// check.
#[test]
fn aes_backend_is_the_expected_one() {
    match std::env::var("NBDCRYPT_EXPECT_AES").as_deref() {
        Ok("soft") => assert!(!aes::hardware_accelerated(), "AES hardware in use"),
        Ok("hardware") => assert!(aes::hardware_accelerated(), "portable AES in use"),
        Ok(other) => panic!("NBDCRYPT_EXPECT_AES={other}: expected soft or hardware"),
        Err(_) => {}
    }
}
