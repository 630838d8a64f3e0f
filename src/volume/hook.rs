//! A hook called before any change to the data segment: how a snapshot of a
//! live volume keeps the ciphertext it has not copied yet (copy-on-write).
//!
//! The volume knows nothing of snapshots; it only promises that every write,
//! zeroing and discard calls the installed hook with the sector range it is
//! about to change, while it holds that range's write stripes (`locks`), and
//! that a hook is installed at an instant when no change is in flight: every
//! stripe held exclusively, so a change either completed before the
//! installation or calls the hook. That instant is the snapshot's point in
//! time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::volume::Volume;

/// Told about every change to the data segment while installed.
pub trait BeforeChange: Send + Sync {
    /// `[offset, offset + len)` (volume offsets, whole sectors) is about to
    /// be overwritten, zeroed or discarded. Runs on the writer's thread with
    /// the range's stripes held; it cannot fail the write (a snapshot that
    /// cannot keep up gives up, the volume goes on).
    fn before_change(&self, offset: u64, len: u64);
}

/// The installed hook, if any. The flag spares writers the lock when no
/// hook is installed, which is nearly always.
#[derive(Default)]
pub(super) struct HookSlot {
    active: AtomicBool,
    hook: RwLock<Option<Arc<dyn BeforeChange>>>,
}

/// Another hook is installed (a snapshot of this volume is being taken).
#[derive(Debug, thiserror::Error)]
#[error("another snapshot of this volume is being taken; wait for it to finish")]
pub struct HookBusy;

impl Volume {
    /// Installs `hook` at a quiet instant: takes every write stripe
    /// exclusively (waiting for the changes in flight, holding off new ones),
    /// installs, releases. Returns how long changes were held off, which is
    /// as long as the slowest write in flight took to finish.
    pub fn install_hook(&self, hook: Arc<dyn BeforeChange>) -> Result<Duration, HookBusy> {
        let started = Instant::now();
        let _all = self.locks.lock_all();
        let mut slot = self.hook.hook.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(HookBusy);
        }
        *slot = Some(hook);
        // Writers read the flag after taking their stripes, which the
        // release of `_all` orders after this store.
        self.hook.active.store(true, Ordering::Release);
        Ok(started.elapsed())
    }

    /// Removes the hook. A change already inside the hook finishes with it.
    pub fn remove_hook(&self) {
        self.hook.active.store(false, Ordering::Release);
        *self.hook.hook.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether a hook is installed: a change must then not be made where it
    /// cannot wait (the hook may copy, or wait for a copy), so the reactor's
    /// inline writes step aside. Read with the range's stripes held.
    pub(super) fn hooked(&self) -> bool {
        self.hook.active.load(Ordering::Acquire)
    }

    /// Called by every change, with the range's stripes held.
    pub(super) fn before_change(&self, offset: u64, len: u64) {
        if !self.hooked() {
            return;
        }
        let hook = self
            .hook
            .hook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook.before_change(offset, len);
        }
    }
}
