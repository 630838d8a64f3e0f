//! Which chunks of a backing file have had their blocks reserved since the
//! volume was opened (see `Backing::prepare_write`), so that a chunk is
//! reserved once, not on every write into it.
//!
//! Only a way to skip a redundant `fallocate`: a write works the same
//! whether its chunk is marked or not, so nothing here is persisted, and a
//! hole punched into a marked chunk stays marked. That keeps the hole: it
//! is filled again by what is written into it, not by a reservation (until
//! the volume is opened again and a large write comes to that chunk).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// The unit of reservation. A sparse volume's file grows in steps of this
/// size under large writes, as a VDI image grows by 1 MiB blocks (VHDX:
/// 32 MiB). Smaller chunks leave the file in as many extents as there were
/// reservations, since concurrent writers reserve out of order: after
/// nbdcopy filled a 1 GiB volume on four connections, 3,015 extents at 64
/// KiB chunks, 760 at 1 MiB, 217 at 4 MiB (10 without reservations, which
/// ext4 allocates at writeback, in order); the server's CPU for the copy
/// was 300-370 ms at 64 KiB, 270-290 at 1 MiB and 270-280 at 4 MiB (five
/// alternating rounds).
pub const CHUNK: u64 = 1 << 20;

#[derive(Debug)]
pub struct Reserved {
    /// One bit per chunk, from the file's start.
    words: Box<[AtomicU64]>,
    /// The file's length when it was opened; a reservation stops there, as
    /// `fallocate` past it would grow the file.
    len: u64,
}

impl Reserved {
    pub fn new(len: u64) -> Self {
        // 128 bytes per GiB of file.
        let words = (0..len.div_ceil(CHUNK).div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self { words, len }
    }

    /// The chunks that `[offset, offset + len)` touches within the file.
    fn chunks(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return 0..0;
        }
        offset / CHUNK..end.div_ceil(CHUNK)
    }

    fn bit(&self, chunk: u64) -> (&AtomicU64, u64) {
        (&self.words[(chunk / 64) as usize], 1 << (chunk % 64))
    }

    /// The range to reserve for a write of `[offset, offset + len)`: its
    /// chunks, within the file, if any of them is not reserved yet.
    pub fn wanted(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        let chunks = self.chunks(offset, len);
        let missing = chunks.clone().any(|c| {
            let (word, bit) = self.bit(c);
            word.load(Ordering::Relaxed) & bit == 0
        });
        missing.then(|| chunks.start * CHUNK..(chunks.end * CHUNK).min(self.len))
    }

    /// Marks the chunks of `[offset, offset + len)` reserved.
    pub fn mark(&self, offset: u64, len: u64) {
        for c in self.chunks(offset, len) {
            let (word, bit) = self.bit(c);
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_whole_chunks_until_marked() {
        let r = Reserved::new(100 * CHUNK);
        assert_eq!(r.wanted(CHUNK + 512, 4096), Some(CHUNK..2 * CHUNK));
        assert_eq!(r.wanted(CHUNK - 1, 2), Some(0..2 * CHUNK));
        r.mark(CHUNK - 1, 2);
        assert_eq!(r.wanted(0, 2 * CHUNK), None);
        assert_eq!(r.wanted(CHUNK, CHUNK + 1), Some(CHUNK..3 * CHUNK));
    }

    #[test]
    fn bits_cross_words() {
        let r = Reserved::new(200 * CHUNK);
        r.mark(60 * CHUNK, 10 * CHUNK);
        assert_eq!(r.wanted(60 * CHUNK, 10 * CHUNK), None);
        assert_eq!(
            r.wanted(59 * CHUNK, 2 * CHUNK),
            Some(59 * CHUNK..61 * CHUNK)
        );
        assert_eq!(
            r.wanted(69 * CHUNK, 2 * CHUNK),
            Some(69 * CHUNK..71 * CHUNK)
        );
    }

    #[test]
    fn stops_at_the_end_of_the_file() {
        let len = 3 * CHUNK + 4096;
        let r = Reserved::new(len);
        assert_eq!(r.wanted(3 * CHUNK, 2 * CHUNK), Some(3 * CHUNK..len));
        r.mark(2 * CHUNK, u64::MAX);
        assert_eq!(r.wanted(2 * CHUNK, u64::MAX), None);
        // Past the end there is nothing to reserve.
        assert_eq!(r.wanted(len, CHUNK), None);
        assert_eq!(r.wanted(u64::MAX, 1), None);
    }
}
