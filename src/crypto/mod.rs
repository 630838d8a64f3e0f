//! The AES-XTS sector cipher (`aes-xts-plain64`), batched so that it runs at
//! the speed of the AES instructions.

mod tweak;
mod xts;

pub use xts::{AesEngine, CipherError, SectorCipher};
