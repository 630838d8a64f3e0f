//! The volume's data path against a real local KMS in a temporary folder.

use std::sync::Arc;

use super::*;
use crate::kms::LocalKms;

const DB: &str = "db-TESTINSTANCE1";

struct Fixture {
    _dir: tempfile::TempDir,
    kms: LocalKms,
    path: PathBuf,
}

fn fixture(size: u64, sector_size: u32) -> Fixture {
    try_fixture(size, sector_size, false).unwrap()
}

fn try_fixture(size: u64, sector_size: u32, preallocate: bool) -> Result<Fixture, VolumeError> {
    let dir = tempfile::tempdir().unwrap();
    let kms = LocalKms::open(&dir.path().join("kms")).unwrap();
    let path = dir.path().join("v.vol");
    let opts = CreateOptions {
        size: Some(size),
        sector_size,
        kms_key: kms.test_key(),
        db_id: DB.into(),
        vol_id: "vol-0123abcd".into(),
        force: false,
        preallocate,
    };
    create(&path, &kms, &opts)?;
    Ok(Fixture {
        _dir: dir,
        kms,
        path,
    })
}

fn open(f: &Fixture, read_only: bool, allow_discards: bool) -> Volume {
    Volume::open(
        &f.path,
        &f.kms,
        &AttachOptions {
            db_id: DB.into(),
            read_only,
            allow_discards,
        },
    )
    .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn fresh_volume_reads_zeros_at_any_alignment() {
    let f = fixture(1 << 20, 4096);
    let v = open(&f, false, false);
    for (offset, len) in [
        (0, 4096),
        (1, 1),
        (4095, 2),
        (100_000, 70_000),
        ((1 << 20) - 1, 1),
    ] {
        let mut buf = vec![0xAAu8; len];
        v.read(offset, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{offset}+{len}");
    }
}

#[test]
fn a_preallocated_volume_reads_zeros_and_zeroing_keeps_its_space() {
    use std::os::unix::fs::MetadataExt;
    let f = match try_fixture(4 << 20, 4096, true) {
        Err(VolumeError::Reserve { source, .. })
            if source.raw_os_error() == Some(nix::libc::EOPNOTSUPP) =>
        {
            return eprintln!("the file system here cannot reserve space: {source}");
        }
        f => f.unwrap(),
    };
    let len = std::fs::metadata(&f.path).unwrap().len();
    let reserved = || std::fs::metadata(&f.path).unwrap().blocks() * 512;
    assert!(reserved() >= len, "{} of {len} bytes", reserved());
    let v = open(&f, false, false);
    let mut buf = vec![0xAAu8; 1 << 20];
    v.read(3 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    v.write(0, &mut pattern(4 << 20, 9)).unwrap();
    v.write_zeroes(0, 4 << 20, false).unwrap();
    assert!(reserved() >= len, "{} of {len} bytes", reserved());
    v.read(1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn unaligned_writes_keep_their_neighbours() {
    for ss in [512, 4096] {
        let f = fixture(1 << 20, ss);
        let v = open(&f, false, false);
        let mut model = vec![0u8; 1 << 20];
        let writes = [
            (0u64, 8192usize, 1u8),
            (1000, 3000, 2),
            (4095, 2, 3),
            (511, 513, 4),
            (8191, 8194, 5),
            (65_536, 1, 6),
        ];
        for (offset, len, seed) in writes {
            let data = pattern(len, seed);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            v.write(offset, &mut data.clone()).unwrap();
        }
        let mut all = vec![0u8; 1 << 20];
        v.read(0, &mut all).unwrap();
        assert!(all == model, "sector size {ss}");
        drop(v);
        let v = open(&f, true, false);
        let mut again = vec![0u8; 1 << 20];
        v.read(0, &mut again).unwrap();
        assert!(again == model, "after reopening, sector size {ss}");
    }
}

/// Many threads write interleaved, unaligned, non-overlapping byte ranges
/// that share sectors; without the stripe locks, read-modify-write would
/// lose some of them.
#[test]
fn concurrent_partial_writes_to_shared_sectors_lose_nothing() {
    let f = fixture(256 << 10, 4096);
    let v = Arc::new(open(&f, false, false));
    let threads = 8u64;
    let piece = 100u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let v = Arc::clone(&v);
            s.spawn(move || {
                for round in 0..64u64 {
                    let offset = (round * threads + t) * piece;
                    v.write(offset, &mut vec![t as u8 + 1; piece as usize])
                        .unwrap();
                }
            });
        }
        // An aligned writer in the same sectors' neighbourhood.
        let v = Arc::clone(&v);
        s.spawn(move || {
            for _ in 0..64 {
                v.write(128 << 10, &mut vec![0xEE; 4096]).unwrap();
            }
        });
    });
    let mut all = vec![0u8; (64 * threads * piece) as usize];
    v.read(0, &mut all).unwrap();
    for (i, chunk) in all.chunks(piece as usize).enumerate() {
        let t = i as u64 % threads;
        assert!(chunk.iter().all(|&b| b == t as u8 + 1), "piece {i} lost");
    }
}

#[test]
fn write_zeroes_and_discard() {
    let f = fixture(4 << 20, 4096);
    let v = open(&f, false, false);
    v.write(0, &mut vec![7u8; 4 << 20]).unwrap();
    v.write_zeroes(1000, 10_000, true).unwrap();
    let mut buf = vec![1u8; 12_000];
    v.read(0, &mut buf).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 7));
    assert!(buf[1000..11_000].iter().all(|&b| b == 0));
    assert!(buf[11_000..].iter().all(|&b| b == 7));
    // Without --allow-discards nothing becomes a hole.
    assert!(v.allocation(0, 4 << 20).unwrap().iter().all(|r| !r.hole));
    v.discard(0, 1 << 20).unwrap();
    v.read(0, &mut buf[..1000]).unwrap();
    assert!(
        buf[..1000].iter().all(|&b| b == 7),
        "TRIM without --allow-discards changes nothing"
    );
    drop(v);

    let v = open(&f, false, true);
    v.write_zeroes(1 << 20, 1 << 20, true).unwrap();
    v.discard(3 << 20, 1 << 20).unwrap();
    let runs = v.allocation(0, 4 << 20).unwrap();
    assert!(runs.iter().any(|r| r.hole), "{runs:?}");
    let mut mid = vec![1u8; 1 << 20];
    v.read(1 << 20, &mut mid).unwrap();
    assert!(mid.iter().all(|&b| b == 0));
}

