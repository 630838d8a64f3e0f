//! nbdcrypt: an encrypted network block device.
//!
//! A tour of the modules, in the order data flows through them:
//!
//! - [`nbd`]: the NBD protocol. A sans-I/O codec (`nbd::proto`) that turns bytes
//!   into handshake options and transmission requests and back, and the tokio
//!   server that drives it over TCP and Unix sockets, generic over a
//!   [`nbd::Backend`].
//! - [`volume`]: one encrypted volume: its LUKS2 header (`volume::luks2`), and
//!   reads and writes of plaintext that land as AES-XTS ciphertext on the
//!   backing file or device. Knows nothing about NBD.
//! - [`crypto`]: the AES-XTS sector cipher (aes-xts-plain64), batched so that it
//!   runs at the speed of the AES instructions.
//! - [`kms`]: the local key management service: customer master keys, envelope
//!   encryption of data keys bound to an encryption context, the durable key
//!   store and the audit log. Knows nothing about volumes, so a remote KMS can
//!   stand behind the same [`kms::Kms`] trait.
//! - [`snapshot`]: point-in-time snapshots of a volume, offline or while it
//!   is served (copy-on-write), that stay ciphertext; restore under a new
//!   identity, re-wrapped or re-encrypted.
//! - [`control`]: the server's Unix control socket (JSON lines, owner only):
//!   snapshots of served volumes, the export list, stats.
//! - [`secret`]: the one type key material lives in (zeroized, locked in
//!   memory, never printed).
//! - [`cli`]: the `nbdcrypt` command line; wires the rest together.

pub mod cli;
pub mod control;
pub mod crypto;
pub mod kms;
pub mod nbd;
pub mod secret;
pub mod snapshot;
pub mod volume;
