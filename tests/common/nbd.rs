//! Shared by the NBD integration tests: real encrypted volumes under a
//! real local KMS as exports, an in-process server on a Unix socket in a
//! temporary directory, a raw client that speaks the protocol byte by byte,
//! and a way to run the real clients with a deadline.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nbdcrypt::kms::{CreateKeyRequest, KeySpec, LocalKms};
use nbdcrypt::nbd::proto::wire::{Command as Cmd, CommandFlags, OptionCode, OptionReplyType};
use nbdcrypt::nbd::{Backend, Export, Extent, Limits, Listener};
use nbdcrypt::volume::{self, AttachOptions, CreateOptions, Volume};
use tempfile::TempDir;

use super::DB;
use super::client::Client;
pub use super::client::RawReply;

/// The test's own local KMS, in `kms/` of the test's folder, with one
/// symmetric key: what the volumes of the test are made and unlocked with.
pub struct TestKms {
    kms: LocalKms,
    key_id: String,
    dir: PathBuf,
}

/// How a test volume is attached, as `nbdcrypt serve` would attach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    ReadOnly,
    ReadWrite,
    /// Read-write, and TRIM and zeroing may punch holes (`--allow-discards`).
    AllowDiscards,
}

impl TestKms {
    /// Opens a KMS in `dir/kms` (with its own root key there, whatever the
    /// environment says) and creates a key.
    pub fn new(dir: &Path) -> Self {
        let kms = LocalKms::open_with_root_key(&dir.join("kms"), None).unwrap();
        let key = kms
            .create_key(&CreateKeyRequest {
                description: "NBD test volumes".into(),
                key_spec: KeySpec::SymmetricDefault,
                key_usage: None,
            })
            .unwrap();
        TestKms {
            kms,
            key_id: key.key_id,
            dir: dir.to_owned(),
        }
    }

    /// Creates the volume `dir/NAME.vol` of `size` bytes (a multiple of
    /// `sector_size`) with the volume id `vol-NAME`, and opens it.
    pub fn volume(&self, name: &str, size: u64, sector_size: u32, attach: Attach) -> TestVolume {
        let path = self.dir.join(format!("{name}.vol"));
        let opts = CreateOptions {
            size: Some(size),
            sector_size,
            kms_key: self.key_id.clone(),
            db_id: DB.into(),
            vol_id: format!("vol-{name}"),
            force: false,
            preallocate: false,
        };
        volume::create(&path, &self.kms, &opts).unwrap();
        self.open(&path, attach)
    }

    /// Opens an existing volume, as a server start does.
    pub fn open(&self, path: &Path, attach: Attach) -> TestVolume {
        let opts = AttachOptions {
            db_id: DB.into(),
            read_only: attach == Attach::ReadOnly,
            allow_discards: attach == Attach::AllowDiscards,
        };
        TestVolume {
            volume: Volume::open(path, &self.kms, &opts).unwrap(),
            flushes: AtomicUsize::new(0),
        }
    }
}

/// A real encrypted volume as an export, served through the volume's own
/// `Backend`; it only counts flushes, so tests can see the final one.
pub struct TestVolume {
    volume: Volume,
    flushes: AtomicUsize,
}

impl TestVolume {
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Everything the volume holds, decrypted: what clients read.
    pub fn plaintext(&self) -> Vec<u8> {
        let mut all = vec![0; self.volume.size() as usize];
        self.volume.read(0, &mut all).unwrap();
        all
    }

    /// The data segment as it lies in the backing file: ciphertext.
    pub fn stored(&self) -> Vec<u8> {
        let mut all = vec![0; self.volume.size() as usize];
        File::open(self.volume.path())
            .unwrap()
            .read_exact_at(&mut all, self.volume.header().data_offset())
            .unwrap();
        all
    }
}

