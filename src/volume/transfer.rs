//! Import and export of raw images: the fast path for moving data in and out
//! of a volume without a server.
//!
//! Both directions keep holes: an all-zero chunk of an image is not written
//! over a hole of the volume, and holes of the volume are not written to the
//! (sparse) output image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::volume::backing::device_size;
use crate::volume::{Volume, VolumeError};

/// Large enough that the cipher and the page cache work in bulk, small enough
/// to stay in the CPU's caches between the read and the write.
const CHUNK: usize = 4 << 20;

/// Told how many bytes have been copied so far, after each chunk.
pub type Progress<'a> = &'a dyn Fn(u64);

impl Volume {
    /// Copies a raw image (file or device) into the volume, from offset 0.
    /// Returns the bytes copied.
    pub fn import(
        &self,
        image: &File,
        image_path: &Path,
        progress: Progress,
    ) -> Result<u64, VolumeError> {
        let image_io = |source| VolumeError::Io {
            path: image_path.to_owned(),
            source,
        };
        let vol_io = |source| VolumeError::Io {
            path: self.path.clone(),
            source,
        };
        let len = device_size(image).map_err(image_io)?;
        if len > self.size {
            return Err(VolumeError::ImageTooLarge {
                path: image_path.to_owned(),
                image: len,
                volume: self.size,
            });
        }
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0u64;
        while pos < len {
            let n = ((len - pos) as usize).min(CHUNK);
            let chunk = &mut buf[..n];
            image.read_exact_at(chunk, pos).map_err(image_io)?;
            let skip =
                chunk.iter().all(|&b| b == 0) && self.is_hole(pos, n as u64).map_err(vol_io)?;
            if !skip {
                self.write(pos, chunk).map_err(vol_io)?;
            }
            pos += n as u64;
            progress(pos);
        }
        self.flush().map_err(vol_io)?;
        Ok(len)
    }

    /// Copies the whole volume into `out`, which must already be a sparse file
    /// of the volume's size (or a device at least that large). Returns the
    /// bytes copied.
    pub fn export(
        &self,
        out: &File,
        out_path: &Path,
        progress: Progress,
    ) -> Result<u64, VolumeError> {
        let out_io = |source| VolumeError::Io {
            path: out_path.to_owned(),
            source,
        };
        let vol_io = |source| VolumeError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0u64;
        while pos < self.size {
            let n = ((self.size - pos) as usize).min(CHUNK);
            if !self.is_hole(pos, n as u64).map_err(vol_io)? {
                let chunk = &mut buf[..n];
                self.read(pos, chunk).map_err(vol_io)?;
                if chunk.iter().any(|&b| b != 0) {
                    out.write_all_at(chunk, pos).map_err(out_io)?;
                }
            }
            pos += n as u64;
            progress(pos);
        }
        out.sync_all().map_err(out_io)?;
        Ok(self.size)
    }

    fn is_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        let runs = self.allocation(offset, len)?;
        Ok(runs.len() == 1 && runs[0].hole && runs[0].length >= len)
    }
}
