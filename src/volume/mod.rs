//! One encrypted volume: a LUKS2 container whose data segment holds AES-XTS
//! ciphertext, and the plaintext reads and writes on top of it.
//!
//! - [`luks2`]: the on-disk header (both copies, JSON metadata, key digest,
//!   the `nbdcrypt-kms` token).
//! - `lifecycle`: create and unlock, the envelope around the volume key.
//! - `io`: plaintext reads and writes at any offset, zeroing, discard.
//! - `transfer`: import and export of raw images.
//! - `backing`: the file or block device underneath; `reserved` (which of a
//!   file's chunks a large write has reserved) and `known_data` (the run of
//!   data block status found last) are its memory of the file.
//! - `hook`: the copy-on-write hook a live snapshot installs.
//!
//! Knows nothing about NBD: the server adapts a [`Volume`] to its backend
//! trait.

mod backing;
mod error;
mod hook;
mod io;
mod known_data;
mod lifecycle;
mod locks;
pub mod luks2;
mod reserved;
mod transfer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub(crate) use backing::Backing;
pub use backing::{Allocation, device_size};
pub use error::VolumeError;
pub use hook::{BeforeChange, HookBusy};
pub(crate) use lifecycle::check_id;
pub use lifecycle::{AttachOptions, CreateOptions, create, read_header, rekey, unlock};
pub use transfer::Progress;

use crate::crypto::SectorCipher;
use locks::WriteLocks;
use luks2::Header;

/// An unlocked volume, ready for I/O from many threads at once.
pub struct Volume {
    path: PathBuf,
    backing: Backing,
    header: Header,
    /// Boxed so that it stays where it was locked in memory.
    cipher: Box<SectorCipher>,
    sector_size: u64,
    data_offset: u64,
    size: u64,
    read_only: bool,
    allow_discards: bool,
    locks: WriteLocks,
    hook: hook::HookSlot,
}

impl Volume {
    fn assemble(
        path: PathBuf,
        backing: Backing,
        header: Header,
        cipher: SectorCipher,
        opts: &AttachOptions,
    ) -> Self {
        // The round keys are the key: locked like it, where they stay.
        let cipher = Box::new(cipher);
        crate::secret::lock_value(&*cipher);
        tracing::debug!(engine = ?cipher.engine(), "sector cipher");
        Self {
            path,
            sector_size: u64::from(header.sector_size()),
            data_offset: header.data_offset(),
            size: header.data_size(),
            header,
            backing,
            cipher,
            read_only: opts.read_only,
            allow_discards: opts.allow_discards,
            locks: WriteLocks::default(),
            hook: hook::HookSlot::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file or device holding the header and the ciphertext, for a
    /// snapshot that copies the ciphertext as it is.
    pub(crate) fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The volume id (the header's label).
    pub fn id(&self) -> &str {
        self.header.label()
    }

    /// Bytes of plaintext the volume holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sector_size(&self) -> u32 {
        self.sector_size as u32
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn allow_discards(&self) -> bool {
        self.allow_discards
    }

    /// Whether zeroing that may punch holes needs no zeros written through
    /// the host: discards are allowed and the storage below zeroes by
    /// itself.
    pub fn zeroes_fast(&self) -> bool {
        self.allow_discards && self.backing.zeroes_itself()
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("id", &self.id())
            .field("size", &self.size)
            .field("sector_size", &self.sector_size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}
