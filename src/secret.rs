//! Key material: the one type every key byte lives in.
//!
//! A crypto library's rules, applied here once so that no other module has to
//! remember them: the bytes are wiped when dropped (`zeroize`), kept out of swap
//! (`mlock`), and never printed (`Debug` says `[REDACTED]`). [`harden_process`]
//! keeps them out of core dumps.

use std::fmt;
use std::sync::Once;

use zeroize::Zeroize;

/// Bytes of key material: zeroized on drop, locked in memory, never printed.
///
/// The buffer is allocated once at its final size and never grows, so no
/// reallocation can leave an unwiped copy behind.
pub struct SecretBytes {
    bytes: Box<[u8]>,
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes, to be filled in place (by a
    /// decryption, a random generator, a file read) so that the key never
    /// passes through an unprotected buffer.
    pub fn zeroed(len: usize) -> Self {
        let bytes = vec![0u8; len].into_boxed_slice();
        lock(&bytes);
        Self { bytes }
    }

    /// A secret of `len` bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Self {
        let mut secret = Self::zeroed(len);
        getrandom::fill(secret.expose_mut()).expect("the OS random number generator failed");
        secret
    }

    /// Copies `bytes` into a protected buffer. The caller remains responsible
    /// for wiping its own copy.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut secret = Self::zeroed(bytes.len());
        secret.expose_mut().copy_from_slice(bytes);
        secret
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The key bytes. Named so that every use is visible in review.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::copy_from(&self.bytes)
    }
}

impl PartialEq for SecretBytes {
    /// Constant time in the length of the secrets, so a comparison leaks no
    /// prefix length.
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(&self.bytes, &other.bytes)
    }
}

impl Eq for SecretBytes {}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // No munlock: locking is per page, and another secret may share this
        // page. Keys are few and small, so the pages simply stay locked.
        self.bytes.zeroize();
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes, [REDACTED])", self.bytes.len())
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Keeps key material out of core dumps and away from ptrace by other users:
/// the process becomes non-dumpable and its core size limit zero. Called by
/// every command that loads a key; failures are reported once and tolerated,
/// since an unprivileged container may forbid them.
pub fn harden_process() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!("could not mark the process non-dumpable: {e}");
        }
        let core = nix::sys::resource::Resource::RLIMIT_CORE;
        if let Err(e) = nix::sys::resource::setrlimit(core, 0, 0) {
            tracing::warn!("could not disable core dumps: {e}");
        }
    });
}

/// Locks the memory of a value that holds key material in a form of its
/// own (a cipher's expanded round keys, which are the key), so that it
/// never reaches swap either. The value must not move afterwards: box it
/// first and lock it where it lives. Like [`SecretBytes`], the pages stay
/// locked; the value's own `Drop` wipes it.
pub fn lock_value<T>(value: &T) {
    lock_region((value as *const T).cast(), std::mem::size_of::<T>());
}

/// Wipes the stack below the caller's frame, where the functions it called
/// had their frames: call it right after a call that handled key material.
/// Rust moves values by copying and leaves the old bytes behind, and a
/// cipher is built on the stack and moved to where it lives, so unlocking a
/// volume leaves copies of the key (and of the KMS material that unwrapped
/// it) in dead stack frames, unlocked and never wiped: a test that scans
/// the process's memory after closing a volume found several. 256 KiB
/// covers the deepest of those calls (unlocking goes through the KMS, the
/// audit log and pbkdf2) many times over; every thread has at least 2 MiB.
pub fn scrub_stack() {
    scrub_stack_bytes::<{ 256 * 1024 }>();
}

/// Wipes `N` bytes of stack below the caller's frame: [`scrub_stack`] for
/// calls of known, shallow depth, made often.
#[inline(always)]
pub fn scrub_stack_bytes<const N: usize>() {
    fill_stack_bytes::<N>(0);
}

/// Fills `N` bytes of stack below the caller's frame with `byte`: one
/// `memset`, which the optimiser must keep because the buffer escapes into
/// `black_box`. Never inlined, so the buffer is a frame of its own, right
/// below the caller's. The cipher's tests paint the stack with it.
#[inline(never)]
pub(crate) fn fill_stack_bytes<const N: usize>(byte: u8) {
    let mut frame = std::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: writes N bytes into the N-byte buffer it points to.
    unsafe { frame.as_mut_ptr().write_bytes(byte, 1) };
    std::hint::black_box(&frame);
}

/// Locks the pages of `bytes` in RAM so they are never written to swap.
/// RLIMIT_MEMLOCK may forbid it; a warning is then given once rather than
/// failing, as GnuPG and cryptsetup do.
fn lock(bytes: &[u8]) {
    lock_region(bytes.as_ptr(), bytes.len());
}

fn lock_region(start: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let ptr = std::ptr::NonNull::new(start as *mut std::ffi::c_void);
    let Some(ptr) = ptr else { return };
    // SAFETY: the pointer and length describe a live allocation or value
    // of the caller's; mlock only changes how its pages are kept.
    if let Err(e) = unsafe { nix::sys::mman::mlock(ptr, len) } {
        static WARN: Once = Once::new();
        WARN.call_once(|| {
            tracing::warn!("could not lock key memory (mlock: {e}); keys may reach swap")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = SecretBytes::copy_from(&[0xAB; 32]);
        let shown = format!("{s:?}");
        assert!(shown.contains("REDACTED"));
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn random_secrets_differ_and_have_the_asked_length() {
        let a = SecretBytes::random(64);
        let b = SecretBytes::random(64);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
    }

    /// kB locked in the mapping of /proc/self/smaps that holds `address`.
    fn locked_kb_at(address: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = (start..end).contains(&address);
            } else if inside && line.starts_with("Locked:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("{address:#x} is in no mapping");
    }

    #[test]
    fn a_locked_value_sits_in_locked_memory() {
        // Larger than malloc's largest mmap threshold (32 MiB), so the value
        // is a mapping of its own that no other test's secrets share, and
        // its locked amount must grow by the value's size.
        const LEN: usize = 33 << 20;
        let cipher: Box<[u8; LEN]> = vec![0x42u8; LEN].into_boxed_slice().try_into().unwrap();
        let before = locked_kb_at(cipher.as_ptr() as usize);
        lock_value(&*cipher);
        let after = locked_kb_at(cipher.as_ptr() as usize);
        assert!(
            after >= before + (LEN as u64 >> 10) - 4,
            "{before} kB, then {after} kB"
        );
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
