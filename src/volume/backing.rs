//! The backing store of a volume: a regular file or a block device.
//!
//! Both are addressed with positional I/O (`pread`/`pwrite`), so concurrent
//! requests share one descriptor without a seek lock, and go through the page
//! cache: `flush` is `fdatasync`, as in nbdkit's file plugin. The two kinds
//! differ only in how they report their size, make a range read as zeros and
//! report allocation; those differences live here and nowhere else.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::sys::stat::{major, minor};
use nix::unistd::{Whence, lseek64};

use crate::volume::known_data::KnownData;
use crate::volume::reserved::Reserved;

mod ioctl {
    // <linux/fs.h>: BLKGETSIZE64 = _IOR(0x12, 114, size_t); BLKDISCARD =
    // _IO(0x12, 119) and BLKZEROOUT = _IO(0x12, 127), both taking a
    // `uint64_t[2]` of {offset, length}.
    nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blk_zero_out, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// Writes smaller than this are left to the file system, which reserves a
/// few blocks faster than `fallocate` does, and do not grow a sparse file
/// by a whole chunk: a file system's metadata, 4 KiB random writes.
const RESERVE_MIN: u64 = 64 * 1024;

/// A sync refused because an earlier one failed; see `Backing::sync_failed`.
#[derive(Debug, thiserror::Error)]
#[error(
    "an earlier fdatasync of this volume failed, so no later flush can be trusted; reopen the volume"
)]
pub struct SyncFailedBefore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// One allocation run of the backing store, in its own byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub length: u64,
    /// Never written, or punched: reads as zero bytes.
    pub hole: bool,
}

#[derive(Debug)]
pub struct Backing {
    file: File,
    kind: BackingKind,
    /// Set by the first failed `fdatasync`. Linux reports a writeback error
    /// once per descriptor and may drop the pages it could not write, or
    /// mark them clean: a later `fdatasync` can succeed although
    /// acknowledged data never reached the disk. So after one failure every
    /// later sync fails too, as PostgreSQL learned to do, until the volume
    /// is opened anew and its contents can be checked.
    sync_failed: AtomicBool,
    /// Whether the storage below zeroes a range by itself, without the
    /// zeros passing through the host: a file by punching a hole, a device
    /// if its queue limits say it takes WRITE ZEROES. Cleared when it
    /// refuses after all: some file systems punch no holes (NFS before
    /// v4.2, FAT, ramfs), a SCSI disk turns WRITE SAME off after it fails
    /// once, and a device-mapper table can be reloaded with other limits.
    zeroes_itself: AtomicBool,
    /// Whether discards may reach the storage below; cleared the first time
    /// a device refuses one.
    discards: AtomicBool,
    /// Whether the file system reserves blocks for `prepare_write`; cleared
    /// when it refuses (`fallocate` is Linux's, and not every file system
    /// has it). Never set for a device, whose blocks all exist.
    reserves: AtomicBool,
    reserved: Reserved,
    known_data: KnownData,
}

/// Whether device `dev` zeroes ranges by itself: whether its queue, under
/// the sysfs mounted at `sysfs`, takes WRITE ZEROES. A partition has no
/// queue of its own: its limits are its disk's, the directory above it.
/// Limits that cannot be read (no sysfs, as in some containers) count as
/// none: a fast zero is then refused rather than slow.
fn queue_zeroes(sysfs: &Path, dev: u64) -> bool {
    let dir = sysfs.join(format!("dev/block/{}:{}", major(dev), minor(dev)));
    // The kernel resolves `..` after the symlink, to the disk's directory.
    let queue = if dir.join("partition").exists() {
        dir.join("../queue")
    } else {
        dir.join("queue")
    };
    std::fs::read_to_string(queue.join("write_zeroes_max_bytes"))
        .ok()
        .and_then(|bytes| bytes.trim().parse::<u64>().ok())
        .is_some_and(|bytes| bytes > 0)
}

impl Backing {
    pub fn new(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        let (kind, zeroes_itself, len) = if meta.file_type().is_block_device() {
            let zeroes_itself = queue_zeroes(Path::new("/sys"), meta.rdev());
            (BackingKind::BlockDevice, zeroes_itself, 0)
        } else {
            (BackingKind::File, true, meta.len())
        };
        Ok(Self {
            file,
            kind,
            sync_failed: AtomicBool::new(false),
            zeroes_itself: AtomicBool::new(zeroes_itself),
            discards: AtomicBool::new(true),
            reserves: AtomicBool::new(kind == BackingKind::File),
            reserved: Reserved::new(len),
            known_data: KnownData::default(),
        })
    }

