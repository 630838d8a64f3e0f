//! The NBD protocol and server (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! A tour, from the wire inwards:
//!
//! - [`proto`]: the sans-I/O codec: magics and codes as open enums, the
//!   handshake's options and replies, request headers, simple and
//!   structured replies. No sockets; never panics on any input.
//! - [`handshake`]: the fixed-newstyle negotiation, one method per option,
//!   ending in a [`handshake::Session`] (export, flags, structured replies,
//!   metadata context) or a clean close.
//! - `request`: what a request means on a given export, validated before
//!   any I/O (bounds, flags, read-only), as one [`request::Op`].
//! - [`error`]: [`NbdError`], and the one place where any error becomes one
//!   of the protocol's error values.
//! - [`connection`]: the transmission phase: small reads and writes served
//!   on the reactor from and into the page cache, the rest run concurrently
//!   on the blocking pool, all answered out of order by one writer, with
//!   in-flight bytes bounded per connection; [`buffers`] keeps payload
//!   buffers for reuse; [`request_reader`] reads requests off the stream,
//!   and [`busy_poll`] lets it take a payload's pieces, and a synchronous
//!   client's next request, without sleeping.
//! - [`server`]: accept loops on TCP and Unix sockets, the connection
//!   limit, shutdown fan-out and the final flush; [`cores`] runs each
//!   connection on one thread, one such thread per CPU.
//!
//! The server is generic over a [`Backend`]: the encrypted volume (see
//! `volume.rs`), and an in-memory one in this module's unit tests.

pub mod buffers;
pub mod busy_poll;
pub mod connection;
pub mod cores;
pub mod error;
pub mod handshake;
pub mod proto;
pub mod request;
pub mod request_reader;
pub mod server;
mod volume;

#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

pub use error::NbdError;
pub use server::serve;

/// What an export is served from. Calls block; the server runs them on
/// the blocking pool (`spawn_blocking`), so crypto and disk I/O scale with
/// cores and never stall the reactor, except `read_cached` and
/// `write_cached`, which it calls on the reactor for small requests: there a
/// thread handoff would cost several times the work. Calls on one backend
/// run concurrently, from one or many connections.
pub trait Backend: Send + Sync + 'static {
    /// The export's size in bytes; fixed for the life of the server.
    fn size(&self) -> u64;
    /// The natural block size (the volume's sector size, 512 or 4096),
    /// advertised as the preferred block size. A power of two.
    fn block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`, any offset and length within
    /// `size()` (the backend does read-modify-write of partial sectors
    /// itself, safely against concurrent writers).
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Does what [`Backend::read`] does if it can without waiting for a
    /// disk (the data is in memory), and says whether it did; after
    /// `Ok(false)` the contents of `buf` are unspecified and the server
    /// calls `read` on the blocking pool. The default never does.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> std::io::Result<bool> {
        Ok(false)
    }
    /// Writes `data` at `offset`. `data` may be clobbered (encrypted in
    /// place). Durable only after `flush()`.
    fn write(&self, offset: u64, data: &mut [u8]) -> std::io::Result<()>;
    /// Does what [`Backend::write`] does if it can without reading anything
    /// or waiting for another request, and says whether it did. After
    /// `Ok(false)` `data` is untouched and the server calls `write` on the
    /// blocking pool; an error is final (`data` may be clobbered). The write
    /// may still wait for memory (the page cache), which the server watches
    /// for. The default never does.
    fn write_cached(&self, _offset: u64, _data: &mut [u8]) -> std::io::Result<bool> {
        Ok(false)
    }
    /// Makes every completed write durable, whichever connection made it.
    fn flush(&self) -> std::io::Result<()>;
    /// Whether TRIM may punch holes (the server's `--allow-discards`). When
    /// false, `NBD_FLAG_SEND_TRIM` is not advertised and `trim` is never
    /// called.
    fn can_trim(&self) -> bool;
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Whether `write_zeroes` with `may_trim` is quicker than a write, as
    /// `NBD_CMD_FLAG_FAST_ZERO` asks: by default, whenever it may punch
    /// holes.
    fn can_fast_zero(&self) -> bool {
        self.can_trim()
    }
    /// The range must read as zeros afterwards; `may_trim` is false when
    /// the client set `NBD_CMD_FLAG_NO_HOLE`.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()>;
    /// A hint that the range will be accessed soon.
    fn cache(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// `base:allocation` extents, consecutive from `offset`, covering at
    /// least the start of `[offset, offset + len)`.
    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>>;
}

/// One extent of the `base:allocation` metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// One export: what clients name in `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`),
/// and what serves it. The first export of the server is also the default
/// export, `""`.
#[derive(Clone)]
pub struct Export {
    /// Non-empty, at most 4096 bytes, no NUL; unique within the server.
    pub name: String,
    /// Shown to humans by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    pub read_only: bool,
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections beyond this are accepted and closed at once.
    pub max_connections: usize,
    /// The largest READ or WRITE payload, advertised as the maximum block
    /// size. proto.md: servers SHOULD accept at least 2^25 (32 MiB).
    pub max_request_bytes: u32,
    /// Payload bytes one connection may have in flight (read buffers,
    /// write payloads, replies waiting to be sent, each request counted at
    /// least 4 KiB); the connection stops reading requests while it is at
    /// the bound. At least `max_request_bytes` plus 4 KiB. Idle buffers kept
    /// for reuse add at most half as much again.
    pub max_inflight_bytes_per_connection: usize,
    /// Payload bytes all connections together may have in flight, counted
    /// as per connection; a request waits for both bounds. Without it the
    /// server's memory grows with the number of connections
    /// (`max_connections` x the per-connection bound, gigabytes), and a
    /// few clients that flood reads and never take the replies can exhaust
    /// the host. At least `max_request_bytes` plus 4 KiB.
    pub max_inflight_bytes_total: usize,
    /// How long a client may take from connecting to entering the
    /// transmission phase, so that clients stuck in the handshake cannot
    /// hold connection slots forever.
    pub handshake_timeout: Duration,
    /// How long a client may leave the server's replies untaken (its
    /// socket full, no byte read) before it is disconnected; its requests
    /// hold in-flight bytes until their replies are out.
    pub reply_timeout: Duration,
    /// How long a connection on a Unix socket polls it for the rest of a
    /// write's payload, or for the next request of a client with none in
    /// flight, before it sleeps (see [`busy_poll`]); zero never polls.
    pub busy_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_request_bytes: 32 << 20,
            max_inflight_bytes_per_connection: 64 << 20,
            max_inflight_bytes_total: 512 << 20,
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(30),
            busy_poll: busy_poll::DEFAULT_BUDGET,
        }
    }
}

/// A socket to accept clients on.
#[derive(Debug)]
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}
