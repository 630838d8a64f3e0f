//! Memory bounds, measured by a counting allocator: requests over the
//! maximum are refused without allocating their size, and a client that
//! floods requests without reading replies holds at most the in-flight
//! bound. Its own binary, so that no other test allocates meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::nbd::{Attach, RawClient, RawReply, TestKms, TestServer, export};
use common::random_bytes;
use nbdcrypt::nbd::Limits;
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags};

/// Tracks the largest single allocation and the peak of live bytes.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NONE: CommandFlags = CommandFlags::EMPTY;
const MIB: usize = 1 << 20;

fn start_server(limits: Limits) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(TestKms::new(dir.path()).volume(
        "disk",
        64 * MIB as u64,
        4096,
        Attach::AllowDiscards,
    ));
    TestServer::start_with(dir, vec![export("disk", backend, false)], limits)
}

fn ok(cookie: u64) -> RawReply {
    RawReply::Simple {
        cookie,
        error: 0,
        data: vec![],
    }
}

#[test]
fn memory_stays_bounded() {
    // Part 1: oversized requests allocate nothing of their size.
    let server = start_server(Limits::default());
    let mut client = RawClient::connect(&server.socket, "disk", false);
    let max = 32 * MIB;
    let payload = random_bytes(max + 1);

    // The counter works: a valid maximal write does allocate its size.
    LARGEST.store(0, Ordering::SeqCst);
    client.send(Command::WRITE, NONE, 1, 0, max as u32, &payload[..max]);
    assert_eq!(client.reply(|_| 0), ok(1));
    assert!(LARGEST.load(Ordering::SeqCst) >= max);

    LARGEST.store(0, Ordering::SeqCst);
    client.send(Command::WRITE, NONE, 2, 0, max as u32 + 1, &payload);
    let refused = client.reply(|_| 0);
    client.send(Command::READ, NONE, 3, 0, max as u32 + 1, &[]);
    let refused_read = client.reply(|_| 0);
    let mut vanishing = RawClient::connect(&server.socket, "disk", false);
    vanishing.send(Command::WRITE, NONE, 4, 0, u32::MAX, &payload[..8 * MIB]);
    drop(vanishing);
    let mut fresh = RawClient::connect(&server.socket, "disk", false);
    fresh.send(Command::FLUSH, NONE, 5, 0, 0, &[]);
    let flushed = fresh.reply(|_| 0);
    let largest = LARGEST.load(Ordering::SeqCst);
    assert!(
        matches!(
            refused,
            RawReply::Simple {
                cookie: 2,
                error: 22,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        matches!(
            refused_read,
            RawReply::Simple {
                cookie: 3,
                error: 22,
                ..
            }
        ),
        "{refused_read:?}"
    );
    assert_eq!(flushed, ok(5));
    assert!(
        largest < MIB,
        "largest allocation while refusing: {largest} bytes"
    );
    drop((client, fresh));
    server.stop().unwrap();

    // Part 2: a client that sends many reads and does not read the replies
    // makes the server hold at most the in-flight bound.
    let inflight = 4 * MIB;
    let server = start_server(Limits {
        max_request_bytes: MIB as u32,
        max_inflight_bytes_per_connection: inflight,
        ..Limits::default()
    });
    let mut client = RawClient::connect(&server.socket, "disk", false);
    let requests = 64;
    let baseline = LIVE.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    // The requests go out from another thread: the socket fills up and the
    // sender blocks once the server stops reading.
    let mut sender = client.stream();
    let sending = std::thread::spawn(move || {
        use std::io::Write;
        for cookie in 0..requests {
            let header = nbdcrypt::nbd::proto::transmission::RequestHeader {
                flags: NONE,
                command: Command::READ,
                cookie,
                offset: cookie * MIB as u64 % (63 * MIB as u64),
                length: MIB as u32,
            };
            sender.write_all(&header.encode()).unwrap();
        }
    });
    // Only now read the replies, slowly enough that the server is at its
    // bound meanwhile.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let held = PEAK.load(Ordering::SeqCst).saturating_sub(baseline);
    for _ in 0..requests {
        assert!(matches!(
            client.reply(|_| MIB),
            RawReply::Simple { error: 0, .. }
        ));
    }
    sending.join().unwrap();
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(baseline);
    // The bound, plus idle buffers kept for reuse (half the bound), plus
    // one reply being read by the test, plus small buffers.
    assert!(
        peak < inflight * 3 / 2 + 3 * MIB,
        "peak live heap {peak} bytes (while unread: {held}) for {requests} MiB requested"
    );

    // Part 3: the same with requests the server refuses: their replies are
    // bounded too.
    let mut sender = client.stream();
    let requests = 500_000;
    let header = nbdcrypt::nbd::proto::transmission::RequestHeader {
        flags: NONE,
        command: Command(99),
        cookie: 1,
        offset: 0,
        length: 0,
    }
    .encode();
    let all: Vec<u8> = header
        .iter()
        .copied()
        .cycle()
        .take(header.len() * requests)
        .collect();
    let baseline = LIVE.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let sending = std::thread::spawn(move || {
        use std::io::Write;
        sender.write_all(&all).unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let held = PEAK.load(Ordering::SeqCst).saturating_sub(baseline);
    for _ in 0..requests {
        assert!(matches!(
            client.reply(|_| 0),
            RawReply::Simple { error: 22, .. }
        ));
    }
    sending.join().unwrap();
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(baseline);
    // A few thousand replies waiting, not one per request sent.
    assert!(
        peak < 4 * MIB,
        "peak live heap {peak} bytes (while unread: {held}) for {requests} refused requests"
    );
    server.stop().unwrap();
}
