#!/usr/bin/env bash
# Run a command in a private network namespace whose only interface is loopback, so nothing the command starts can be
# reached from another machine. `make test` and `make demo` use it because Ray's own gRPC servers bind every interface
# whatever node IP they are given; SeaweedFS and the MLflow server bind 127.0.0.1 in any case.
#
# Needs util-linux `unshare` (2.38 or later, for --map-user), iproute2 `ip` and a kernel that lets users create user
# namespaces and configure their network (some hardened distributions do not). Where any step refuses, the command
# runs in the host's network with a warning on stderr (MPFT_LOOPBACK_ONLY stays unset); the exit status is the
# command's in both cases.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]" >&2
  exit 2
fi

only_loopback_here() {
  [ "$(ls /sys/class/net 2>/dev/null)" = "lo" ]
}

# A nested call (make inside make) is already isolated: trust the marker only where it is true.
if [ "${MPFT_LOOPBACK_ONLY:-}" = 1 ] && only_loopback_here; then
  exec "$@"
fi
unset MPFT_LOOPBACK_ONLY

uid=$(id -u)
gid=$(id -g)
# The outer namespace maps the caller to root so `ip` may bring loopback up; the inner one maps back to the caller's
# own uid and gid, without capabilities, so the command runs with the caller's identity and file permissions.
inner='u=$1 g=$2; shift 2; ip link set lo up && exec unshare --map-user="$u" --map-group="$g" -- "$@"'
if command -v unshare >/dev/null && command -v ip >/dev/null \
   && unshare --map-root-user --net -- sh -c "$inner" sh "$uid" "$gid" true 2>/dev/null; then
  export MPFT_LOOPBACK_ONLY=1
  exec unshare --map-root-user --net -- sh -c "$inner" sh "$uid" "$gid" "$@"
fi

echo "warning: could not start a private network namespace (unshare/ip missing, util-linux older than 2.38, or user" \
     "namespaces refused); running in the host network, where Ray's ports listen on every interface" >&2
exec "$@"
