//! Snapshots of a served volume, through the control socket, while NBD
//! clients keep writing: our own writers (writes, zeroing and trims of one to
//! three blocks, each logged with a logical clock when issued and when
//! acknowledged) and fio with verification. Each snapshot, restored, must
//! hold a prefix of the logged history; the control socket itself must be
//! owner-only and answer every request line.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::nbd::{RawClient, RawReply};
use common::{DB, Env, Server, attach_args, plaintext, s, snapshot_args};
use nbdcrypt::nbd::proto::wire::{Command, CommandFlags};
use serde_json::{Value, json};

const VOL: &str = "vol-0a1b2c3d";
const BLOCK: u64 = 4096;
/// Our writers use the first half of the 64 MiB volume, fio the second.
const BLOCKS: u64 = 8192;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Write,
    Zero,
    Trim,
}

/// One acknowledged request.
#[derive(Clone, Debug)]
struct Logged {
    id: u64,
    op: Op,
    first: u64,
    blocks: u64,
    issued: u64,
    acked: u64,
}

/// What our writers share: a logical clock (every issue and every
/// acknowledgement takes a tick, as does the start and end of each
/// snapshot), the log, and which blocks have a request in flight, so that
/// the requests on one block are ordered.
struct History {
    clock: AtomicU64,
    log: Mutex<Vec<Logged>>,
    busy: Vec<AtomicBool>,
    stop: AtomicBool,
}

