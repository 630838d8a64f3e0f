#!/usr/bin/env bash
# The whole test suite: installs what the tests need on a fresh Debian
# machine (the real NBD clients, cryptsetup, filesystem tools), then runs
# formatting, lints and every test. Needs root for apt-get, losetup and mount.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each command the tests call, with the Debian package that brings it.
declare -A NEEDS=(
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
  [nbdkit]=nbdkit [fio]=fio [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [fusermount3]=fuse3 [cryptsetup]=cryptsetup-bin [mkfs.ext4]=e2fsprogs
  [e2fsck]=e2fsprogs [filefrag]=e2fsprogs [mkfs.xfs]=xfsprogs [losetup]=mount [jq]=jq
  [strace]=strace [setpriv]=util-linux
)
missing=()
for cmd in "${!NEEDS[@]}"; do
  command -v "$cmd" > /dev/null || missing+=("${NEEDS[$cmd]}")
done
# The independent AES-XTS check uses Debian's python3 and its cryptography.
/usr/bin/python3 -c 'import cryptography' 2> /dev/null || missing+=(python3-cryptography)
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Never qemu-system-x86 here: it would replace a newer preinstalled qemu-utils.
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) > /dev/null
fi
rustup component add rustfmt clippy > /dev/null 2>&1 || true

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
# The portable path: the sector cipher on the aes crate's software backend, as
# on a CPU without AES-NI (the test asserts the backend really is software).
RUSTFLAGS='--cfg aes_backend="soft"' NBDCRYPT_EXPECT_AES=soft CARGO_TARGET_DIR=target/aes-soft \
  cargo test --lib crypto::

# The README's first command, end to end (on the test build): it creates the
# demo key and volume and serves them; one client handshake; SIGTERM must stop
# it cleanly.
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
NBDCRYPT_DEMO_DIR=$demo NBDCRYPT_DEMO_TCP= NBDCRYPT_PROFILE=dev scripts/demo.sh > "$demo/log" 2>&1 &
pid=$!
uri="nbd+unix:///vol-0demo0001?socket=$demo/nbd.sock"
for ((i = 0; i < 1200; i++)); do
  kill -0 "$pid" 2> /dev/null || break
  nbdinfo --size "$uri" > "$demo/size" 2> /dev/null && break
  sleep 0.5
done
size=$(cat "$demo/size" 2> /dev/null || true)
kill -TERM "$pid" 2> /dev/null || true
rc=0; wait "$pid" || rc=$?
if [[ $size == 1073741824 && $rc == 0 ]]; then
  echo "demo: 1 passed, 0 failed"
else
  echo "demo: served size '${size}', exit code $rc; its log:" >&2
  cat "$demo/log" >&2
  echo "demo: 0 passed, 1 failed"
  exit 1
fi
