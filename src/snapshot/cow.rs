//! Copy-on-write for a snapshot of a live volume.
//!
//! At the snapshot point the tracker is installed into the volume (every
//! write stripe held, so no change is in flight). From then on each chunk of
//! the data segment is copied to the snapshot exactly once, by whoever comes
//! first: the background copier walking the volume, or a write, zeroing or
//! discard about to change the chunk, which copies the old ciphertext before
//! it goes on. A chunk nobody has claimed is therefore still exactly as it
//! was at the snapshot point, holes included.
//!
//! Two bits per chunk: `claimed` (someone is copying it or has) and `copied`.
//! Whoever sets the claim bit copies; anyone else who needs the chunk waits
//! for its copied bit. The copy itself never waits for anything but I/O, so
//! a writer holding its stripes while waiting cannot deadlock. If the
//! snapshot cannot be written (out of space), it is abandoned: the waiters
//! are released and the volume goes on as if there were no snapshot.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use super::copy::Copier;
use crate::volume::{Backing, BeforeChange};

/// Copy-on-write granularity. A write into an uncopied chunk first copies
/// this much (a read and a write of 64 KiB, tens of microseconds from the
/// page cache); larger chunks make that first write slower, smaller ones
/// the bitmaps larger (4 MiB of them for a 1 TiB volume at 64 KiB).
pub(super) const CHUNK: u64 = 64 << 10;

/// The background copier claims up to this many chunks at once (1 MiB), so
/// that it copies in large runs.
const BATCH: u64 = 16;

/// Why the copy stopped.
#[derive(Debug)]
pub(super) enum Stopped {
    Io(io::Error),
    Cancelled,
}

pub(super) struct CopyOnWrite {
    source: Backing,
    dest: File,
    /// Where the data segment starts, in both files.
    data_offset: u64,
    size: u64,
    chunks: u64,
    claimed: Vec<AtomicU64>,
    copied: Vec<AtomicU64>,
    copier: Copier,
    /// Set at the first failure; from then on nothing is copied.
    failed: AtomicBool,
    failure: Mutex<Option<Stopped>>,
    /// Waiters for a copied bit sleep here.
    wake: Condvar,
    /// Chunks copied by changes rather than by the background copier.
    by_writers: AtomicU64,
}

