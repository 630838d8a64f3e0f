//! The NBD protocol and server (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! - [`proto`]: the sans-I/O codec: magics and codes as open enums, the
//!   handshake's options and replies, request headers, simple and
//!   structured replies. No sockets; never panics on any input.

pub mod proto;
