//! Accepting clients and shutting down (mini-redis's `server` and
//! `shutdown`): one accept loop per listener, a bound on connections, a
//! watch channel that tells every connection to stop, and an mpsc channel
//! whose senders are held by every task that may still touch a backend, so
//! the server knows when the last one is gone and can flush. Connections
//! run on the [`Cores`], not on the runtime that accepts them.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use super::busy_poll::BusyPoll;
use super::connection::{self, REQUEST_OVERHEAD, ServerMemory};
use super::cores::Cores;
use super::handshake::{self, Negotiated};
use super::proto::MAX_STRING_LEN;
use super::request::Op;
use super::request_reader::RequestReader;
use super::{Export, Limits, Listener};

/// Requests are read through a buffer of this size: a small write's header
/// and payload, or several small requests, arrive in one system call.
const READ_BUFFER: usize = 64 * 1024;

/// The send buffer asked for on Unix sockets. Replies are written without
/// blocking, so one larger than the buffer goes out in pieces, each after
/// the client has drained the last: a wait, a wake-up and another system
/// call apiece. Linux's default for Unix sockets (`wmem_default`, 208 KiB)
/// cuts a 1 MiB read reply in five; the kernel doubles what is asked, up to
/// twice `net.core.wmem_max`. Measured with fio, 1 MiB reads at iodepth 8:
/// 2.7k-3.0k IOPS at 342-374 µs of server CPU each with the default, 4.1k-4.6k
/// at 272-302 µs with 256 KiB to 2 MiB asked (all alike); nbdcopy out of the
/// volume 1.3-1.5 GB/s, then 1.5-1.9. TCP keeps the kernel's autotuning,
/// which a fixed size would turn off.
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// Pause after a failed accept (out of file descriptors, say) before trying
/// again, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `exports` on `listeners` until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish and be answered (clients in the
/// handshake are disconnected), flushes every backend, and returns.
///
/// Fails at once, before serving anything, if the exports or limits are not
/// usable (no export, a duplicate or invalid name, a block size that is not
/// a power of two of at least 512, limits that cannot hold one request).
///
/// Dropping the future instead of resolving `shutdown` ends the connection
/// threads and drops their connections, without the final flush.
pub async fn serve(
    exports: Vec<Export>,
    limits: Limits,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    check_config(&exports, &limits, &listeners)?;
    let cores = Arc::new(Cores::start()?);
    let memory = ServerMemory::new(&limits);
    let shared = Arc::new(Shared {
        exports,
        limits,
        memory,
    });
    let (notify, stop) = watch::channel(false);
    let (tracker, mut all_done) = mpsc::channel::<()>(1);
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));

    let mut accepting = JoinSet::new();
    for listener in listeners {
        accepting.spawn(accept_loop(
            listener,
            shared.clone(),
            slots.clone(),
            cores.clone(),
            Shutdown::new(stop.clone()),
            tracker.clone(),
        ));
    }
    drop(tracker);

    shutdown.await;
    info!("shutting down: no new connections, finishing requests in flight");
    let _ = notify.send(true);
    while accepting.join_next().await.is_some() {}
    // Returns once every connection and request task has dropped its sender.
    let _ = all_done.recv().await;
    let cores = Arc::into_inner(cores).expect("the accept loops, which share the cores, are done");
    let _ = tokio::task::spawn_blocking(move || cores.stop()).await;

    let mut result = Ok(());
    for export in &shared.exports {
        let backend = export.backend.clone();
        let flushed = tokio::task::spawn_blocking(move || backend.flush())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let Err(e) = flushed {
            warn!(export = %export.name, error = %e, "final flush failed");
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    info!("stopped");
    result
}

/// What every connection shares.
struct Shared {
    exports: Vec<Export>,
    limits: Limits,
    memory: ServerMemory,
}

/// A connection's view of the shutdown signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub(crate) fn new(receiver: watch::Receiver<bool>) -> Self {
        Shutdown(receiver)
    }

    /// Resolves once the server is shutting down (at once if it already is).
    pub async fn wait(&mut self) {
        // An error means the sender is gone, which also means shutdown.
        let _ = self.0.wait_for(|&stop| stop).await;
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn check_config(exports: &[Export], limits: &Limits, listeners: &[Listener]) -> io::Result<()> {
    if exports.is_empty() {
        return Err(invalid("no export to serve: give at least one".into()));
    }
    if listeners.is_empty() {
        return Err(invalid("no socket to listen on: give at least one".into()));
    }
    if limits.reply_timeout.is_zero() || limits.handshake_timeout.is_zero() {
        return Err(invalid(
            "the handshake and reply timeouts must be longer than zero".into(),
        ));
    }
    if limits.max_connections == 0 {
        return Err(invalid("the connection limit must be at least 1".into()));
    }
    for (i, export) in exports.iter().enumerate() {
        let name = &export.name;
        if name.is_empty() || name.len() > MAX_STRING_LEN || name.contains('\0') {
            return Err(invalid(format!(
                "export name {name:?} is not usable: it must be 1 to {MAX_STRING_LEN} bytes without NUL (\"\" is the default export, the first one)"
            )));
        }
        if exports[..i].iter().any(|e| &e.name == name) {
            return Err(invalid(format!("export name {name:?} is given twice")));
        }
        let block = export.backend.block_size();
        if !block.is_power_of_two() || block < 512 || block > limits.max_request_bytes {
            return Err(invalid(format!(
                "export {name:?} has block size {block}: it must be a power of two of at least 512 and at most the maximum request size {}",
                limits.max_request_bytes
            )));
        }
    }
    let largest = Op::Read {
        offset: 0,
        length: limits.max_request_bytes,
    }
    .payload_bytes()
    .max(
        Op::BlockStatus {
            offset: 0,
            length: 0,
            req_one: false,
        }
        .payload_bytes(),
    ) + REQUEST_OVERHEAD;
    if limits.max_inflight_bytes_per_connection < largest || largest > u32::MAX as usize {
        return Err(invalid(format!(
            "the in-flight bound of {} bytes per connection cannot hold one request of the maximum size ({largest} bytes with overhead; at most 4 GiB)",
            limits.max_inflight_bytes_per_connection
        )));
    }
    if limits.max_inflight_bytes_total < largest {
        return Err(invalid(format!(
            "the server-wide in-flight bound of {} bytes cannot hold one request of the maximum size ({largest} bytes with overhead)",
            limits.max_inflight_bytes_total
        )));
    }
    Ok(())
}

/// Connection ids in logs.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// An accepted connection, taken off the accepting runtime's reactor on its
/// way to a core's.
enum Stream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            Ok((Stream::Tcp(stream.into_std()?), peer.to_string()))
        }
        Listener::Unix(l) => {
            let (stream, _) = l.accept().await?;
            Ok((Stream::Unix(stream.into_std()?), "unix".to_owned()))
        }
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    cores: Arc<Cores>,
    mut shutdown: Shutdown,
    tracker: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.wait() => return,
            accepted = accept(&listener) => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Over the limit, the client is told at once (the connection
        // closes) rather than left waiting in the backlog.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, limit = shared.limits.max_connections, "connection refused: too many connections");
            continue;
        };
        let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("nbd", conn = id, %peer);
        let client = serve_client(
            stream,
            shared.clone(),
            shutdown.clone(),
            tracker.clone(),
            slot,
        );
        cores.spawn(client.instrument(span));
    }
}