    /// Takes an advisory lock for the life of the descriptor: exclusive for a
    /// writer, shared for readers. A header or data writer must be alone
    /// (LUKS2 updates assume one writer); nothing waits for the lock.
    pub fn lock(&self, exclusive: bool) -> io::Result<()> {
        let mode = if exclusive {
            nix::libc::LOCK_EX
        } else {
            nix::libc::LOCK_SH
        };
        // SAFETY: flock only reads the descriptor number, which is open.
        if unsafe { nix::libc::flock(self.file.as_raw_fd(), mode | nix::libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(nix::libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the volume is in use by another process (a running `nbdcrypt serve`?); stop it first, \
                 or snapshot it through that server with `nbdcrypt snapshot create --server`",
            ));
        }
        Err(err)
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The length in bytes: of the file, or of the device (its metadata says 0).
    pub fn len(&self) -> io::Result<u64> {
        device_size(&self.file)
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Reads like `read_exact_at`, but only what is in the page cache
    /// (`preadv2` with `RWF_NOWAIT`): `Ok(false)`, and `buf` unspecified, if
    /// any of it would have to wait for the disk.
    pub fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let iov = nix::libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which is live and writable for the
        // call's duration, and the descriptor is open.
        let n = unsafe {
            nix::libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                to_off(offset)?,
                nix::libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(nix::libc::EAGAIN | nix::libc::EOPNOTSUPP | nix::libc::EINTR) => Ok(false),
                _ => Err(err),
            };
        }
        // Short: part of it is not cached (or past the end, which the
        // blocking read reports).
        Ok(n as usize == buf.len())
    }

    /// Readies the file for a large write: the write's chunks (see
    /// `reserved`) get their blocks now, with one `fallocate`, the first
    /// time a write of at least `RESERVE_MIN` touches them since the volume
    /// was opened. Blocks so reserved and not yet written read as zeros (an
    /// unwritten extent), and SEEK_DATA counts them as a hole until they are
    /// written or read.
    ///
    /// Otherwise ext4 reserves a hole's blocks one by one inside the write,
    /// with the inode lock held, while other writers spin on that lock: a
    /// quarter of the server's CPU as nbdcopy filled a sparse 1 GiB volume
    /// (perf: `ext4_da_get_block_prep`, the extent status tree, quota,
    /// `rwsem_spin_on_owner`). One thread, 256 KiB at a time: a `pwrite`
    /// into a hole took 62 µs, `fallocate` and `pwrite` together 33 µs,
    /// `fallocate` of blocks already there 1.7 µs.
    ///
    /// No error here: one that matters (no space, a failed disk) is met
    /// again, and reported, by the write that follows.
    pub fn prepare_write(&self, offset: u64, len: u64) {
        if len < RESERVE_MIN || !self.reserves.load(Ordering::Relaxed) {
            return;
        }
        let Some(range) = self.reserved.wanted(offset, len) else {
            return;
        };
        let (Ok(start), Ok(end)) = (to_off(range.start), to_off(range.end)) else {
            return;
        };
        // Not FALLOC_FL_KEEP_SIZE, though the range is inside the file: with
        // it ext4 left 256 KiB reservations made in order in 67 extents per
        // GiB, against 9 without.
        match fallocate(&self.file, FallocateFlags::empty(), start, end - start) {
            Ok(()) => self.reserved.mark(offset, len),
            Err(Errno::EOPNOTSUPP) => {
                tracing::debug!("the file system reserves no blocks ahead of a write");
                self.reserves.store(false, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "reserving the blocks of a write failed"),
        }
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    pub fn sync(&self) -> io::Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(io::Error::other(SyncFailedBefore));
        }
        self.file.sync_data().inspect_err(|e| {
            self.sync_failed.store(true, Ordering::Release);
            tracing::error!(
                error = %e,
                "fdatasync failed: writes since the last good flush may be lost; \
                 every later flush fails too, until the volume is opened again"
            );
        })
    }

