//! The NBD protocol and server.
