//! Snapshots against a real local KMS and real files: offline and online
//! (with writers racing the copy), restore both ways, and the refusals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;
use crate::kms::LocalKms;
use crate::volume::{AttachOptions, CreateOptions, Volume};

const DB: &str = "db-SNAPTEST1";
const VOL: &str = "vol-5a5a5a5a";
const SIZE: u64 = 4 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    kms: LocalKms,
    key: String,
    volume: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kms = LocalKms::open(&dir.path().join("kms")).unwrap();
    let key = kms.test_key();
    let volume = dir.path().join("v.vol");
    crate::volume::create(
        &volume,
        &kms,
        &CreateOptions {
            size: Some(SIZE),
            sector_size: 4096,
            kms_key: key.clone(),
            db_id: DB.into(),
            vol_id: VOL.into(),
            force: false,
            preallocate: false,
        },
    )
    .unwrap();
    Fixture {
        dir,
        kms,
        key,
        volume,
    }
}

fn open(f: &Fixture, path: &std::path::Path, db: &str, read_only: bool) -> Volume {
    Volume::open(
        path,
        &f.kms,
        &AttachOptions {
            db_id: db.into(),
            read_only,
            allow_discards: true,
        },
    )
    .unwrap()
}

fn contents(v: &Volume) -> Vec<u8> {
    let mut all = vec![0u8; v.size() as usize];
    v.read(0, &mut all).unwrap();
    all
}

fn restore_plain(f: &Fixture, snap: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = f.dir.path().join(name);
    let opts = RestoreOptions {
        db_id: "db-RESTORED1".into(),
        vol_id: "vol-restored1".into(),
        kms_key: None,
        new_data_key: false,
    };
    restore(snap, &path, &f.kms, &opts, &|_| {}).unwrap();
    path
}

#[test]
fn offline_snapshot_restores_to_the_same_plaintext() {
    let f = fixture();
    let v = open(&f, &f.volume, DB, false);
    v.write(4096 * 3, &mut vec![0x11; 8192]).unwrap();
    v.write(SIZE - 4096, &mut vec![0x22; 4096]).unwrap();
    let want = contents(&v);
    drop(v);

    let out = f.dir.path().join("snaps");
    std::fs::create_dir(&out).unwrap();
    let created = create_offline(&f.volume, &f.kms, DB, "snap-0a1b", &out, &|_| {}).unwrap();
    assert_eq!(created.path, out.join("snap-0a1b"));
    assert_eq!(created.source_volume, VOL);
    assert_eq!(created.bytes_copied + created.bytes_reflinked, 3 * 4096);

    let (info, header) = SnapshotInfo::read(&created.path).unwrap();
    assert_eq!(info.snapshot_id, "snap-0a1b");
    assert_eq!(info.db_id, DB);
    assert!(info.kms_key_id.ends_with(&f.key), "{}", info.kms_key_id);
    assert_eq!(header.label(), "snap-0a1b");
    assert_eq!(list(&out).unwrap().len(), 1);

    let restored = restore_plain(&f, &created.path, "r.vol");
    let r = open(&f, &restored, "db-RESTORED1", true);
    assert_eq!(r.id(), "vol-restored1");
    assert!(contents(&r) == want);
}

#[test]
fn a_new_data_key_changes_the_ciphertext_not_the_plaintext() {
    let f = fixture();
    let v = open(&f, &f.volume, DB, false);
    v.write(0, &mut vec![0x33; 3 << 20]).unwrap();
    let want = contents(&v);
    drop(v);
    let out = f.dir.path();
    let snap = create_offline(&f.volume, &f.kms, DB, "snap-1", out, &|_| {})
        .unwrap()
        .path;
    let path = out.join("new.vol");
    let opts = RestoreOptions {
        db_id: "db-OTHER1".into(),
        vol_id: "vol-new1".into(),
        kms_key: None,
        new_data_key: true,
    };
    let done = AtomicU64::new(0);
    restore(&snap, &path, &f.kms, &opts, &|n| {
        done.store(n, Ordering::Relaxed)
    })
    .unwrap();
    assert_eq!(
        done.load(Ordering::Relaxed),
        SIZE,
        "progress reaches the end"
    );
    let r = open(&f, &path, "db-OTHER1", true);
    assert!(contents(&r) == want);
    let ciphertext = |p: &std::path::Path| {
        let mut b = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(p).unwrap(),
            &mut b,
            16 << 20,
        )
        .unwrap();
        b
    };
    assert_ne!(ciphertext(&path), ciphertext(&snap));
    assert_ne!(ciphertext(&path), vec![0u8; 4096]);
}

