#!/usr/bin/env bash
# Benchmarks, printed as tables.
#
# Sector cipher: the criterion bench (benches/xts.rs: our AES-XTS both ways at
# 4096- and 512-byte sectors, raw AES-256-ECB through the same `aes` crate,
# the xts-mode crate) beside `openssl speed -evp aes-256-xts` at the same
# sizes, and the time of a call for one 4096-byte sector, as a 4k request
# makes it; and the volume's data path without the network from one thread and
# from two (benches/volume.rs), for how it scales with cores.
#
# End to end: `nbdcrypt serve` (release build, a fresh 1 GiB volume on the
# embedded local KMS) through the shared peer benchmark
# (../shared/bench/peers.sh, next to this repository), in the same rounds as
# nbdkit's file plugin (no encryption), nbdkit's luks filter and qemu-nbd
# with LUKS, one server after the other: fio's nbd
# engine over a Unix socket, 4k random reads and writes at iodepth 32, 1M
# sequential reads and writes at iodepth 8, one connection each; nbdcopy of
# 1 GiB both ways. Beside that, in each round: nbdcrypt held to one CPU with
# taskset against its run on all CPUs, its peak RSS (ru_maxrss, whole life:
# prefill, fio, nbdcopy), and 4k random reads at iodepth 1 against nbdkit's
# file plugin for the p99 latency.
#
# The machine this runs on is shared and noisy, so everything runs ROUNDS
# times in alternation; tables give the median and the range over the rounds,
# and ratios are taken within a round, then summarised.
#
# Copies: nbdcopy of 1 GiB into a fresh disk and back out, nbdcrypt against
# nbdkit's file plugin, in more rounds than the rest, since copies into a
# fresh disk stall now and then on this kind of VM (see copy_round).
#
# Usage: scripts/bench.sh [cipher|e2e|copy|all]       (default all)
#   ROUNDS=3            rounds of the cipher and end-to-end parts
#   COPY_ROUNDS=8       rounds of the copies
#   RUNTIME=10          seconds per fio job (plus 2 s ramp)
#   PEER_SERVERS="nbdkit-file nbdkit-luks qemu-nbd-luks"   (names from peers.sh)
#   WAIT_IDLE=<loadavg> wait (up to 300 s) for a quieter machine before each server
#   VOLUME_FLAGS=--preallocate   extra flags of nbdcrypt's `volume create`
#   PEERS=../shared/bench/peers.sh   BENCH_DIR=$TMPDIR/nbdcrypt-bench
set -euo pipefail
cd "$(dirname "$0")/.."

WHAT=${1:-all}
ROUNDS=${ROUNDS:-3}
COPY_ROUNDS=${COPY_ROUNDS:-8}
RUNTIME=${RUNTIME:-10}
PEER_SERVERS=${PEER_SERVERS:-"nbdkit-file nbdkit-luks qemu-nbd-luks"}
PEERS=${PEERS:-../shared/bench/peers.sh}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}/nbdcrypt-bench}
export NBDCRYPT_VOLUME_FLAGS=${VOLUME_FLAGS:-}
TARGET=${CARGO_TARGET_DIR:-target}
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT

case $WHAT in
cipher | e2e | copy | all) ;;
*)
    echo "usage: scripts/bench.sh [cipher|e2e|copy|all]" >&2
    exit 2
    ;;
esac
# Whether the run includes part $1.
part() { [[ $WHAT == all || $WHAT == "$1" ]]; }

if part e2e; then
    [[ -f $PEERS ]] || {
        echo "bench: $PEERS not found (set PEERS=path/to/peers.sh)" >&2
        exit 1
    }
fi
if part e2e || part copy; then
    # What the peers script asks for, whichever servers it runs, with the
    # Debian package that brings each.
    declare -A NEEDS=(
        [fio]=fio [nbdkit]=nbdkit [nbdcopy]=libnbd-bin [nbdinfo]=libnbd-bin
        [nbd-server]=nbd-server [qemu-nbd]=qemu-utils [jq]=jq [taskset]=util-linux
    )
    for tool in "${!NEEDS[@]}"; do
        command -v "$tool" >/dev/null || {
            echo "bench: $tool not found (apt-get install ${NEEDS[$tool]})" >&2
            exit 1
        }
    done
fi

