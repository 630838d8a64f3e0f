#!/usr/bin/env bash
# Attach an nbdcrypt export as a Linux block device with the kernel's NBD
# client, optionally make a file system and mount it; or detach it.
#
#   scripts/attach.sh attach HOST PORT EXPORT [/dev/nbdN] [--mkfs ext4] [--mount DIR]
#   scripts/attach.sh detach [/dev/nbdN] [--umount DIR]
#
# Needs root, the nbd kernel module (modprobe nbd) and nbd-client.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "attach.sh: $*" >&2; exit 1; }

[[ ${1:-} == -h || ${1:-} == --help ]] && usage
cmd=${1:-}; shift || usage 2
command -v nbd-client > /dev/null || die "nbd-client is not installed (apt-get install nbd-client)"

case $cmd in
  attach)
    (($# >= 3)) || usage 2
    host=$1 port=$2 export=$3; shift 3
    dev=/dev/nbd0
    [[ ${1:-} == /dev/* ]] && { dev=$1; shift; }
    fs= mnt=
    while (($#)); do
      case $1 in
        --mkfs) fs=$2; shift 2 ;;
        --mount) mnt=$2; shift 2 ;;
        *) usage 2 ;;
      esac
    done
    [[ -e $dev ]] || modprobe nbd || die "no $dev and the nbd module does not load"
    # -N names the export (the volume id); the handshake negotiates block sizes.
    nbd-client "$host" "$port" "$dev" -N "$export"
    if [[ -n $fs ]]; then
      "mkfs.$fs" -q "$dev"
    fi
    if [[ -n $mnt ]]; then
      mkdir -p "$mnt"
      mount "$dev" "$mnt"
      echo "mounted $export ($dev) on $mnt"
    else
      echo "attached $export as $dev"
    fi
    ;;
  detach)
    dev=/dev/nbd0
    [[ ${1:-} == /dev/* ]] && { dev=$1; shift; }
    if [[ ${1:-} == --umount ]]; then umount "$2"; fi
    # Disconnecting flushes: the server acknowledges only after its FLUSH.
    nbd-client -d "$dev"
    echo "detached $dev"
    ;;
  *) usage 2 ;;
esac