/// Writers keep writing while the snapshot is taken; each block carries
/// the number of the write that wrote it. The snapshot must hold every
/// write finished before it began, none begun after it ended, and each
/// block's value must be one its writes produced.
#[test]
fn an_online_snapshot_is_a_point_in_time_while_writes_go_on() {
    let f = fixture();
    let v = Arc::new(open(&f, &f.volume, DB, false));
    const BLOCKS: u64 = SIZE / 4096;
    let log: Arc<Vec<BlockLog>> = Arc::new((0..BLOCKS).map(|_| Default::default()).collect());
    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..3u64 {
        let (v, log, clock, stop) = (v.clone(), log.clone(), clock.clone(), stop.clone());
        writers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Each thread owns the blocks b with b % 3 == t, so writes to
                // one block are ordered.
                let block = (n * 7) % (BLOCKS / 3) * 3 + t;
                let value = clock.fetch_add(1, Ordering::SeqCst);
                let mut data = vec![0u8; 4096];
                data[..8].copy_from_slice(&value.to_le_bytes());
                v.write(block * 4096, &mut data).unwrap();
                let acked = clock.fetch_add(1, Ordering::SeqCst);
                log[block as usize].lock().unwrap().push((value, acked));
                n += 1;
            }
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let began = clock.fetch_add(1, Ordering::SeqCst);
    let created = create_online(
        &v,
        &f.kms,
        DB,
        "snap-live1",
        f.dir.path(),
        &AtomicBool::new(false),
    )
    .unwrap();
    let ended = clock.fetch_add(1, Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(created.pause_micros.is_some());

    let restored = restore_plain(&f, &created.path, "live.vol");
    let r = open(&f, &restored, "db-RESTORED1", true);
    let data = contents(&r);
    let mut checked = 0;
    for (block, writes) in log.iter().enumerate() {
        let writes = writes.lock().unwrap();
        let got = u64::from_le_bytes(data[block * 4096..block * 4096 + 8].try_into().unwrap());
        // Finished before the snapshot began: the newest such must be there
        // or a later one.
        let floor = writes.iter().filter(|w| w.1 < began).map(|w| w.0).max();
        if let Some(floor) = floor {
            assert!(got >= floor, "block {block}: {got} lost the write {floor}");
        }
        if got != 0 {
            let w = writes.iter().find(|w| w.0 == got);
            let w = w.unwrap_or_else(|| panic!("block {block}: {got} was never written"));
            // A write in flight during the pause may be in or out; one
            // that began after the snapshot was taken cannot be in. Its
            // acknowledgement may come later than `ended`: the writer can
            // be preempted between finishing and taking the clock.
            assert!(
                w.0 < ended,
                "block {block}: write {got} began after the snapshot ended at {ended}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn refusals_leave_nothing_behind() {
    let f = fixture();
    let out = f.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let take = |id: &str, dir: &std::path::Path, db: &str| {
        create_offline(&f.volume, &f.kms, db, id, dir, &|_| {})
    };
    assert!(matches!(
        take("snapshot-1", &out, DB),
        Err(SnapshotError::BadId(_))
    ));
    assert!(matches!(
        take("snap-a_b", &out, DB),
        Err(SnapshotError::BadId(_))
    ));
    assert!(matches!(
        take("snap-1", &out.join("missing"), DB),
        Err(SnapshotError::OutDir { .. })
    ));
    let err = take("snap-1", &out, "db-WRONG1").unwrap_err();
    assert!(
        err.to_string().contains("InvalidCiphertextException"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing kept");
    take("snap-1", &out, DB).unwrap();
    assert!(matches!(
        take("snap-1", &out, DB),
        Err(SnapshotError::Exists(_))
    ));
    // While a writer holds the volume, offline snapshots wait their turn.
    let v = open(&f, &f.volume, DB, false);
    let busy = take("snap-2", &out, DB).unwrap_err();
    assert!(busy.to_string().contains("in use"), "{busy}");
    // A volume is not a snapshot.
    let err = restore(
        &f.volume,
        &f.dir.path().join("x.vol"),
        &f.kms,
        &RestoreOptions {
            db_id: DB.into(),
            vol_id: "vol-x1".into(),
            kms_key: None,
            new_data_key: false,
        },
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, SnapshotError::NotASnapshot(_)), "{err}");
    // Online: one snapshot of a volume at a time.
    let hook = Arc::new(Never);
    v.install_hook(hook).unwrap();
    let err = create_online(&v, &f.kms, DB, "snap-3", &out, &AtomicBool::new(false)).unwrap_err();
    assert!(matches!(err, SnapshotError::Busy(_)), "{err}");
    v.remove_hook();
    let err = create_online(&v, &f.kms, DB, "snap-4", &out, &AtomicBool::new(true)).unwrap_err();
    assert!(matches!(err, SnapshotError::Cancelled), "{err}");
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["snap-1"]);
}

/// One block's writes, in order: (clock when the write began, which is the
/// value it wrote; clock when it was acknowledged).
type BlockLog = std::sync::Mutex<Vec<(u64, u64)>>;

struct Never;
impl crate::volume::BeforeChange for Never {
    fn before_change(&self, _: u64, _: u64) {}
}
