//! The local key management service.
