//! The NBD server against a client that speaks raw protocol bytes: what
//! real clients never do on purpose (out-of-order replies made visible,
//! disconnects with requests in flight, oversized requests, vanishing
//! clients, too many clients, shutdown mid-request).

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nbd::{Attach, Gated, RawClient, RawReply, TestKms, TestServer, TestVolume, export};
use common::random_bytes;
use nbdcrypt::nbd::Limits;
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags, ReplyType};

const NONE: CommandFlags = CommandFlags::EMPTY;
const MIB: u64 = 1 << 20;

/// A writable 512-byte-sector volume that punches holes ("disk"), its
/// reads and writes at `gated` offsets held until the test opens the gate,
/// and a read-only export ("ro") of a volume attached read-write, so that
/// a refused write can only have been refused by the server.
fn gated_server(gated: Vec<u64>, limits: Limits) -> (TestServer, Arc<Gated<TestVolume>>) {
    let dir = tempfile::tempdir().unwrap();
    let kms = TestKms::new(dir.path());
    let backend = Arc::new(Gated::new(
        kms.volume("disk", 16 * MIB, 512, Attach::AllowDiscards),
        gated,
    ));
    let ro = Arc::new(kms.volume("ro", MIB, 512, Attach::ReadWrite));
    let exports = vec![
        export("disk", backend.clone(), false),
        export("ro", ro, true),
    ];
    (TestServer::start_with(dir, exports, limits), backend)
}

fn simple(cookie: u64, error: u32, data: Vec<u8>) -> RawReply {
    RawReply::Simple {
        cookie,
        error,
        data,
    }
}

#[test]
fn replies_come_back_in_completion_order() {
    let (server, gate) = gated_server(vec![0], Limits::default());
    let mut client = RawClient::connect(&server.socket, "disk", false);
    client.send(Command::WRITE, NONE, 1, 8192, 4, b"late");
    assert_eq!(client.reply(|_| 0), simple(1, 0, vec![]));

    client.send(Command::READ, NONE, 2, 0, 4096, &[]);
    gate.wait_for_waiters(1);
    // The first read is held at the gate; the second passes it.
    client.send(Command::READ, NONE, 3, 8192, 4, &[]);
    assert_eq!(client.reply(|_| 4), simple(3, 0, b"late".to_vec()));
    gate.open();
    assert_eq!(client.reply(|_| 4096), simple(2, 0, vec![0; 4096]));
    server.stop().unwrap();
}

#[test]
fn disconnect_waits_for_requests_in_flight() {
    let (server, gate) = gated_server(vec![4096], Limits::default());
    let mut client = RawClient::connect(&server.socket, "disk", false);
    client.send(Command::WRITE, NONE, 1, 4096, 5, b"saved");
    gate.wait_for_waiters(1);
    client.send(Command::DISC, NONE, 2, 0, 0, &[]);
    // Give the DISC time to reach the server while the write is held (if it
    // arrives later, the test proves less, but cannot fail wrongly).
    std::thread::sleep(Duration::from_millis(100));
    gate.open();
    assert_eq!(client.reply(|_| 0), simple(1, 0, vec![]));
    assert!(client.closed(), "no reply to DISC; the server closes");
    let mut data = [0; 5];
    use nbdcrypt::nbd::Backend;
    gate.inner.read(4096, &mut data).unwrap();
    assert_eq!(&data, b"saved");
    server.stop().unwrap();
}

