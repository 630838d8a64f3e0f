//! The AES-XTS sector cipher.
