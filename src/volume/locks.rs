//! Write locks that make read-modify-write of partial sectors safe.
//!
//! A write that covers only part of a sector must read the sector, decrypt,
//! patch, encrypt and write it back. If another write to the same sector lands
//! in between, the write-back would resurrect the old bytes around the patch:
//! data loss no NBD ordering allows. So every write holds the stripes of the
//! ranges it touches: aligned writes share them (they never read), partial
//! writes hold them exclusively. Stripes are coarse (1 MiB) and hashed into a
//! small table, so an aligned write takes one or two uncontended locks.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

const GRANULE_SHIFT: u32 = 20;
const STRIPES: usize = 64;

pub struct WriteLocks {
    stripes: Vec<RwLock<()>>,
}

/// The stripes a write holds until it is dropped.
pub struct Held<'a> {
    _shared: Vec<RwLockReadGuard<'a, ()>>,
    _exclusive: Vec<RwLockWriteGuard<'a, ()>>,
}

impl Default for WriteLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

impl WriteLocks {
    /// Locks the stripes covering `[offset, offset + len)`, shared or
    /// exclusive. Stripes are taken in index order, so two writers can never
    /// wait on each other in a cycle.
    pub fn lock(&self, offset: u64, len: u64, exclusive: bool) -> Held<'_> {
        let indices = self.stripe_indices(offset, len);
        // A poisoned stripe guards no data (it is a `()`), so a writer that
        // panicked leaves nothing inconsistent behind it.
        let mut held = Held {
            _shared: Vec::new(),
            _exclusive: Vec::new(),
        };
        for i in indices {
            if exclusive {
                held._exclusive
                    .push(self.stripes[i].write().unwrap_or_else(|e| e.into_inner()));
            } else {
                held._shared
                    .push(self.stripes[i].read().unwrap_or_else(|e| e.into_inner()));
            }
        }
        held
    }

    /// Every stripe, exclusively: no write is in flight while it is held
    /// (how a snapshot hook is installed at a point in time).
    pub fn lock_all(&self) -> Held<'_> {
        self.lock(0, (STRIPES as u64) << GRANULE_SHIFT, true)
    }

    /// Takes the stripes covering the range shared, as an aligned write
    /// does, if that needs no wait; `None` while a partial write holds or
    /// waits for any of them.
    pub fn try_lock_shared(&self, offset: u64, len: u64) -> Option<Held<'_>> {
        let mut held = Held {
            _shared: Vec::new(),
            _exclusive: Vec::new(),
        };
        for i in self.stripe_indices(offset, len) {
            match self.stripes[i].try_read() {
                Ok(guard) => held._shared.push(guard),
                Err(TryLockError::Poisoned(e)) => held._shared.push(e.into_inner()),
                Err(TryLockError::WouldBlock) => return None,
            }
        }
        Some(held)
    }

    fn stripe_indices(&self, offset: u64, len: u64) -> Vec<usize> {
        let first = offset >> GRANULE_SHIFT;
        let last = (offset + len.max(1) - 1) >> GRANULE_SHIFT;
        let mut indices: Vec<usize> = if last - first >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|g| (g % STRIPES as u64) as usize)
                .collect()
        };
        indices.sort_unstable();
        indices.dedup();
        indices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_the_range_once_each_in_order() {
        let l = WriteLocks::default();
        assert_eq!(l.stripe_indices(0, 4096), vec![0]);
        assert_eq!(l.stripe_indices((1 << 20) - 1, 2), vec![0, 1]);
        assert_eq!(l.stripe_indices(63 << 20, 2 << 20), vec![0, 63]);
        assert_eq!(l.stripe_indices(0, 1 << 30).len(), STRIPES);
    }

    #[test]
    fn shared_holders_coexist_and_exclusive_waits() {
        let l = WriteLocks::default();
        let a = l.lock(0, 4096, false);
        let b = l.lock(0, 4096, false);
        assert!(l.stripes[0].try_write().is_err());
        drop((a, b));
        let c = l.lock(0, 4096, true);
        assert!(l.stripes[0].try_read().is_err());
        assert!(
            l.try_lock_shared(0, 4096).is_none(),
            "a partial write holds it"
        );
        assert!(l.try_lock_shared(1 << 20, 4096).is_some(), "another stripe");
        drop(c);
        let d = l.try_lock_shared(0, 4096).expect("free again");
        assert!(
            l.try_lock_shared(0, 4096).is_some(),
            "shared with aligned writes"
        );
        assert!(l.stripes[0].try_write().is_err());
        drop(d);
    }

    #[test]
    fn lock_all_holds_every_stripe() {
        let l = WriteLocks::default();
        let all = l.lock_all();
        assert!(l.stripes.iter().all(|s| s.try_read().is_err()));
        drop(all);
        assert!(l.stripes.iter().all(|s| s.try_write().is_ok()));
    }
}
