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
  [e2fsck]=e2fsprogs [losetup]=mount [jq]=jq
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
