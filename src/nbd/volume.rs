//! How an encrypted volume is served: the adapter from [`Volume`] to the
//! server's [`Backend`]. Kept here so that the volume knows nothing of NBD.

use std::io;

use super::{Backend, Extent};
use crate::volume::Volume;

impl Backend for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn block_size(&self) -> u32 {
        self.sector_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Volume::read(self, offset, buf)
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        Volume::read_cached(self, offset, buf)
    }

    fn write(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        Volume::write(self, offset, data)
    }

    fn write_cached(&self, offset: u64, data: &mut [u8]) -> io::Result<bool> {
        Volume::write_cached(self, offset, data)
    }

    fn flush(&self) -> io::Result<()> {
        Volume::flush(self)
    }

    fn can_trim(&self) -> bool {
        self.allow_discards()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discard(offset, len)
    }

    fn can_fast_zero(&self) -> bool {
        self.zeroes_fast()
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        Volume::write_zeroes(self, offset, len, may_trim)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.prefetch(offset, len)
    }

    /// Holes of the backing store read as zeros (see `volume::io`); data
    /// extents are not scanned for zeros, which base:allocation allows.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self
            .allocation(offset, len)?
            .into_iter()
            .map(|a| Extent {
                length: a.length,
                hole: a.hole,
                zero: a.hole,
            })
            .collect())
    }
}