    /// Allocates the file's first `len` bytes, so that overwriting them in
    /// place cannot fail for lack of space and skips the file system's block
    /// allocation. What was not written before reads as zeros.
    pub fn reserve(&self, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocateFlags::empty(), 0, to_off(len)?).map_err(io::Error::from)
    }

    /// Whether [`Backing::zero_range`] leaves the zeroing to the storage
    /// below, so that no zeros pass through the host: what NBD's FAST_ZERO
    /// asks for, before anything is changed.
    pub fn zeroes_itself(&self) -> bool {
        self.zeroes_itself.load(Ordering::Relaxed)
    }

    /// Whether a discard may still reach the storage below: on a file, a
    /// punched hole.
    pub fn discards(&self) -> bool {
        match self.kind {
            BackingKind::File => self.zeroes_itself(),
            BackingKind::BlockDevice => self.discards.load(Ordering::Relaxed),
        }
    }

    /// Makes the range read as zero bytes and lets the storage below unmap
    /// it, and says whether it did. A file gets a hole. A device that zeroes
    /// by itself gets a punched hole too, which on a device is WRITE ZEROES
    /// without the kernel's fallback to writing zeros; any other device gets
    /// BLKZEROOUT, and the kernel writes the zeros. `Ok(false)`: the file
    /// system punches no holes, and the caller must write the zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        if self.zeroes_itself() {
            let punched = fallocate(
                &self.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                to_off(offset)?,
                to_off(len)?,
            );
            self.known_data.punched();
            match punched {
                Ok(()) => return Ok(true),
                Err(Errno::EOPNOTSUPP) => {
                    tracing::warn!(
                        "the storage refused to zero a range by itself; zeros are written \
                         from now on, and fast zeroing is refused"
                    );
                    self.zeroes_itself.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.kind == BackingKind::File {
            return Ok(false);
        }
        let range = [offset, len];
        // SAFETY: the descriptor is open and `range` outlives the call.
        unsafe { ioctl::blk_zero_out(self.file.as_raw_fd(), &range) }?;
        Ok(true)
    }

    /// Gives the range back to the storage below. On a file this is a hole
    /// (reads as zeros); on a device the contents become unspecified, which
    /// is all NBD's TRIM promises. Storage that takes no discards is left
    /// as it is: TRIM is advisory, and an error would reach the client's
    /// kernel as a failed I/O.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.discards() {
            return Ok(());
        }
        if self.kind == BackingKind::File {
            return self.zero_range(offset, len).map(drop);
        }
        let range = [offset, len];
        // SAFETY: the descriptor is open and `range` outlives the call.
        match unsafe { ioctl::blk_discard(self.file.as_raw_fd(), &range) } {
            Err(Errno::EOPNOTSUPP) => {
                tracing::debug!("the device takes no discards; TRIM does nothing from now on");
                self.discards.store(false, Ordering::Relaxed);
                Ok(())
            }
            done => done.map(drop).map_err(io::Error::from),
        }
    }

    /// Starts reading the range into the page cache (NBD_CMD_CACHE).
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        posix_fadvise(
            &self.file,
            to_off(offset)?,
            to_off(len)?,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(io::Error::from)
    }

    /// Allocation runs covering `[offset, offset + len)` (at least its start).
    /// Files answer with SEEK_DATA/SEEK_HOLE, and the run of data the last
    /// SEEK_HOLE found is remembered (see `known_data`); a device, or a file
    /// system without hole reporting, is all data.
    pub fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Allocation>> {
        let end = offset.saturating_add(len);
        if self.kind == BackingKind::BlockDevice {
            return Ok(vec![Allocation {
                length: len,
                hole: false,
            }]);
        }
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            if let Some(data_end) = self.known_data.end_of_data(pos) {
                let length = data_end.min(end) - pos;
                runs.push(Allocation {
                    length,
                    hole: false,
                });
                pos += length;
                continue;
            }
            let data = match lseek64(&self.file, to_off(pos)?, Whence::SeekData) {
                Ok(d) => d as u64,
                // ENXIO: no data at or after pos, the rest is a hole.
                Err(nix::errno::Errno::ENXIO) => end,
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let length = data.min(end) - pos;
                runs.push(Allocation { length, hole: true });
                pos += length;
                continue;
            }
            let punches = self.known_data.before_seek();
            let hole = lseek64(&self.file, to_off(pos)?, Whence::SeekHole)? as u64;
            self.known_data.found(punches, pos..hole);
            let length = hole.min(end) - pos;
            runs.push(Allocation {
                length,
                hole: false,
            });
            pos += length;
        }
        Ok(runs)
    }
}

