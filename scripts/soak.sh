#!/usr/bin/env bash
# Soak test (not part of scripts/test.sh): one `nbdcrypt serve` under fio
# verify jobs on four NBD connections for SECONDS (default 600), while the
# volume's CMK gets new key material every ROTATE_EVERY seconds (default 30)
# and an online snapshot is taken through the server's control socket every
# SNAPSHOT_EVERY seconds (default 60). Afterwards the server is stopped (its
# final flush), the volume key is re-wrapped under the CMK's newest material
# (`volume rekey`), the server is restarted, and the whole volume must read
# back the same as before the stop. The last snapshot is restored to a new
# volume, which must be served and read end to end without an error.
#
#   scripts/soak.sh [SECONDS]
#
# Reports: errors (fio's, and warnings or errors in the server log; the run
# fails on any), the server's RSS over time, throughput, rotations and
# snapshots done, and whether the audit log's hash chain verifies.
# Everything stays in a temporary folder (SOAK_DIR keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-600}
rotate_every=${ROTATE_EVERY:-30}
snapshot_every=${SNAPSHOT_EVERY:-60}
DB=db-SOAKINSTANCE000000000000001

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/nbdcrypt
dir=${SOAK_DIR:-$(mktemp -d)}
mkdir -p "$dir"
export NBDCRYPT_KMS_DIR=$dir/kms
sock=$dir/nbd.sock
ctl=$dir/control.sock
uri="nbd+unix:///?socket=$sock"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  [[ -n ${SOAK_DIR:-} ]] || rm -rf "$dir"
}
trap cleanup EXIT

"$bin" kms create-key --alias alias/soak --description "soak test" > /dev/null
key_id=$("$bin" kms describe-key alias/soak --json | jq -r .KeyMetadata.KeyId)
"$bin" volume create "$dir/soak.vol" --size 2G --kms-key alias/soak \
  --db-id "$DB" --vol-id vol-soak > /dev/null

# Serves VOLUME on SOCKET (more `serve` options after), logging to LOG,
# and waits until it answers; its pid is left in $started.
serve() {
  local volume=$1 socket=$2 log=$3
  shift 3
  "$bin" -v serve --unix "$socket" --db-id "$DB" "$@" "$volume" 2>> "$log" &
  started=$!
  pids+=("$started")
  for ((i = 0; i < 200; i++)); do
    nbdinfo --size "nbd+unix:///?socket=$socket" > /dev/null 2>&1 && return
    sleep 0.1
  done
  echo "soak.sh: the server did not come up; its log:" >&2
  cat "$log" >&2
  exit 1
}
start_server() {
  serve "$dir/soak.vol" "$sock" "$dir/serve.log" --control "$ctl"
  server=$started
}
start_server

# The server's resident memory every 5 s.
(
  while kill -0 "$server" 2> /dev/null; do
    echo "$SECONDS $(awk '/^VmRSS/ {print $2}' "/proc/$server/status" 2> /dev/null)"
    sleep 5
  done
) > "$dir/rss.log" &
pids+=($!)

# Key rotation and online snapshots during the run.
mkdir -p "$dir/snapshots"
(
  end=$((SECONDS + duration))
  next_rotation=$((SECONDS + rotate_every))
  next_snapshot=$((SECONDS + snapshot_every))
  snapshots=0 rotations=0 failed=0
  while ((SECONDS < end)); do
    sleep 1
    if ((SECONDS >= next_rotation)); then
      "$bin" kms rotate-key-on-demand "$key_id" > /dev/null && rotations=$((rotations + 1))
      next_rotation=$((SECONDS + rotate_every))
    fi
    if ((SECONDS >= next_snapshot)); then
      if "$bin" snapshot create --server "$ctl" vol-soak --snapshot-id "snap-$((snapshots + 1))" \
        --out "$dir/snapshots" > /dev/null 2>> "$dir/snapshot.log"; then
        snapshots=$((snapshots + 1))
      else
        failed=$((failed + 1))
      fi
      next_snapshot=$((SECONDS + snapshot_every))
    fi
  done
  echo "$rotations $snapshots $failed" > "$dir/background"
) &
background=$!
pids+=("$background")