cargo build --release --quiet
NBDCRYPT_BIN=$(realpath "$TARGET/release/nbdcrypt")
export NBDCRYPT_BIN

# ------------------------------------------------------------ sector cipher
# One round of the sector cipher benches: criterion's estimates and OpenSSL's
# bytes per second, copied into $RESULTS tagged with the round.
crypto_round() {
    local round=$1 direction flag bytes dir
    if ! cargo bench --quiet --bench xts -- --noplot >"$RESULTS/criterion.log" 2>&1; then
        cat "$RESULTS/criterion.log" >&2
        return 1
    fi
    for dir in "$TARGET"/criterion/xts/*/new; do
        cp "$dir/estimates.json" "$RESULTS/$(basename "$(dirname "$dir")").$round.criterion"
    done
    for dir in "$TARGET"/criterion/xts-request/*/new; do
        cp "$dir/estimates.json" "$RESULTS/request_$(basename "$(dirname "$dir")").$round.criterion"
    done
    # The data path from one thread and from two, on all CPUs and then held
    # to one with taskset.
    local cpus
    for cpus in all one; do
        local pin=()
        [[ $cpus == one ]] && pin=(taskset -c 0)
        if ! "${pin[@]}" cargo bench --quiet --bench volume -- volume_threads --noplot \
            >>"$RESULTS/criterion.log" 2>&1; then
            cat "$RESULTS/criterion.log" >&2
            return 1
        fi
        for dir in "$TARGET"/criterion/volume_threads/*/new; do
            cp "$dir/estimates.json" "$RESULTS/threads_${cpus}_$(basename "$(dirname "$dir")").$round.criterion"
        done
    done
    for direction in encrypt decrypt; do
        flag=()
        [ "$direction" = decrypt ] && flag=(-decrypt)
        for bytes in 4096 512; do
            openssl speed "${flag[@]}" -evp aes-256-xts -bytes "$bytes" -seconds 3 -mr 2>/dev/null |
                awk -F: '/^\+F:/ { print $4 }' >"$RESULTS/openssl_${direction}_$bytes.$round.openssl"
        done
    done
}

# ------------------------------------------------------------ end to end
DB=db-BENCH00000000000000000001
# Run by peers.sh (bash -c, in its own process group, with WORK, SOCK, SIZE,
# RUNDIR exported): a fresh KMS, key and volume, then the server, under a
# wrapper that records its peak RSS when it exits.
SERVER_CMD='set -e
export NBDCRYPT_KMS_DIR=$WORK/nbdcrypt-kms
rm -rf "$NBDCRYPT_KMS_DIR" "$WORK/nbdcrypt.vol"
"$NBDCRYPT_BIN" kms create-key --alias alias/bench >/dev/null
"$NBDCRYPT_BIN" volume create "$WORK/nbdcrypt.vol" --size "$SIZE" --kms-key alias/bench \
    --db-id '"$DB"' --vol-id vol-bench $NBDCRYPT_VOLUME_FLAGS >/dev/null
exec $NBDCRYPT_TASKSET python3 "$NBDCRYPT_RSS_WRAPPER" "$NBDCRYPT_RSS_FILE" \
    "$NBDCRYPT_BIN" serve --unix "$SOCK" --db-id '"$DB"' "$WORK/nbdcrypt.vol"'

# peers.sh stops a server with SIGTERM to its process group; the wrapper
# ignores it, waits for the server to finish, and appends its ru_maxrss (KiB).
cat >"$RESULTS/rss.py" <<'EOF'
import resource, signal, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
code = child.wait()
with open(sys.argv[1], "a") as f:
    f.write(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\n")
sys.exit(code)
EOF
export NBDCRYPT_RSS_WRAPPER=$RESULTS/rss.py

# peers.sh for one server, a peer or nbdcrypt (its extra server): $1 results
# dir, $2 server name, $3 CPU list for taskset (empty: all), $4 the peer
# (empty: nbdcrypt). One server a call, with the prefill's source read into
# the page cache just before: this VM pages out file data left idle for a
# minute, so within one call the copy into a server that came after another's
# fio suite read its source from the disk, and measured the disk.
run_peers() {
    local cpus=() log=$1.log extra=$SERVER_CMD
    [[ -n $3 ]] && cpus=(taskset -c "$3")
    [[ -n $4 ]] && extra=
    mkdir -p "$1"
    echo "  peers.sh: ${4:-$2}" >&2
    [[ -f $BENCH_DIR/work/src.bin ]] && cat "$BENCH_DIR/work/src.bin" >/dev/null
    RES=$1 BASE=$BENCH_DIR SERVERS=$4 RUNTIME=$RUNTIME TLS_PROBE=0 \
        EXTRA_NAME=$2 EXTRA_SERVER_CMD=$extra EXTRA_BACKING=$BENCH_DIR/work/nbdcrypt.vol \
        NBDCRYPT_TASKSET="${cpus[*]}" NBDCRYPT_RSS_FILE=$1/$2.maxrss \
        bash "$PEERS" >"$log" 2>&1 || {
        tail -5 "$log" >&2
        return 1
    }
}

# Starts $1 (nbdkit-file or nbdcrypt) on $2/sock over a fresh 1 GiB disk in
# $2, filled with the peers' random data if $3 is "filled", else empty: a
# sparse raw image, or a new volume. Sets SERVER_PID and SERVER_URI; the log
# goes to $4.
start_disk() {
    local name=$1 work=$2 fill=$3 log=$4
    rm -f "$work/sock" "$work/raw.img"
    if [[ $name == nbdkit-file ]]; then
        if [[ $fill == filled ]]; then
            cp "$BENCH_DIR/work/src.bin" "$work/raw.img"
        else
            truncate -s 1G "$work/raw.img"
        fi
        setsid nbdkit -f -U "$work/sock" file "$work/raw.img" </dev/null >"$log" 2>&1 &
    else
        rm -rf "$work/kms" "$work/nbdcrypt.vol"
        NBDCRYPT_KMS_DIR=$work/kms "$NBDCRYPT_BIN" kms create-key --alias alias/bench >/dev/null 2>&1
        NBDCRYPT_KMS_DIR=$work/kms "$NBDCRYPT_BIN" volume create "$work/nbdcrypt.vol" --size 1G \
            --kms-key alias/bench --db-id "$DB" --vol-id vol-bench $NBDCRYPT_VOLUME_FLAGS >/dev/null
        NBDCRYPT_KMS_DIR=$work/kms setsid "$NBDCRYPT_BIN" serve --unix "$work/sock" --db-id "$DB" \
            "$work/nbdcrypt.vol" </dev/null >"$log" 2>&1 &
    fi
    SERVER_PID=$!
    SERVER_URI="nbd+unix:///?socket=$work/sock"
    for _ in $(seq 100); do nbdinfo --size "$SERVER_URI" >/dev/null 2>&1 && break || sleep 0.1; done
    [[ $name == nbdcrypt && $fill == filled ]] && nbdcopy "$BENCH_DIR/work/src.bin" "$SERVER_URI"
    return 0
}

stop_disk() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
}

# 4k random reads at iodepth 1 for the p99 latency (peers.sh has no such
# job): nbdkit's file plugin on a raw copy of the peers' random data against
# nbdcrypt on a volume filled with it. $1 results dir.
qd1_round() {
    local dir=$1 work=$BENCH_DIR/qd1 name
    mkdir -p "$dir" "$work"
    for name in nbdkit-file nbdcrypt; do
        start_disk "$name" "$work" filled "$dir/$name.log"
        fio --name=qd1 --ioengine=nbd --uri="$SERVER_URI" --rw=randread --bs=4k --iodepth=1 \
            --runtime="$RUNTIME" --time_based --ramp_time=2 --lat_percentiles=1 \
            --output-format=json --output="$dir/$name.json" >/dev/null 2>&1 || true
        stop_disk
    done
    rm -rf "$work"
}

# nbdcopy of 1 GiB into a fresh disk and back out to /dev/null, nbdcrypt
# against nbdkit's file plugin, which comes first in every other round. A
# copy into a fresh disk stalls now and then on this kind of VM, whichever
# server takes it: the page cache it fills may land on memory the guest
# gave back to its host (free page reporting), which the host must fault in
# again, so the copy into the page cache crawls (perf: 33% of a stalled
# copy's samples in copy_folio_from_iter_atomic, against 6% of a quick
# one's). The e2e rounds copy once per server; these rounds are cheap, so
# there are more of them. $1 round.
copy_round() {
    local dir=$RESULTS/copy work=$BENCH_DIR/copy name t0 t1 names=(nbdkit-file nbdcrypt)
    mkdir -p "$dir" "$work"
    (($1 % 2)) || names=(nbdcrypt nbdkit-file)
    for name in "${names[@]}"; do
        cat "$BENCH_DIR/work/src.bin" >/dev/null
        start_disk "$name" "$work" empty "$dir/$name.log"
        t0=$EPOCHREALTIME
        nbdcopy "$BENCH_DIR/work/src.bin" "$SERVER_URI"
        t1=$EPOCHREALTIME
        nbdcopy "$SERVER_URI" /dev/null
        printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$name" "$t0" "$t1" "$EPOCHREALTIME" >>"$dir/copy.tsv"
        stop_disk
    done
    rm -rf "$work"
}

e2e_round() {
    local round=$1 dir=$RESULTS/e2e.$1
    echo "end to end: round $round of $ROUNDS" >&2
    local peer
    for peer in $PEER_SERVERS; do
        run_peers "$dir/peers/$peer" "$peer" "" "$peer"
    done
    run_peers "$dir/peers/nbdcrypt" nbdcrypt "" ""
    run_peers "$dir/one-cpu" nbdcrypt-1cpu 0 ""
    echo "  4k random reads at iodepth 1" >&2
    qd1_round "$dir/qd1"
}

for round in $(seq 1 "$ROUNDS"); do
    if part cipher; then
        echo "sector cipher: round $round of $ROUNDS" >&2
        crypto_round "$round"
    fi
    if part e2e; then
        e2e_round "$round"
    fi
done
if part copy; then
    # The peers' random data, made as peers.sh makes it when it is not there.
    if [[ $(stat -c %s "$BENCH_DIR/work/src.bin" 2>/dev/null) != 1073741824 ]]; then
        mkdir -p "$BENCH_DIR/work"
        head -c 1073741824 /dev/urandom >"$BENCH_DIR/work/src.bin"
    fi
    for round in $(seq 1 "$COPY_ROUNDS"); do
        echo "copies: round $round of $COPY_ROUNDS" >&2
        copy_round "$round"
    done
fi

if part cipher; then
    python3 - "$RESULTS" <<'EOF'
import glob, json, os, sys

results = sys.argv[1]
MIB = 1 << 20

def best(name):
    """Best GB/s (10^9 bytes/s) over the rounds of one row."""
    rates = []
    for path in glob.glob(os.path.join(results, name + ".*")):
        if path.endswith(".criterion"):
            with open(path) as f:
                rates.append(MIB / json.load(f)["median"]["point_estimate"])
        elif path.endswith(".openssl"):
            with open(path) as f:
                rates.append(float(f.read()) / 1e9)
    return max(rates)

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
features = " ".join(f for f in ("aes", "vaes", "avx512f", "avx2") if f in flags)
print(f"\nSector cipher, one thread, 1 MiB buffer; {cpu} ({features}); best of the rounds, GB/s = 10^9 B/s")
print(f"{'':28} {'GB/s':>7} {'x openssl':>10} {'x raw ECB':>10}")
for direction in ("encrypt", "decrypt"):
    ecb = best(f"aes256-ecb_{direction}")
    for size in (4096, 512):
        ours = best(f"{direction}_{size}")
        openssl = best(f"openssl_{direction}_{size}")
        print(f"{'nbdcrypt ' + direction + ' ' + str(size):28} {ours:7.2f} {ours / openssl:10.2f} {ours / ecb:10.2f}")
    for size in (4096, 512):
        openssl = best(f"openssl_{direction}_{size}")
        print(f"{'openssl ' + direction + ' ' + str(size):28} {openssl:7.2f} {'':>10} {openssl / ecb:10.2f}")
    print(f"{'raw AES-256-ECB ' + direction:28} {ecb:7.2f}")
print(f"{'xts-mode encrypt 4096':28} {best('xts-mode_encrypt_4096'):7.2f}")
# A call for one sector pays what a 1 MiB buffer spreads out; `best` is
# MiB per ns, so the fastest call's ns is its inverse times a MiB, and
# `openssl speed -bytes 4096` times such calls too.
print("One 4096-byte sector per call, as a 4k request makes it (best of the rounds):")
for direction in ("encrypt", "decrypt"):
    ns = MIB / best(f"request_{direction}_4096")
    openssl = 4096 / best(f"openssl_{direction}_4096")
    print(f"  {direction} {ns:.0f} ns, openssl {openssl:.0f} ns: x {openssl / ns:.2f} openssl")

print("\nData path without the network (benches/volume.rs): 1 MiB reads and writes through the")
print("volume, page cache and cipher, from 1 thread and from 2 at once, on all CPUs and held to")
print("one with `taskset -c 0`; best of the rounds, GB/s")
print(f"{'':16} {'1 thread':>9} {'2 threads':>10} {'x':>6} {'2 threads, 1 CPU':>17} {'x all/1 CPU':>12}")
for op in ("read", "write"):
    one, two = best(f"threads_all_{op}_1"), best(f"threads_all_{op}_2")
    pinned = best(f"threads_one_{op}_2")
    print(f"{'1 MiB ' + op + 's':16} {one:9.2f} {two:10.2f} {two / one:6.2f} {pinned:17.2f} {two / pinned:12.2f}")
EOF
fi

if part e2e; then
    python3 - "$RESULTS" "$PEER_SERVERS" <<'EOF'
import csv, glob, json, os, statistics, sys

results, peers = sys.argv[1], sys.argv[2].split()
rounds = sorted(glob.glob(os.path.join(results, "e2e.*")), key=lambda p: int(p.rsplit(".", 1)[1]))
JOBS = [("randread", "4k randread qd32", "IOPS"), ("randwrite", "4k randwrite qd32", "IOPS"),
        ("read", "1M read qd8", "MB/s"), ("write", "1M write qd8", "MB/s")]
COPIES = [("file-to-export", "nbdcopy 1 GiB in"), ("export-to-devnull", "nbdcopy 1 GiB out")]

def fio(pattern):
    """{(server, job): row} from the peers.sh results.tsv files that match."""
    out = {}
    for path in glob.glob(pattern):
        for row in csv.DictReader(open(path), delimiter="\t"):
            out[(row["server"], row["job"])] = row
    return out

def copies(pattern):
    out = {}
    for path in glob.glob(pattern):
        for row in csv.reader(open(path), delimiter="\t"):
            if len(row) >= 4 and row[3] not in ("", "-", "MBps"):
                out[(row[0], row[1])] = float(row[3])
    return out

def value(rows, server, job, unit):
    row = rows.get((server, job))
    if not row:
        return None
    return float(row["iops"] if unit == "IOPS" else row["MBps"])

def summary(values, fmt="{:.0f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

def ratio(a, b):
    return a / b if a is not None and b else None

per_round = []
for r in rounds:
    per_round.append({
        "fio": fio(os.path.join(r, "peers", "*", "results.tsv")),
        "copy": copies(os.path.join(r, "peers", "*", "nbdcopy.tsv")),
        "fio1": fio(os.path.join(r, "one-cpu", "results.tsv")),
        "copy1": copies(os.path.join(r, "one-cpu", "nbdcopy.tsv")),
        "dir": r,
    })

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = os.environ.get("NBDCRYPT_VOLUME_FLAGS") or "none"
print(f"\nEnd to end, {len(rounds)} rounds; {os.cpu_count()} CPUs, {cpu}. fio nbd engine over a Unix socket,"
      " 1 GiB, one connection per job; median [range] over the rounds; ratios taken within each round."
      f" nbdcrypt volume flags: {flags}.")
header = f"{'':22} {'nbdcrypt':>22}"
for p in peers:
    header += f" {p:>20} {'x ' + p:>20}"
print(header)
def line(label, get):
    ours = [get(d, "nbdcrypt") for d in per_round]
    text = f"{label:22} {summary(ours):>22}"
    for p in peers:
        theirs = [get(d, p) for d in per_round]
        text += f" {summary(theirs):>20} {summary([ratio(a, b) for a, b in zip(ours, theirs)], '{:.2f}'):>20}"
    print(text)
for job, label, unit in JOBS:
    line(f"{label} {unit}", lambda d, s, job=job, unit=unit: value(d["fio"], s, job, unit))
for direction, label in COPIES:
    line(f"{label} MB/s", lambda d, s, direction=direction: d["copy"].get((s, direction)))

print("\nServer CPU per request, µs (srv_cpu% / IOPS; lower is better):")
for job, label, unit in JOBS:
    def cost(d, s, job=job):
        row = d["fio"].get((s, job))
        return float(row["srv_cpu"]) * 1e4 / float(row["iops"]) if row and float(row["iops"]) else None
    text = f"  {label:20}"
    for s in ["nbdcrypt"] + peers:
        text += f" {s} {summary([cost(d, s) for d in per_round], '{:.1f}')};"
    print(text.rstrip(";"))

# On a 2-CPU machine the client has one CPU to itself at most: fio near 100%
# of one means the job measured the client, whatever the server does.
print("\nfio's own CPU in nbdcrypt's jobs, % of one CPU (the client's ceiling is 100):")
for job, label, unit in JOBS:
    busy = [float(d["fio"][("nbdcrypt", job)]["fio_cpu"]) for d in per_round if ("nbdcrypt", job) in d["fio"]]
    print(f"  {label:20} {summary(busy)}")

print("\nScaling: nbdcrypt on all CPUs against `taskset -c 0` (one CPU), ratio within each round:")
for job, label, unit in JOBS:
    two = [value(d["fio"], "nbdcrypt", job, unit) for d in per_round]
    one = [value(d["fio1"], "nbdcrypt-1cpu", job, unit) for d in per_round]
    print(f"  {label:20} 1 CPU {summary(one)}  all {summary(two)}  x {summary([ratio(a, b) for a, b in zip(two, one)], '{:.2f}')}")
for direction, label in COPIES:
    two = [d["copy"].get(("nbdcrypt", direction)) for d in per_round]
    one = [d["copy1"].get(("nbdcrypt-1cpu", direction)) for d in per_round]
    print(f"  {label:20} 1 CPU {summary(one)}  all {summary(two)}  x {summary([ratio(a, b) for a, b in zip(two, one)], '{:.2f}')}")

rss = []
for d in per_round:
    for path in glob.glob(os.path.join(d["dir"], "**", "*.maxrss"), recursive=True):
        rss += [int(x) / 1024 for x in open(path).read().split()]
print(f"\nnbdcrypt peak RSS (whole life of each server: prefill, fio suite, nbdcopy), MiB: {summary(rss, '{:.1f}')}")

def p99(path):
    try:
        job = json.load(open(path))["jobs"][0]["read"]
        return job["lat_ns"]["percentile"]["99.000000"] / 1000, job["iops"]
    except (OSError, KeyError, ValueError, IndexError):
        return None, None
ours = [p99(os.path.join(d["dir"], "qd1", "nbdcrypt.json")) for d in per_round]
theirs = [p99(os.path.join(d["dir"], "qd1", "nbdkit-file.json")) for d in per_round]
print("4k random reads, iodepth 1: p99 latency µs (IOPS): "
      f"nbdcrypt {summary([o[0] for o in ours])} ({summary([o[1] for o in ours])}); "
      f"nbdkit-file {summary([t[0] for t in theirs])} ({summary([t[1] for t in theirs])}); "
      f"x {summary([ratio(o[0], t[0]) for o, t in zip(ours, theirs)], '{:.2f}')}")
EOF
fi

if part copy; then
    python3 - "$RESULTS/copy/copy.tsv" <<'EOF'
import collections, statistics, sys

GIB = 1 << 30
rounds = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, name, t0, t1, t2 = line.split()
    rounds[r][name] = (GIB / (float(t1) - float(t0)) / 1e6, GIB / (float(t2) - float(t1)) / 1e6)

def summary(values, fmt):
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

print(f"\nnbdcopy of 1 GiB, {len(rounds)} alternating rounds, fresh disks; MB/s, median [range]; ratio within each round:")
for i, label in enumerate(("into a fresh disk", "out to /dev/null")):
    pairs = [(d["nbdcrypt"][i], d["nbdkit-file"][i]) for d in rounds.values() if len(d) == 2]
    ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
    ratios = [a / b for a, b in pairs]
    print(f"  {label:18} nbdcrypt {summary(ours, '{:.0f}')}  nbdkit-file {summary(theirs, '{:.0f}')}"
          f"  x {summary(ratios, '{:.2f}')}")
EOF
fi