#[test]
fn errors_for_out_of_range_read_only_and_unknown_requests() {
    let (server, _) = gated_server(vec![], Limits::default());
    let mut client = RawClient::connect(&server.socket, "disk", false);
    let end = 16 * MIB;
    client.send(Command::WRITE, NONE, 1, end - 2, 4, b"abcd");
    assert_eq!(client.reply(|_| 0), simple(1, 28, vec![]), "ENOSPC");
    client.send(Command::WRITE_ZEROES, NONE, 2, end, 1, &[]);
    assert_eq!(client.reply(|_| 0), simple(2, 28, vec![]), "ENOSPC");
    client.send(Command::READ, NONE, 3, end - 2, 4, &[]);
    assert_eq!(client.reply(|_| 0), simple(3, 22, vec![]), "EINVAL");
    client.send(Command::TRIM, NONE, 4, u64::MAX, 1, &[]);
    assert_eq!(client.reply(|_| 0), simple(4, 22, vec![]), "EINVAL");
    client.send(Command(77), NONE, 5, 0, 0, &[]);
    assert_eq!(
        client.reply(|_| 0),
        simple(5, 22, vec![]),
        "unknown command: EINVAL"
    );
    client.send(Command::READ, CommandFlags::REQ_ONE, 6, 0, 1, &[]);
    assert_eq!(
        client.reply(|_| 0),
        simple(6, 22, vec![]),
        "flag of another command: EINVAL"
    );
    client.send(Command::BLOCK_STATUS, NONE, 7, 0, 512, &[]);
    assert_eq!(
        client.reply(|_| 0),
        simple(7, 22, vec![]),
        "no context selected: EINVAL"
    );
    client.send(Command::READ, NONE, 8, end - 4, 4, &[]);
    assert_eq!(
        client.reply(|_| 4),
        simple(8, 0, vec![0; 4]),
        "the stream is still in step"
    );

    let mut ro = RawClient::connect(&server.socket, "ro", true);
    ro.send(Command::WRITE, CommandFlags::FUA, 1, 0, 3, b"abc");
    let RawReply::Chunk { kind, payload, .. } = ro.reply(|_| 0) else {
        panic!("structured replies carry errors in chunks");
    };
    assert_eq!(kind, ReplyType::ERROR);
    assert_eq!(&payload[..4], &1u32.to_be_bytes(), "EPERM");
    assert!(String::from_utf8_lossy(&payload[6..]).contains("read-only"));
    ro.send(Command::READ, NONE, 2, 0, 3, &[]);
    let RawReply::Chunk { kind, payload, .. } = ro.reply(|_| 0) else {
        panic!("structured reads are chunks");
    };
    assert_eq!(kind, ReplyType::OFFSET_DATA);
    assert_eq!(payload, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    server.stop().unwrap();
}

#[test]
fn requests_over_the_maximum_are_refused_and_the_stream_stays_in_step() {
    let limits = Limits {
        max_request_bytes: MIB as u32,
        max_inflight_bytes_per_connection: 4 * MIB as usize,
        ..Limits::default()
    };
    let (server, _) = gated_server(vec![], limits);
    let mut client = RawClient::connect(&server.socket, "disk", false);
    let big = random_bytes(MIB as usize + 1);
    client.send(Command::WRITE, NONE, 1, 0, big.len() as u32, &big);
    assert_eq!(client.reply(|_| 0), simple(1, 22, vec![]));
    client.send(Command::READ, NONE, 2, 0, MIB as u32 + 1, &[]);
    assert_eq!(client.reply(|_| 0), simple(2, 22, vec![]));
    client.send(Command::WRITE, NONE, 3, 0, MIB as u32, &big[..MIB as usize]);
    assert_eq!(client.reply(|_| 0), simple(3, 0, vec![]));
    client.send(Command::READ, NONE, 4, 0, MIB as u32, &[]);
    assert_eq!(
        client.reply(|_| MIB as usize),
        simple(4, 0, big[..MIB as usize].to_vec())
    );
    // Commands without payload may exceed it.
    client.send(Command::WRITE_ZEROES, NONE, 5, 0, 4 * MIB as u32, &[]);
    assert_eq!(client.reply(|_| 0), simple(5, 0, vec![]));

    let mut structured = RawClient::connect(&server.socket, "disk", true);
    structured.send(Command::READ, NONE, 1, 0, MIB as u32 + 1, &[]);
    let RawReply::Chunk { kind, payload, .. } = structured.reply(|_| 0) else {
        panic!("structured reads are chunks");
    };
    assert_eq!(kind, ReplyType::ERROR);
    assert_eq!(&payload[..4], &75u32.to_be_bytes(), "EOVERFLOW");
    server.stop().unwrap();
}

#[test]
fn block_status_through_raw_requests() {
    let (server, _) = gated_server(vec![], Limits::default());
    let mut client = RawClient::connect(&server.socket, "disk", true);
    client.send(Command::WRITE, NONE, 1, 8192, 8192, &[7; 8192]);
    assert_eq!(client.reply(|_| 0), simple(1, 0, vec![]));
    let status = |client: &mut RawClient, flags, length| {
        client.send(Command::BLOCK_STATUS, flags, 9, 0, length, &[]);
        let RawReply::Chunk {
            kind,
            flags,
            payload,
            ..
        } = client.reply(|_| 0)
        else {
            panic!("block status is a chunk");
        };
        assert_eq!((kind, flags), (ReplyType::BLOCK_STATUS, 1));
        payload[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        status(&mut client, CommandFlags::REQ_ONE, 65536),
        [(8192, 3)]
    );
    assert_eq!(status(&mut client, CommandFlags::REQ_ONE, 100), [(100, 3)]);
    let all = status(&mut client, NONE, 65536);
    assert_eq!(&all[..2], &[(8192, 3), (8192, 0)]);
    assert_eq!(all[2].1, 3);
    server.stop().unwrap();
}

#[test]
fn a_client_vanishing_mid_request_leaves_the_others_served() {
    let (server, _) = gated_server(vec![], Limits::default());
    let mut steady = RawClient::connect(&server.socket, "disk", false);
    for cut in [1000usize, 28 + 10, 5] {
        let mut vanishing = RawClient::connect(&server.socket, "disk", false);
        let header_and_some = {
            let mut bytes = nbdcrypt::nbd::proto::transmission::RequestHeader {
                flags: NONE,
                command: Command::WRITE,
                cookie: 1,
                offset: 0,
                length: MIB as u32,
            }
            .encode()
            .to_vec();
            bytes.extend(std::iter::repeat_n(9u8, 1000));
            bytes
        };
        use std::io::Write;
        vanishing
            .stream()
            .write_all(&header_and_some[..cut])
            .unwrap();
        drop(vanishing);
        steady.send(Command::WRITE, NONE, 2, 512, 3, b"one");
        assert_eq!(steady.reply(|_| 0), simple(2, 0, vec![]));
    }
    // A header promising 4 GiB, some of it, then gone.
    let mut huge = RawClient::connect(&server.socket, "disk", false);
    huge.send(
        Command::WRITE,
        NONE,
        1,
        0,
        u32::MAX,
        &random_bytes(4 * MIB as usize),
    );
    drop(huge);
    let mut fresh = RawClient::connect(&server.socket, "disk", false);
    fresh.send(Command::READ, NONE, 3, 512, 3, &[]);
    assert_eq!(fresh.reply(|_| 3), simple(3, 0, b"one".to_vec()));
    steady.send(Command::READ, NONE, 4, 0, 3, &[]);
    assert_eq!(
        steady.reply(|_| 3),
        simple(4, 0, vec![0; 3]),
        "nothing of the vanished writes landed"
    );
    server.stop().unwrap();
}

/// Connects and reads the greeting; `None` if the server closed at once.
fn greeted(server: &TestServer) -> Option<UnixStream> {
    let mut stream = UnixStream::connect(&server.socket).unwrap();
    let mut greeting = [0; 18];
    stream.read_exact(&mut greeting).ok().map(|_| stream)
}

#[test]
fn connections_over_the_limit_are_closed_until_a_slot_frees() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let (server, _) = gated_server(vec![], limits);
    let first = RawClient::connect(&server.socket, "disk", false);
    let _second = greeted(&server).expect("second connection is within the limit");
    assert!(greeted(&server).is_none(), "third connection is closed");
    drop(first);
    // The slot frees once the server has seen the first client go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut third = loop {
        if let Some(stream) = greeted(&server) {
            break stream;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::io::Write;
    third.write_all(&3u32.to_be_bytes()).unwrap();
    server.stop().unwrap();
}

#[test]
fn shutdown_answers_requests_in_flight_then_flushes() {
    let (server, gate) = gated_server(vec![0], Limits::default());
    let mut client = RawClient::connect(&server.socket, "disk", false);
    let _in_handshake = greeted(&server).unwrap();
    client.send(Command::WRITE, NONE, 1, 0, 4, b"last");
    gate.wait_for_waiters(1);
    let flushes_before = gate.inner.flushes();
    let socket = server.socket.clone();
    let stopping = std::thread::spawn(move || server.stop());
    // Give the shutdown signal time to arrive while the write is held (if
    // it arrives later, the test proves less, but cannot fail wrongly).
    std::thread::sleep(Duration::from_millis(100));
    gate.open();
    assert_eq!(client.reply(|_| 0), simple(1, 0, vec![]));
    assert!(client.closed());
    stopping.join().unwrap().unwrap();
    assert!(
        gate.inner.flushes() > flushes_before,
        "the final flush happened"
    );
    assert!(UnixStream::connect(&socket).is_err(), "no longer accepting");
}