# Four connections, each writing and verifying its own 512 MiB region.
set +e
fio --name=soak --ioengine=nbd --uri="$uri" --numjobs=4 --size=512M \
  --offset_increment=512M --rw=randwrite --bsrange=4k-128k --iodepth=16 \
  --verify=crc32c --verify_fatal=1 --verify_backlog=4096 --do_verify=1 --verify_state_save=0 \
  --time_based --runtime="$duration" --group_reporting --output-format=json \
  --output="$dir/fio.json" > "$dir/fio.out" 2> "$dir/fio.err"
fio_status=$?
set -e
wait "$background" || true

# A clean stop, a rekey and a restart: the volume reads back the same.
before=$(nbdcopy "$uri" - | sha256sum)
kill -TERM "$server"
stop_status=0
wait "$server" || stop_status=$?
rekey=ok
"$bin" volume rekey "$dir/soak.vol" --db-id "$DB" > /dev/null 2>> "$dir/rekey.log" || rekey=FAILED
start_server
after=$(nbdcopy "$uri" - | sha256sum)
kill -TERM "$server"
wait "$server" || stop_status=$?

read -r rotations snapshots snapshots_failed < "$dir/background"

# The last snapshot, restored to a new volume, serves and reads end to end.
restored=none
if ((snapshots > 0)); then
  restored=FAILED
  if "$bin" snapshot restore "$dir/snapshots/snap-$snapshots" "$dir/restored.vol" \
    --db-id "$DB" --vol-id vol-restored > /dev/null 2>> "$dir/snapshot.log"; then
    serve "$dir/restored.vol" "$dir/restored.sock" "$dir/restored.log"
    nbdcopy "nbd+unix:///?socket=$dir/restored.sock" null: 2>> "$dir/restored.log" && restored=yes
    kill -TERM "$started"
    wait "$started" || restored=FAILED
  fi
fi
audit=$("$bin" kms audit verify > /dev/null 2>&1 && echo intact || echo BROKEN)
warnings=$(grep -cE ' (WARN|ERROR) ' "$dir/serve.log" || true)
errors=$(jq '[.jobs[].error] | add' "$dir/fio.json" 2> /dev/null || echo "?")
mib() { jq "[.jobs[].$1.bw_bytes] | add / 1048576 | floor" "$dir/fio.json"; }
iops() { jq "[.jobs[].$1.iops] | add | floor" "$dir/fio.json"; }
rss=$(awk '{print $2}' "$dir/rss.log" | grep -v '^$')
cat << REPORT
soak: ${duration}s, 4 fio connections (random writes 4k-128k, crc32c verify), 2 GiB volume
  fio errors: ${errors} (exit ${fio_status}); volume the same after a stop and restart: $([[ $before == "$after" ]] && echo yes || echo NO)
  server: warnings or errors logged: ${warnings}; clean stops: $([[ $stop_status == 0 ]] && echo yes || echo "no (exit $stop_status)")
  throughput: write $(mib write) MiB/s ($(iops write) IOPS); read back and verified: $(jq '[.jobs[].read.io_bytes] | add / 1073741824 | floor' "$dir/fio.json") GiB
  key rotations: ${rotations}; volume rekey after the stop: ${rekey}
  online snapshots: ${snapshots} taken, ${snapshots_failed} failed; the last one restored and read end to end: ${restored}
  audit log chain: ${audit}
  server RSS (kB) min $(sort -n <<< "$rss" | head -1), max $(sort -n <<< "$rss" | tail -1), every 5 s: $(tr '\n' ' ' <<< "$rss")
REPORT
[[ $fio_status == 0 && $errors == 0 && $before == "$after" && $warnings == 0 \
  && $stop_status == 0 && $audit == intact && $rekey == ok && $snapshots_failed == 0 \
  && $restored != FAILED ]]