async fn serve_client(
    stream: Stream,
    shared: Arc<Shared>,
    shutdown: Shutdown,
    tracker: mpsc::Sender<()>,
    slot: OwnedSemaphorePermit,
) {
    info!("connected");
    if let Err(e) = serve_stream(stream, &shared, shutdown, tracker.clone()).await {
        warn!(error = %e, "could not serve the connection");
    }
    drop(slot);
    info!("disconnected");
    // Held to the end: a connection's writer may still be sending replies
    // after its requests are done, and the cores stop once this is gone.
    drop(tracker);
}

/// Registers the stream with the reactor of the core it now runs on, and
/// serves it; fails only if that registration does.
async fn serve_stream(
    stream: Stream,
    shared: &Shared,
    shutdown: Shutdown,
    tracker: mpsc::Sender<()>,
) -> io::Result<()> {
    match stream {
        Stream::Tcp(stream) => {
            let stream = TcpStream::from_std(stream)?;
            // proto.md: both sides SHOULD disable Nagle's algorithm.
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, "could not set TCP_NODELAY");
            }
            // TCP's buffers grow with the traffic, so a payload comes in
            // fewer, larger pieces: over loopback, fio's 1 MiB writes ran at
            // 4.0k-4.1k IOPS with polling or without.
            let (reader, writer) = stream.into_split();
            serve_halves(reader, writer, None, shared, shutdown, tracker).await;
        }
        Stream::Unix(stream) => {
            let stream = UnixStream::from_std(stream)?;
            if let Err(e) = enlarge_send_buffer(&stream) {
                debug!(error = %e, "could not enlarge the socket's send buffer");
            }
            let poll = busy_poll(&stream, &shared.limits);
            let (reader, writer) = stream.into_split();
            serve_halves(reader, writer, poll, shared, shutdown, tracker).await;
        }
    }
    Ok(())
}