impl History {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
    fn acked(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

/// The 4 KiB a write puts in `block`: its id, the block, then a fill.
fn pattern(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![((id ^ block) as u8) | 1; BLOCK as usize];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b
}

fn writer(socket: &Path, history: &History, seed: u64) {
    let mut client = RawClient::connect(socket, VOL, false);
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    while !history.stop.load(Ordering::Relaxed) {
        let blocks = 1 + next() % 3;
        let first = next() % (BLOCKS - blocks + 1);
        let claimed = (first..first + blocks)
            .take_while(|&b| {
                history.busy[b as usize]
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
            .count() as u64;
        if claimed < blocks {
            for b in first..first + claimed {
                history.busy[b as usize].store(false, Ordering::Release);
            }
            continue;
        }
        let op = match next() % 8 {
            0 => Op::Zero,
            1 => Op::Trim,
            _ => Op::Write,
        };
        let id = history.tick();
        let (offset, len) = (first * BLOCK, (blocks * BLOCK) as u32);
        match op {
            Op::Write => {
                let payload: Vec<u8> = (first..first + blocks)
                    .flat_map(|b| pattern(id, b))
                    .collect();
                client.send(
                    Command::WRITE,
                    CommandFlags::EMPTY,
                    id,
                    offset,
                    len,
                    &payload,
                );
            }
            Op::Zero => client.send(
                Command::WRITE_ZEROES,
                CommandFlags::EMPTY,
                id,
                offset,
                len,
                &[],
            ),
            Op::Trim => client.send(Command::TRIM, CommandFlags::EMPTY, id, offset, len, &[]),
        }
        let reply = client.reply(|_| 0);
        assert_eq!(
            reply,
            RawReply::Simple {
                cookie: id,
                error: 0,
                data: vec![]
            }
        );
        let acked = history.tick();
        history.log.lock().unwrap().push(Logged {
            id,
            op,
            first,
            blocks,
            issued: id,
            acked,
        });
        for b in first..first + blocks {
            history.busy[b as usize].store(false, Ordering::Release);
        }
    }
}

/// Checks that `image` (the restored snapshot's plaintext) is the volume
/// at one point of the logged history between `began` and `ended`, from
/// `initial` contents:
///
/// - every block holds its initial contents, a whole write's pattern, or
///   zeros after a zeroing or trim;
/// - a request acknowledged before the snapshot began is in it (its block
///   holds it or a later request);
/// - a request issued after the snapshot ended is not;
/// - a request is in it on all of its blocks or on none (atomic);
/// - a prefix: every request in it was issued before every request not in
///   it was acknowledged (nothing in the snapshot depends on a request
///   that is missing from it).
///
/// Returns how many requests the snapshot holds.
fn check_prefix(image: &[u8], initial: &[u8], log: &[Logged], began: u64, ended: u64) -> usize {
    // Per block, the requests on it, in order (they never overlap in time).
    let mut per_block: HashMap<u64, Vec<&Logged>> = HashMap::new();
    for w in log {
        for b in w.first..w.first + w.blocks {
            per_block.entry(b).or_default().push(w);
        }
    }
    // Per request: on which blocks it is known to be in (true) or out (false).
    let mut verdicts: HashMap<u64, Vec<bool>> = HashMap::new();
    for block in 0..BLOCKS {
        let data = &image[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
        let history = per_block.remove(&block).unwrap_or_default();
        // Index in `history` of the newest request the block shows; None
        // for the initial zeros. Zeros are ambiguous: any zeroing request,
        // or none.
        let floor = history.iter().rposition(|w| w.acked < began);
        let mut shown: Vec<Option<usize>> = Vec::new();
        if data == &initial[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize] {
            shown.push(None);
        }
        if data.iter().all(|&b| b == 0) {
            shown.extend(
                history
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.op != Op::Write)
                    .map(|(i, _)| Some(i)),
            );
        }
        if shown.is_empty() {
            let id = u64::from_le_bytes(data[..8].try_into().unwrap());
            let at = history
                .iter()
                .position(|w| w.id == id && w.op == Op::Write)
                .unwrap_or_else(|| panic!("block {block} holds {id}, never written there"));
            assert!(
                data == pattern(id, block).as_slice(),
                "block {block}: torn or foreign contents"
            );
            shown.push(Some(at));
        }
        let feasible: Vec<Option<usize>> = shown
            .into_iter()
            .filter(|&s| s >= floor && s.is_none_or(|i| history[i].issued < ended))
            .collect();
        assert!(
            !feasible.is_empty(),
            "block {block}: holds a state from outside the snapshot's window \
             (acknowledged before it began: {:?}; requests: {:?})",
            floor.map(|i| history[i].id),
            history.iter().map(|w| (w.id, w.op)).collect::<Vec<_>>()
        );
        if let [only] = feasible[..] {
            for (i, w) in history.iter().enumerate() {
                verdicts
                    .entry(w.id)
                    .or_default()
                    .push(only.is_some_and(|s| i <= s));
            }
        }
    }
    let mut newest_in = 0;
    let mut oldest_out = u64::MAX;
    let mut held = 0;
    for w in log {
        let Some(v) = verdicts.get(&w.id) else {
            continue;
        };
        assert!(
            v.iter().all(|&x| x == v[0]),
            "request {} ({:?} of {} blocks) is only partly in the snapshot",
            w.id,
            w.op,
            w.blocks
        );
        if v[0] {
            newest_in = newest_in.max(w.issued);
            held += 1;
        } else {
            oldest_out = oldest_out.min(w.acked);
        }
    }
    assert!(
        newest_in < oldest_out,
        "not a prefix: request issued at {newest_in} is in, one acknowledged at {oldest_out} is out"
    );
    held
}

/// fio, verified, on the second half of the export, over and over until
/// told to stop.
fn fio_until(uri: &str, dir: &Path, stop: &AtomicBool) -> usize {
    let mut runs = 0;
    while !stop.load(Ordering::Relaxed) {
        let out = std::process::Command::new("fio")
            .current_dir(dir)
            .args([
                "--name=load",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--offset=32M",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .output()
            .expect("fio (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "fio failed while snapshots were taken: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        runs += 1;
    }
    runs
}

fn wait_for_writes(history: &History, at_least: usize) {
    while history.acked() < at_least {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn snapshots_taken_under_load_each_hold_a_prefix_of_the_writes() {
    let env = Env::new();
    let taken = under_load(&env, "");
    assert!(taken.iter().all(|c| c["bytes_copied"].as_u64() > Some(0)));
}

/// The same on XFS, where the background copy and the writes' copies share
/// blocks with FICLONERANGE while other writes land beside them.
#[test]
fn snapshots_taken_under_load_on_xfs_share_blocks_and_hold_a_prefix() {
    let env = Env::new();
    let _xfs = common::Mount::xfs(&env, "xfs");
    let taken = under_load(&env, "xfs/");
    assert!(
        taken
            .iter()
            .all(|c| c["bytes_reflinked"].as_u64() > Some(0)),
        "{taken:?}"
    );
}

/// Serves a volume in `env`'s folder under `prefix`, takes three snapshots
/// there while writers and fio run, checks each against the log; returns
/// what `snapshot create` said about each.
fn under_load(env: &Env, prefix: &str) -> Vec<Value> {
    env.key("alias/k");
    let vol = env.volume(&format!("{prefix}live.vol"), "64M", "alias/k", VOL);
    // Allocated data under the writers, so that the copy takes a while and
    // the writes race it.
    let raw = env.path("fill.raw");
    let initial = common::random_bytes((BLOCKS * BLOCK) as usize);
    std::fs::write(&raw, &initial).unwrap();
    env.ok(&attach_args("import", s(&vol), s(&raw)));
    let ctl = env.path("ctl.sock");
    let server = Server::start(
        env,
        "s.sock",
        &[
            vol.to_str().unwrap(),
            "--allow-discards",
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    let snaps = env.path(&format!("{prefix}snaps"));
    std::fs::create_dir(&snaps).unwrap();
    let history = Arc::new(History {
        clock: AtomicU64::new(1),
        log: Mutex::new(Vec::new()),
        busy: (0..BLOCKS).map(|_| AtomicBool::new(false)).collect(),
        stop: AtomicBool::new(false),
    });

    let mut taken = Vec::new();
    let uri = server.uri(VOL);
    let fio_runs = std::thread::scope(|s| {
        for seed in 1..=4u64 {
            let (history, socket) = (history.clone(), server.socket.clone());
            s.spawn(move || writer(&socket, &history, seed * 0x9E37_79B9));
        }
        let fio = s.spawn(|| fio_until(&uri, env.dir.path(), &history.stop));
        for n in 1..=3 {
            // Progress, not time: each snapshot sees new writes.
            wait_for_writes(&history, 300 * n);
            let id = format!("snap-live{n}");
            let began = history.tick();
            let created: Value = serde_json::from_str(&env.ok(&[
                "snapshot",
                "create",
                "--server",
                ctl.to_str().unwrap(),
                VOL,
                "--snapshot-id",
                &id,
                "--out",
                snaps.to_str().unwrap(),
                "--json",
            ]))
            .unwrap();
            let ended = history.tick();
            taken.push((created, began, ended));
        }
        history.stop.store(true, Ordering::Relaxed);
        fio.join().unwrap()
    });
    assert!(fio_runs >= 1);

    let log = history.log.lock().unwrap().clone();
    let stats: Value = serde_json::from_str(&env.ok(&[
        "admin",
        "--server",
        ctl.to_str().unwrap(),
        "stats",
        "--json",
    ]))
    .unwrap();
    assert_eq!(stats["snapshots"]["taken"], 3, "{stats}");
    let mut images = Vec::new();
    for (n, (created, began, ended)) in taken.iter().enumerate() {
        let snap = Path::new(created["path"].as_str().unwrap());
        let restored = env.path(&format!("r{n}.vol"));
        env.ok(&[
            "snapshot",
            "restore",
            snap.to_str().unwrap(),
            restored.to_str().unwrap(),
            "--db-id",
            "db-RESTORE1",
            "--vol-id",
            &format!("vol-r{n}"),
        ]);
        let image = plaintext(env, &restored, "db-RESTORE1", &format!("r{n}.raw"));
        let held = check_prefix(&image, &initial, &log, *began, *ended);
        let before = log.iter().filter(|w| w.acked < *began).count();
        assert!(held >= before.min(1), "snapshot {n} holds {held} requests");
        eprintln!(
            "snapshot {n}: {held} of {} logged requests ({before} acknowledged before it began), \
             writes held off {} µs, {} chunks copied first by writes, {:.3} s",
            log.len(),
            created["pause_micros"],
            created["chunks_copied_by_writes"],
            created["seconds"].as_f64().unwrap_or_default()
        );
        images.push(image);
    }
    // The snapshots differ: the writes between them are in the later ones.
    let ours = (BLOCKS * BLOCK) as usize;
    assert!(images[0][..ours] != images[2][..ours]);
    assert_eq!(server.stop().code(), Some(0));
    taken.into_iter().map(|(created, _, _)| created).collect()
}

/// Sends raw lines to the control socket, as any client could.
fn lines(ctl: &Path, requests: &[&str]) -> Vec<Value> {
    let mut stream = UnixStream::connect(ctl).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    requests
        .iter()
        .map(|r| {
            stream.write_all(r.as_bytes()).unwrap();
            stream.write_all(b"\n").unwrap();
            let mut answer = String::new();
            reader.read_line(&mut answer).unwrap();
            serde_json::from_str(&answer).unwrap()
        })
        .collect()
}

#[test]
fn the_control_socket_is_owner_only_and_answers_every_line() {
    let env = Env::new();
    env.key("alias/k");
    let vol = env.volume("a.vol", "16M", "alias/k", VOL);
    let ro = env.volume("b.vol", "16M", "alias/k", "vol-0000ro01");
    let ctl = env.path("ctl.sock");
    let server = Server::start(
        &env,
        "s.sock",
        &[
            vol.to_str().unwrap(),
            &format!("{}:ro", ro.display()),
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();
    let answers = lines(
        &ctl,
        &[
            r#"{"command":"list-exports"}"#,
            "not json",
            r#"{"command":"format-disk"}"#,
            &json!({"command": "snapshot-create", "volume": "vol-nothere1", "snapshot_id": "snap-1", "out": out}).to_string(),
            &json!({"command": "snapshot-create", "volume": VOL, "snapshot_id": "snap-1", "out": "relative"}).to_string(),
            &json!({"command": "snapshot-create", "volume": "vol-0000ro01", "snapshot_id": "snap-ro1", "out": out}).to_string(),
            &json!({"command": "snapshot-create", "volume": "vol-0000ro01", "snapshot_id": "snap-ro1", "out": out}).to_string(),
            r#"{"command":"stats"}"#,
        ],
    );
    let names: Vec<&str> = answers[0]["result"]["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [VOL, "vol-0000ro01"]);
    assert_eq!(answers[0]["result"]["exports"][1]["read_only"], true);
    let error = |i: usize| answers[i]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error(1).contains("not a control request"), "{}", error(1));
    assert!(error(2).contains("format-disk"), "{}", error(2));
    assert!(error(3).contains("no volume"), "{}", error(3));
    assert!(error(4).contains("absolute"), "{}", error(4));
    assert_eq!(
        answers[5]["ok"], true,
        "a read-only export can be snapshotted"
    );
    assert!(error(6).contains("exists already"), "{}", error(6));
    let stats = &answers[7]["result"];
    assert_eq!(stats["snapshots"]["taken"], 1);
    assert_eq!(
        stats["snapshots"]["failed"], 1,
        "requests refused before starting are not counted"
    );
    assert_eq!(stats["db_id"], DB);

    // The CLI's view of the same.
    let human = env.ok(&["admin", "--server", ctl.to_str().unwrap(), "list-exports"]);
    assert!(human.contains(VOL) && human.contains("ro"), "{human}");
    let err = env.fails(&[
        "snapshot",
        "create",
        "--server",
        env.path("nothing.sock").to_str().unwrap(),
        VOL,
        "--snapshot-id",
        "snap-2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("cannot reach"), "{err}");
    // Offline, a served volume is refused, with the way to do it online.
    let err = env.fails(&snapshot_args(s(&vol), "snap-3", s(&out)));
    assert!(
        err.contains("in use") && err.contains("snapshot create --server"),
        "{err}"
    );

    // Another user is turned away, before it can send anything, even when
    // the file modes would let it in.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); \
         print(s.makefile().readline())",
        ctl.to_str().unwrap()
    );
    let other = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .uid(65534)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&other.stdout);
    assert!(
        answer.contains("\"ok\":false") && answer.contains("owner"),
        "{answer}{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert_eq!(server.stop().code(), Some(0));
    assert!(!ctl.exists(), "the control socket is removed at exit");
}