/// The size of a regular file, or of a block device (BLKGETSIZE64); anything
/// else cannot hold a volume.
pub fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(meta.len())
    } else if kind.is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass, which
        // points at a live u64; the descriptor is open for the call's duration.
        unsafe { ioctl::blk_get_size64(file.as_raw_fd(), &mut size) }?;
        Ok(size)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or a block device",
        ))
    }
}

fn to_off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(nix::libc::EOVERFLOW))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::reserved::CHUNK;
    use nix::sys::stat::makedev;

    #[test]
    fn holes_and_data_of_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        let b = Backing::new(f).unwrap();
        b.write_all_at(&[7u8; 65536], 1 << 20).unwrap();
        let runs = b.allocation(0, 4 << 20).unwrap();
        let total: u64 = runs.iter().map(|r| r.length).sum();
        assert_eq!(total, 4 << 20);
        assert!(runs[0].hole);
        assert!(runs.iter().any(|r| !r.hole));
        assert!(b.zero_range(1 << 20, 65536).unwrap());
        let mut buf = [1u8; 16];
        b.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert!(b.allocation(0, 4 << 20).unwrap().iter().all(|r| r.hole));
    }

    /// Bytes the file system has given the file.
    fn allocated(b: &Backing) -> u64 {
        b.file().metadata().unwrap().blocks() * 512
    }

    #[test]
    fn large_writes_reserve_their_chunks_once() {
        let len = 3 * CHUNK + 8192;
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        let b = Backing::new(f).unwrap();
        // Too small to reserve anything.
        b.prepare_write(CHUNK, RESERVE_MIN - 4096);
        assert_eq!(allocated(&b), 0);
        // The write's chunk, whole, and still a hole to SEEK_DATA.
        b.prepare_write(CHUNK + 4096, RESERVE_MIN);
        assert_eq!(allocated(&b), CHUNK);
        assert!(b.allocation(0, len).unwrap().iter().all(|r| r.hole));
        let mut buf = [1u8; 4096];
        b.read_exact_at(&mut buf, CHUNK).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        // A hole punched into a reserved chunk stays a hole.
        assert!(b.zero_range(CHUNK, 65536).unwrap());
        b.prepare_write(CHUNK, RESERVE_MIN);
        assert_eq!(allocated(&b), CHUNK - 65536);
        // The last chunk stops at the end of the file.
        b.prepare_write(len - RESERVE_MIN, RESERVE_MIN);
        assert_eq!(allocated(&b), 2 * CHUNK - 65536 + 8192);
        assert_eq!(b.len().unwrap(), len);
    }

    /// A sysfs tree as the kernel lays it out for a loop disk with one
    /// partition: `dev/block/M:m` links into `devices/`, and the
    /// partition's directory sits inside its disk's.
    fn sysfs_with_partition(zeroes_max: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let disk = root.path().join("devices/virtual/block/loop9");
        std::fs::create_dir_all(disk.join("queue")).unwrap();
        std::fs::create_dir_all(disk.join("loop9p1")).unwrap();
        std::fs::write(disk.join("queue/write_zeroes_max_bytes"), zeroes_max).unwrap();
        std::fs::write(disk.join("loop9p1/partition"), "1\n").unwrap();
        let links = root.path().join("dev/block");
        std::fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/loop9", links.join("7:9")).unwrap();
        std::os::unix::fs::symlink(
            "../../devices/virtual/block/loop9/loop9p1",
            links.join("259:1"),
        )
        .unwrap();
        root
    }

    #[test]
    fn a_partition_zeroes_as_its_disk_does() {
        let yes = sysfs_with_partition("4294966784\n");
        assert!(queue_zeroes(yes.path(), makedev(7, 9)));
        assert!(queue_zeroes(yes.path(), makedev(259, 1)));
        let no = sysfs_with_partition("0\n");
        assert!(!queue_zeroes(no.path(), makedev(7, 9)));
        assert!(!queue_zeroes(no.path(), makedev(259, 1)));
        // A device sysfs does not list has no limits to read.
        assert!(!queue_zeroes(yes.path(), makedev(8, 0)));
    }
}