impl CopyOnWrite {
    pub fn new(source: Backing, dest: File, data_offset: u64, size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK);
        let words = chunks.div_ceil(64) as usize;
        Self {
            source,
            dest,
            data_offset,
            size,
            chunks,
            claimed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            copied: (0..words).map(|_| AtomicU64::new(0)).collect(),
            copier: Copier::new(),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            wake: Condvar::new(),
            by_writers: AtomicU64::new(0),
        }
    }

    pub fn copier(&self) -> &Copier {
        &self.copier
    }

    pub fn chunks_copied_by_writers(&self) -> u64 {
        self.by_writers.load(Ordering::Relaxed)
    }

    /// The background copy: every chunk nobody has claimed yet, in order;
    /// then waits for the chunks that changes are copying. Stops at the first
    /// failure, or when `cancel` is set.
    pub fn run(&self, cancel: &AtomicBool, progress: &dyn Fn(u64)) -> Result<(), Stopped> {
        let mut chunk = 0;
        while chunk < self.chunks {
            if cancel.load(Ordering::Relaxed) {
                self.fail(Stopped::Cancelled);
            }
            if self.failed.load(Ordering::Acquire) {
                break;
            }
            if !self.claim(chunk) {
                chunk += 1;
                continue;
            }
            let first = chunk;
            chunk += 1;
            while chunk < self.chunks && chunk - first < BATCH && self.claim(chunk) {
                chunk += 1;
            }
            self.copy_run(first, chunk);
            progress((chunk * CHUNK).min(self.size));
        }
        for chunk in 0..self.chunks {
            self.wait(chunk);
        }
        match self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(stopped) => Err(stopped),
            None => Ok(()),
        }
    }

    /// Sets the claim bit; true if this caller set it.
    fn claim(&self, chunk: u64) -> bool {
        let (word, bit) = split(chunk);
        self.claimed[word].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn is_copied(&self, chunk: u64) -> bool {
        let (word, bit) = split(chunk);
        self.copied[word].load(Ordering::Acquire) & bit != 0
    }

    /// Copies the claimed chunks `[first, end)` and marks them copied.
    fn copy_run(&self, first: u64, end: u64) {
        if self.failed.load(Ordering::Acquire) {
            return self.notify();
        }
        let offset = first * CHUNK;
        let len = (end * CHUNK).min(self.size) - offset;
        match self
            .copier
            .copy(&self.source, &self.dest, self.data_offset + offset, len)
        {
            Ok(()) => {
                for chunk in first..end {
                    let (word, bit) = split(chunk);
                    self.copied[word].fetch_or(bit, Ordering::AcqRel);
                }
                self.notify();
            }
            Err(e) => self.fail(Stopped::Io(e)),
        }
    }

    /// Wakes the waiters. Taking the lock orders this after their check of
    /// the bit, so none sleeps through it.
    fn notify(&self) {
        let _guard = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    fn fail(&self, why: Stopped) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(why);
        }
        self.failed.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    /// Returns once the chunk is copied, or the snapshot abandoned.
    fn wait(&self, chunk: u64) {
        if self.is_copied(chunk) {
            return;
        }
        let mut guard = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        while !self.is_copied(chunk) && !self.failed.load(Ordering::Acquire) {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl BeforeChange for CopyOnWrite {
    /// Copies the chunks of the range nobody has claimed (in runs, one copy
    /// each), then waits for those others are copying.
    fn before_change(&self, offset: u64, len: u64) {
        if len == 0 || self.failed.load(Ordering::Acquire) {
            return;
        }
        let last = ((offset + len - 1) / CHUNK).min(self.chunks - 1);
        let mut chunk = offset / CHUNK;
        let mut others = Vec::new();
        while chunk <= last {
            if self.is_copied(chunk) {
                chunk += 1;
            } else if self.claim(chunk) {
                let first = chunk;
                chunk += 1;
                while chunk <= last && self.claim(chunk) {
                    chunk += 1;
                }
                self.by_writers.fetch_add(chunk - first, Ordering::Relaxed);
                self.copy_run(first, chunk);
            } else {
                others.push(chunk);
                chunk += 1;
            }
        }
        for chunk in others {
            self.wait(chunk);
        }
    }
}

fn split(chunk: u64) -> (usize, u64) {
    ((chunk / 64) as usize, 1 << (chunk % 64))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use super::*;

    const OFFSET: u64 = 4096;

    fn files(size: u64) -> (Backing, File) {
        let src = tempfile::tempfile().unwrap();
        src.set_len(OFFSET + size).unwrap();
        let dst = tempfile::tempfile().unwrap();
        dst.set_len(OFFSET + size).unwrap();
        (Backing::new(src).unwrap(), dst)
    }

    fn read(f: &File, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, OFFSET).unwrap();
        b
    }

    /// A change copies the old bytes first, once; the copier then skips
    /// what changes copied; the snapshot holds the state at creation.
    #[test]
    fn the_snapshot_keeps_the_old_bytes_of_changed_chunks() {
        let size = 40 * CHUNK + 512;
        let (src, dst) = files(size);
        let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        src.write_all_at(&old, OFFSET).unwrap();
        let writer = src.file().try_clone().unwrap();
        let cow = CopyOnWrite::new(src, dst.try_clone().unwrap(), OFFSET, size);
        // As the volume calls it: hook, then the write.
        for (offset, len) in [(CHUNK + 10, 3 * CHUNK), (size - 512, 512), (0, 1)] {
            cow.before_change(offset, len);
            writer
                .write_all_at(&vec![0xFF; len as usize], OFFSET + offset)
                .unwrap();
        }
        assert_eq!(cow.chunks_copied_by_writers(), 4 + 1 + 1);
        cow.run(&AtomicBool::new(false), &|_| {}).unwrap();
        assert!(read(&dst, size) == old);
        cow.before_change(5 * CHUNK, CHUNK);
        assert_eq!(
            cow.chunks_copied_by_writers(),
            6,
            "copied chunks stay copied"
        );
    }

    #[test]
    fn racing_writers_and_the_copier_agree() {
        let size = 256 * CHUNK;
        let (src, dst) = files(size);
        let old: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        src.write_all_at(&old, OFFSET).unwrap();
        let writer = src.file().try_clone().unwrap();
        let cow = Arc::new(CopyOnWrite::new(
            src,
            dst.try_clone().unwrap(),
            OFFSET,
            size,
        ));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let cow = Arc::clone(&cow);
                let writer = writer.try_clone().unwrap();
                s.spawn(move || {
                    for i in 0..200u64 {
                        let offset = ((i * 7919 + t * 104_729) % 1000) * (size / 1000);
                        let offset = offset / 4096 * 4096;
                        cow.before_change(offset, 8192);
                        writer
                            .write_all_at(&[t as u8; 8192], OFFSET + offset)
                            .unwrap();
                    }
                });
            }
            let cow = Arc::clone(&cow);
            s.spawn(move || cow.run(&AtomicBool::new(false), &|_| {}).unwrap());
        });
        assert!(read(&dst, size) == old);
    }

    #[test]
    fn a_failed_copy_releases_waiters_and_reports() {
        let size = 4 * CHUNK;
        let (src, _) = files(size);
        src.write_all_at(&[1; 4096], OFFSET).unwrap();
        // A destination opened read-only: every write fails with EBADF.
        let ro = tempfile::NamedTempFile::new().unwrap();
        let dest = File::open(ro.path()).unwrap();
        let cow = CopyOnWrite::new(src, dest, OFFSET, size);
        cow.before_change(0, 4096);
        cow.before_change(0, 4096);
        match cow.run(&AtomicBool::new(false), &|_| {}) {
            Err(Stopped::Io(e)) => assert_eq!(e.raw_os_error(), Some(nix::libc::EBADF)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cancel_stops_the_copier() {
        let (src, dst) = files(4 * CHUNK);
        let cow = CopyOnWrite::new(src, dst, OFFSET, 4 * CHUNK);
        assert!(matches!(
            cow.run(&AtomicBool::new(true), &|_| {}),
            Err(Stopped::Cancelled)
        ));
    }
}