#[test]
fn read_only_and_out_of_range_are_refused() {
    let f = fixture(1 << 20, 4096);
    let v = open(&f, true, false);
    let err = v.write(0, &mut [1u8; 4096]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    let busy = Volume::open(
        &f.path,
        &f.kms,
        &AttachOptions {
            db_id: DB.into(),
            read_only: false,
            allow_discards: false,
        },
    );
    assert!(
        busy.unwrap_err().to_string().contains("in use"),
        "a reader keeps writers out"
    );
    drop(v);
    let v = open(&f, false, false);
    let err = v.read((1 << 20) - 10, &mut [0u8; 11]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(v.write(u64::MAX, &mut [0u8; 2]).is_err());
}

/// Records the ranges a change announces, and what the volume held there
/// at that moment (the ciphertext a snapshot would have to keep).
struct Recorder {
    calls: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl BeforeChange for Recorder {
    fn before_change(&self, offset: u64, len: u64) {
        self.calls.lock().unwrap().push((offset, len));
    }
}

#[test]
fn every_change_calls_the_hook_first_with_whole_sectors() {
    let f = fixture(4 << 20, 4096);
    let v = open(&f, false, true);
    let rec = Arc::new(Recorder {
        calls: Default::default(),
    });
    v.install_hook(rec.clone()).unwrap();
    assert!(v.install_hook(rec.clone()).is_err(), "one hook at a time");
    v.write(8192, &mut vec![1u8; 4096]).unwrap();
    v.write(100, &mut [2u8; 10]).unwrap();
    v.write_zeroes(1 << 20, 3 << 19, true).unwrap();
    v.discard(3 << 20, 1 << 20).unwrap();
    v.read(0, &mut [0u8; 4096]).unwrap();
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            (8192, 4096),
            (0, 4096),
            ((1 << 20), 3 << 19),
            (3 << 20, 1 << 20)
        ]
    );
    v.remove_hook();
    v.write(0, &mut vec![3u8; 4096]).unwrap();
    assert_eq!(
        rec.calls.lock().unwrap().len(),
        4,
        "removed hooks hear nothing"
    );
    v.install_hook(rec).unwrap();
}

/// The install waits for a write in flight: the write holds its stripe
/// while its hook call runs, so installing from inside that call's thread
/// would deadlock; from another thread it must wait until the write ends.
#[test]
fn install_waits_for_writes_in_flight() {
    struct Slow(std::sync::Barrier);
    impl BeforeChange for Slow {
        fn before_change(&self, _: u64, _: u64) {
            self.0.wait();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let f = fixture(1 << 20, 4096);
    let v = Arc::new(open(&f, false, false));
    let slow = Arc::new(Slow(std::sync::Barrier::new(2)));
    v.install_hook(slow.clone()).unwrap();
    let writer = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || v.write(0, &mut vec![5u8; 4096]).unwrap())
    };
    slow.0.wait(); // the writer is inside its hook call, stripe held
    v.remove_hook();
    let rec = Arc::new(Recorder {
        calls: Default::default(),
    });
    v.install_hook(rec).unwrap();
    let mut block = vec![0u8; 4096];
    v.read(0, &mut block).unwrap();
    assert!(
        block.iter().all(|&b| b == 5),
        "installed while a write was in flight"
    );
    writer.join().unwrap();
}

/// A partial write rewrites its whole sector; a reader of other bytes of
/// that sector must never see the sector half rewritten (it would decrypt
/// to garbage). Reads hold the stripes shared, so they wait out the
/// read-modify-write.
#[test]
fn reads_never_see_a_sector_torn_by_a_concurrent_partial_write() {
    let f = fixture(1 << 20, 4096);
    let v = Arc::new(open(&f, false, false));
    v.write(0, &mut vec![0x11; 4096]).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        let (writer, stop_w) = (Arc::clone(&v), Arc::clone(&stop));
        s.spawn(move || {
            let mut round = 0u8;
            while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
                round = round.wrapping_add(1);
                writer.write(0, &mut vec![round; 512]).unwrap();
            }
        });
        for _ in 0..20_000 {
            let mut buf = [0u8; 512];
            v.read(1024, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0x11),
                "bytes nobody wrote changed: a torn sector"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

#[test]
fn cached_reads_match_reads_or_decline() {
    let f = fixture(1 << 20, 4096);
    let v = open(&f, false, false);
    v.write(8192, &mut pattern(8192, 3)).unwrap();
    let mut buf = vec![0u8; 8192];
    // Just written: the sectors are in the page cache.
    assert!(v.read_cached(8192, &mut buf).unwrap());
    assert_eq!(buf, pattern(8192, 3));
    let mut small = vec![0u8; 100];
    assert!(
        !v.read_cached(8193, &mut small).unwrap(),
        "unaligned ranges go the blocking way"
    );
    let mut fresh = vec![0xAAu8; 4096];
    if v.read_cached(65536, &mut fresh).unwrap() {
        assert!(fresh.iter().all(|&b| b == 0), "a hole reads as zeros");
    }
    assert!(v.read_cached(1 << 20, &mut buf).is_err(), "past the end");
}

#[test]
fn cached_writes_take_only_whole_sectors_without_waiting() {
    let f = fixture(1 << 20, 4096);
    let v = open(&f, false, false);
    let mut data = pattern(8192, 5);
    assert!(v.write_cached(4096, &mut data).unwrap());
    let mut back = vec![0u8; 8192];
    v.read(4096, &mut back).unwrap();
    assert_eq!(back, pattern(8192, 5));
    let mut odd = pattern(100, 6);
    assert!(!v.write_cached(4097, &mut odd).unwrap());
    assert_eq!(odd, pattern(100, 6), "declined: the payload is untouched");
    {
        let _partial_write = v.locks.lock(0, 4096, true);
        let mut held = pattern(4096, 7);
        assert!(!v.write_cached(0, &mut held).unwrap());
        assert_eq!(held, pattern(4096, 7));
    }
    drop(v);
    let ro = open(&f, true, false);
    assert!(ro.write_cached(0, &mut pattern(4096, 8)).is_err());
}

/// An inline write would skip a snapshot's copy-on-write hook; while one is
/// installed, inline writes step aside for the path that calls it.
#[test]
fn cached_writes_decline_while_a_snapshot_hook_is_installed() {
    let f = fixture(1 << 20, 4096);
    let v = open(&f, false, false);
    let rec = Arc::new(Recorder {
        calls: Default::default(),
    });
    v.install_hook(rec.clone()).unwrap();
    let mut data = pattern(4096, 9);
    assert!(!v.write_cached(0, &mut data).unwrap());
    assert_eq!(data, pattern(4096, 9), "declined: the payload is untouched");
    assert!(rec.calls.lock().unwrap().is_empty());
    v.remove_hook();
    assert!(v.write_cached(0, &mut data).unwrap());
}