impl Backend for TestVolume {
    fn size(&self) -> u64 {
        <Volume as Backend>::size(&self.volume)
    }
    fn block_size(&self) -> u32 {
        <Volume as Backend>::block_size(&self.volume)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        <Volume as Backend>::read(&self.volume, offset, buf)
    }
    fn write(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        <Volume as Backend>::write(&self.volume, offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        <Volume as Backend>::flush(&self.volume)
    }
    fn can_trim(&self) -> bool {
        <Volume as Backend>::can_trim(&self.volume)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        <Volume as Backend>::trim(&self.volume, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        <Volume as Backend>::write_zeroes(&self.volume, offset, len, may_trim)
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        <Volume as Backend>::cache(&self.volume, offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        <Volume as Backend>::extents(&self.volume, offset, len)
    }
}

/// A backend whose reads and writes at offsets in a chosen set wait until
/// the test opens the gate: to hold requests in flight on purpose.
pub struct Gated<B> {
    pub inner: B,
    gated: Vec<u64>,
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl<B> Gated<B> {
    pub fn new(inner: B, gated: Vec<u64>) -> Self {
        Gated {
            inner,
            gated,
            state: Mutex::new((false, 0)),
            changed: Condvar::new(),
        }
    }

    pub fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.changed.notify_all();
    }

    /// Blocks until `n` requests are waiting at the gate.
    pub fn wait_for_waiters(&self, n: usize) {
        let mut state = self.state.lock().unwrap();
        while state.1 < n {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn pass(&self, offset: u64) {
        if !self.gated.contains(&offset) {
            return;
        }
        let mut state = self.state.lock().unwrap();
        state.1 += 1;
        self.changed.notify_all();
        while !state.0 {
            state = self.changed.wait(state).unwrap();
        }
    }
}

impl<B: Backend> Backend for Gated<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pass(offset);
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.pass(offset);
        self.inner.write(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn can_trim(&self) -> bool {
        self.inner.can_trim()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim)
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

pub fn export(name: &str, backend: Arc<dyn Backend>, read_only: bool) -> Export {
    Export {
        name: name.into(),
        description: format!("{name} for tests"),
        read_only,
        backend,
    }
}

/// A server running in-process on its own runtime, on a Unix socket in a
/// temporary directory. Dropping it shuts it down.
pub struct TestServer {
    pub dir: TempDir,
    pub socket: PathBuf,
    /// The TCP port on 127.0.0.1 the server also listens on.
    pub port: u16,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub fn start(dir: TempDir, exports: Vec<Export>) -> Self {
        Self::start_with(dir, exports, Limits::default())
    }

    pub fn start_with(dir: TempDir, exports: Vec<Export>, limits: Limits) -> Self {
        let socket = dir.path().join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (unix, tcp) = {
            let _guard = runtime.enter();
            (
                tokio::net::UnixListener::bind(&socket).unwrap(),
                std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            )
        };
        let port = tcp.local_addr().unwrap().port();
        tcp.set_nonblocking(true).unwrap();
        let tcp = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(tcp).unwrap()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = runtime.spawn(nbdcrypt::nbd::serve(
            exports,
            limits,
            vec![Listener::Unix(unix), Listener::Tcp(tcp)],
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            dir,
            socket,
            port,
            runtime: Some(runtime),
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// `nbd+unix:///EXPORT?socket=PATH`; `""` is the default export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Shuts the server down and returns what `serve` returned.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let (Some(stop), Some(served), Some(runtime)) =
            (self.stop.take(), self.served.take(), self.runtime.take())
        else {
            return Ok(());
        };
        let _ = stop.send(());
        let result = runtime.block_on(served).unwrap();
        runtime.shutdown_timeout(Duration::from_secs(10));
        result
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Runs a real client with a deadline; kills it (by its pid) if it hangs.
pub fn run(command: &mut Command) -> Output {
    const DEADLINE: Duration = Duration::from_secs(180);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let started = Instant::now();
    // Read the pipes on threads so a chatty client cannot block on them.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).unwrap();
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).unwrap();
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("{command:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs a client that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The tests' raw client (`client::Client`) for tests in which any failure
/// is the test's failure: every step panics instead of returning an error,
/// and every request goes out as it is sent.
pub struct RawClient(Client);

impl std::ops::Deref for RawClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.0
    }
}

impl RawClient {
    /// Greets, optionally negotiates structured replies and
    /// `base:allocation`, then `NBD_OPT_GO` to `export`.
    pub fn connect(socket: &Path, export: &str, structured: bool) -> Self {
        RawClient(Client::connect_with(socket, export, structured).unwrap())
    }

    pub fn option(&mut self, code: OptionCode, data: &[u8]) {
        self.0.option(code, data).unwrap();
    }

    pub fn option_reply(&mut self) -> (OptionReplyType, Vec<u8>) {
        self.0.option_reply().unwrap()
    }

    pub fn send(
        &mut self,
        command: Cmd,
        flags: CommandFlags,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.0
            .send(command, flags, cookie, offset, length, payload)
            .unwrap();
        self.0.push().unwrap();
    }

    /// The next reply; `read_len` says how much a successful simple read
    /// reply carries.
    pub fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> RawReply {
        self.0.next_reply(read_len).unwrap()
    }

    /// Whether the server has closed the connection (reads end of file).
    pub fn closed(&mut self) -> bool {
        self.0.closed()
    }

    /// Another handle on the socket, for bytes the test writes itself.
    pub fn stream(&mut self) -> UnixStream {
        self.0.socket().unwrap()
    }
}
