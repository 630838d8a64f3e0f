#!/usr/bin/env bash
# Benchmarks, printed as one table.
#
# Sector cipher: the criterion bench (benches/xts.rs: our AES-XTS both ways at
# 4096- and 512-byte sectors, raw AES-256-ECB through the same `aes` crate,
# the xts-mode crate) beside `openssl speed -evp aes-256-xts` at the same
# sizes. The machine this runs on is shared and noisy, so the suites run in
# alternation, ROUNDS times, and each row reports its best round (criterion's
# median of that round): every row gets the same chances, and ratios are only
# ever taken between rows of the same run.
#
# Usage: scripts/bench.sh            ROUNDS=5 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
TARGET=${CARGO_TARGET_DIR:-target}
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT

cargo build --release --quiet

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
    for direction in encrypt decrypt; do
        flag=()
        [ "$direction" = decrypt ] && flag=(-decrypt)
        for bytes in 4096 512; do
            openssl speed "${flag[@]}" -evp aes-256-xts -bytes "$bytes" -seconds 3 -mr 2>/dev/null |
                awk -F: '/^\+F:/ { print $4 }' >"$RESULTS/openssl_${direction}_$bytes.$round.openssl"
        done
    done
}

for round in $(seq 1 "$ROUNDS"); do
    echo "sector cipher: round $round of $ROUNDS" >&2
    crypto_round "$round"
done

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
        else:
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
EOF
