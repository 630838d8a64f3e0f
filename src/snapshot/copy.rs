//! Ciphertext from one file to another at the same offsets, without ever
//! decrypting it: only the allocated extents of the source (holes stay
//! holes), shared with FICLONERANGE where the file system can (XFS, btrfs:
//! no data is read or written, the blocks are shared copy-on-write by the
//! file system), read and written otherwise.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::volume::Backing;

/// Reads and writes of this size when the blocks cannot be shared.
const BUFFER: usize = 1 << 20;

mod ioctl {
    /// `struct file_clone_range` of <linux/fs.h>.
    #[repr(C)]
    pub struct FileCloneRange {
        pub src_fd: i64,
        pub src_offset: u64,
        pub src_length: u64,
        pub dest_offset: u64,
    }
    // FICLONERANGE = _IOW(0x94, 13, struct file_clone_range).
    nix::ioctl_write_ptr!(ficlonerange, 0x94, 13, FileCloneRange);
}

/// Copies ranges and counts how; shared by the threads of one snapshot.
#[derive(Debug)]
pub(super) struct Copier {
    /// Cleared at the first sign that the file systems cannot share blocks.
    try_reflink: AtomicBool,
    reflinked: AtomicU64,
    copied: AtomicU64,
}

impl Copier {
    pub fn new() -> Self {
        Self {
            try_reflink: AtomicBool::new(true),
            reflinked: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        }
    }

    /// Bytes shared by reflink so far.
    pub fn reflinked(&self) -> u64 {
        self.reflinked.load(Ordering::Relaxed)
    }

    /// Bytes read and written so far.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Copies the allocated parts of `[offset, offset + len)` (file offsets)
    /// from `src` to the same offsets of `dst`; holes are skipped, so they
    /// stay holes in a sparse `dst`. Errors from `dst` come back as they
    /// are (ENOSPC first of all).
    pub fn copy(&self, src: &Backing, dst: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            for run in src.allocation(pos, end - pos)? {
                if !run.hole {
                    self.copy_data(src.file(), dst, pos, run.length)?;
                }
                pos += run.length;
            }
        }
        Ok(())
    }

    fn copy_data(&self, src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
        if self.try_reflink.load(Ordering::Relaxed) {
            match reflink(src, dst, offset, len) {
                Ok(()) => {
                    self.reflinked.fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                // Different file systems, or one that cannot share blocks:
                // never again for this copy.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            nix::libc::EOPNOTSUPP
                                | nix::libc::EXDEV
                                | nix::libc::ENOTTY
                                | nix::libc::ENOSYS
                        )
                    ) =>
                {
                    self.try_reflink.store(false, Ordering::Relaxed);
                }
                // A range not aligned to the file system's blocks: copy
                // this one.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let mut buf = vec![0u8; BUFFER.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, pos)?;
            // Allocated but zero (a zeroed device range, preallocated space):
            // a hole in a sparse copy reads the same.
            if chunk.iter().any(|&b| b != 0) {
                dst.write_all_at(chunk, pos)?;
            }
            self.copied.fetch_add(n as u64, Ordering::Relaxed);
            pos += n as u64;
        }
        Ok(())
    }
}

/// FICLONERANGE: `dst` shares `src`'s blocks for the range.
fn reflink(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = ioctl::FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: offset,
        src_length: len,
        dest_offset: offset,
    };
    // SAFETY: both descriptors are open for the call; `range` outlives it.
    unsafe { ioctl::ficlonerange(dst.as_raw_fd(), &range) }
        .map(drop)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn copies_data_keeps_holes_and_skips_allocated_zeros() {
        let src = tempfile::tempfile().unwrap();
        src.set_len(8 << 20).unwrap();
        src.write_all_at(&[0xA5; 3 << 20], 1 << 20).unwrap();
        src.write_all_at(&[0; 1 << 20], 6 << 20).unwrap();
        src.write_all_at(&[0x5A; 4096], (8 << 20) - 4096).unwrap();
        let dst = tempfile::tempfile().unwrap();
        dst.set_len(8 << 20).unwrap();
        let src = Backing::new(src).unwrap();
        let copier = Copier::new();
        copier.copy(&src, &dst, 0, 8 << 20).unwrap();

        let mut a = vec![0u8; 8 << 20];
        let mut b = vec![1u8; 8 << 20];
        src.read_exact_at(&mut a, 0).unwrap();
        dst.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b);
        assert_eq!(
            copier.copied() + copier.reflinked(),
            (3 << 20) + (1 << 20) + 4096,
            "only the allocated extents are touched"
        );
        let allocated = dst.metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= (3 << 20) + (64 << 10),
            "holes and zeros stay holes: {allocated} bytes allocated"
        );
    }

    #[test]
    fn a_subrange_copies_only_itself() {
        let src = tempfile::tempfile().unwrap();
        src.write_all_at(&[7; 3 << 20], 0).unwrap();
        let dst = tempfile::tempfile().unwrap();
        dst.set_len(3 << 20).unwrap();
        let src = Backing::new(src).unwrap();
        Copier::new().copy(&src, &dst, 1 << 20, 65536).unwrap();
        let mut b = vec![0u8; 3 << 20];
        dst.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..1 << 20].iter().all(|&x| x == 0));
        assert!(b[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 7));
        assert!(b[(1 << 20) + 65536..].iter().all(|&x| x == 0));
    }
}
