#!/usr/bin/env bash
# Long fuzzing runs (not part of scripts/test.sh): each cargo-fuzz target in
# fuzz/ for SECONDS seconds (default 600), one after the other, starting from
# its seed corpus in fuzz/corpus/<target>/. New interesting inputs go to a
# working corpus outside the tree; a crash stops the run and is copied to
# fuzz/regressions/<target>/, which the normal test suite replays
# (tests/fuzz_regressions.rs) once the bug is fixed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (installed on first use) and libFuzzer's unstable flags,
# which a nightly toolchain gives; with only stable, RUSTC_BOOTSTRAP=1 lets
# stable rustc accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-600}
shift || true
mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | tail -n +2)
targets=("${@:-${all[@]}}")

command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
if rustup run nightly rustc --version > /dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
work=${FUZZ_WORK:-${TMPDIR:-/tmp}/nbdcrypt-fuzz}
# The header target writes (and fsyncs) a scratch file per input: keep it
# in memory when the machine has a tmpfs.
[[ -d /dev/shm ]] && export TMPDIR=/dev/shm

cargo "${toolchain[@]}" fuzz build -O
for target in "${targets[@]}"; do
  mkdir -p "$work/$target" "artifacts/$target"
  echo "fuzz.sh: $target for ${seconds}s" >&2
  set +e
  cargo "${toolchain[@]}" fuzz run -O "$target" "$work/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 \
    2>&1 | tee "$work/$target.log" | grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|Done|==[0-9]+==|.*panicked)'
  status=${PIPESTATUS[0]}
  set -e
  if ls "artifacts/$target"/crash-* "artifacts/$target"/oom-* "artifacts/$target"/timeout-* > /dev/null 2>&1; then
    mkdir -p "regressions/$target"
    cp "artifacts/$target"/* "regressions/$target/"
    echo "fuzz.sh: $target found a failure; inputs copied to fuzz/regressions/$target/ (log: $work/$target.log)" >&2
    exit 1
  fi
  if ((status != 0)); then
    echo "fuzz.sh: $target: cargo fuzz failed (exit $status); see $work/$target.log" >&2
    exit 1
  fi
done
echo "fuzz.sh: ${targets[*]}: no failure in ${seconds}s each" >&2
