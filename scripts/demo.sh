#!/usr/bin/env bash
# The main job: an encrypted volume on the embedded local KMS, served over NBD.
#
#   scripts/demo.sh            # build, create a key and a 1 GiB volume once, serve it
#
# State lives in $NBDCRYPT_DEMO_DIR (default: ~/.local/state/nbdcrypt-demo):
# the KMS directory, demo.vol and the Unix socket. Ctrl-C (or SIGTERM) stops
# the server after flushing. NBDCRYPT_DEMO_TCP sets the TCP address
# (default 127.0.0.1:10809; empty for none).
set -euo pipefail
cd "$(dirname "$0")/.."

# NBDCRYPT_PROFILE=dev reuses the test build (scripts/test.sh does).
PROFILE=${NBDCRYPT_PROFILE:-release}
cargo build --profile "$PROFILE" --quiet
BIN=$PWD/target/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")/nbdcrypt
STATE=${NBDCRYPT_DEMO_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/nbdcrypt-demo}
export NBDCRYPT_KMS_DIR=${NBDCRYPT_KMS_DIR:-$STATE/kms}
TCP=${NBDCRYPT_DEMO_TCP-127.0.0.1:10809}
DB=db-DEMOINSTANCE0000000000001
VOL=vol-0demo0001
mkdir -p "$STATE"

"$BIN" kms describe-key alias/demo > /dev/null 2>&1 \
  || "$BIN" kms create-key --alias alias/demo --description "nbdcrypt demo volumes"
[[ -e $STATE/demo.vol ]] \
  || "$BIN" volume create "$STATE/demo.vol" --size 1G --kms-key alias/demo --db-id "$DB" --vol-id "$VOL"

SOCK=$STATE/nbd.sock
LISTEN=(--unix "$SOCK")
[[ -n $TCP ]] && LISTEN+=(--listen "$TCP")
cat >&2 <<MSG
Try, from another terminal:
  nbdinfo 'nbd+unix:///$VOL?socket=$SOCK'
  qemu-img info 'nbd+unix:///?socket=$SOCK'
  nbd-client ${TCP%:*} ${TCP##*:} /dev/nbd0 -N $VOL    # where the nbd kernel module exists
MSG
exec "$BIN" serve "${LISTEN[@]}" --db-id "$DB" "$STATE/demo.vol"