/// Polling is an optimisation: a socket that cannot be duplicated is
/// served without it.
fn busy_poll(stream: &UnixStream, limits: &Limits) -> Option<BusyPoll> {
    BusyPoll::new(stream, limits.busy_poll).unwrap_or_else(|e| {
        debug!(error = %e, "serving without busy polling");
        None
    })
}

/// Never shrinks a buffer the system's defaults already made larger.
fn enlarge_send_buffer(stream: &UnixStream) -> nix::Result<()> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::SndBuf};
    if getsockopt(stream, SndBuf)? < 2 * UNIX_SEND_BUFFER {
        setsockopt(stream, SndBuf, &UNIX_SEND_BUFFER)?;
    }
    Ok(())
}

async fn serve_halves<R, W>(
    reader: R,
    mut writer: W,
    poll: Option<BusyPoll>,
    shared: &Shared,
    mut shutdown: Shutdown,
    tracker: mpsc::Sender<()>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let limits = &shared.limits;
    let negotiation = handshake::negotiate(&mut reader, &mut writer, &shared.exports, limits);
    let negotiated = tokio::select! {
        () = shutdown.wait() => {
            debug!("server shutting down during the handshake; closing");
            return;
        }
        negotiated = tokio::time::timeout(limits.handshake_timeout, negotiation) => negotiated,
    };
    let session = match negotiated {
        Ok(Ok(Negotiated::Transmission(session))) => session,
        Ok(Ok(Negotiated::Aborted)) => return debug!("client aborted the handshake"),
        Ok(Ok(Negotiated::Closed)) => return debug!("client left during the handshake"),
        Ok(Err(e)) => return info!(error = %e, "handshake failed"),
        Err(_) => {
            return info!(timeout = ?limits.handshake_timeout, "handshake took too long; closing");
        }
    };
    let memory = shared.memory.clone();
    if let Err(e) = connection::run(
        RequestReader::new(reader, poll),
        writer,
        session,
        limits,
        memory,
        &mut shutdown,
        tracker,
    )
    .await
    {
        info!(error = %e, "connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::{MemBackend, export};

    fn listeners() -> Vec<Listener> {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        vec![Listener::Tcp(
            tokio::net::TcpListener::from_std(std).unwrap(),
        )]
    }

    fn refused(exports: Vec<Export>, limits: Limits) -> String {
        let err = check_config(&exports, &limits, &listeners()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        err.to_string()
    }

    fn disk(name: &str, block_size: u32) -> Export {
        export(name, MemBackend::new(1 << 20, block_size, true), false)
    }

    #[tokio::test]
    async fn unix_sockets_get_a_larger_send_buffer() {
        use nix::sys::socket::{getsockopt, sockopt::SndBuf};
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let before = getsockopt(&ours, SndBuf).unwrap();
        enlarge_send_buffer(&ours).unwrap();
        let after = getsockopt(&ours, SndBuf).unwrap();
        assert!(
            after > before || before >= 2 * UNIX_SEND_BUFFER,
            "{before} -> {after}"
        );
    }

    #[tokio::test]
    async fn unusable_configurations_are_refused_before_serving() {
        let ok = Limits::default();
        assert!(check_config(&[disk("a", 4096), disk("b", 512)], &ok, &listeners()).is_ok());
        assert!(refused(vec![], ok.clone()).contains("no export"));
        assert!(refused(vec![disk("", 512)], ok.clone()).contains("not usable"));
        assert!(refused(vec![disk("a\0b", 512)], ok.clone()).contains("not usable"));
        assert!(refused(vec![disk(&"x".repeat(4097), 512)], ok.clone()).contains("not usable"));
        assert!(refused(vec![disk("a", 512), disk("a", 512)], ok.clone()).contains("twice"));
        for block_size in [0, 256, 1000, 3 << 20] {
            assert!(refused(vec![disk("a", block_size)], ok.clone()).contains("block size"));
        }
        let small = Limits {
            max_inflight_bytes_per_connection: ok.max_request_bytes as usize,
            ..ok.clone()
        };
        assert!(refused(vec![disk("a", 512)], small).contains("in-flight"));
        let small_total = Limits {
            max_inflight_bytes_total: ok.max_request_bytes as usize,
            ..ok.clone()
        };
        assert!(refused(vec![disk("a", 512)], small_total).contains("server-wide"));
        let none = Limits {
            max_connections: 0,
            ..ok.clone()
        };
        assert!(refused(vec![disk("a", 512)], none).contains("connection limit"));
        let err = check_config(&[disk("a", 512)], &ok, &[]).unwrap_err();
        assert!(err.to_string().contains("no socket"));
    }
}
