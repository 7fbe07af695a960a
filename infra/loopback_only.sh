#!/usr/bin/env bash
# Run a command in a private network namespace whose only interface is loopback, so nothing the command starts can be
# reached from another machine. `make test` and `make demo` use it because Ray's own gRPC servers bind every interface
# whatever node IP they are given; SeaweedFS and the MLflow server bind 127.0.0.1 in any case.
#
# Needs util-linux `unshare`, iproute2 `ip` and a kernel that lets users create user namespaces. Where one of them is
# missing or refuses, the command runs in the host's network with a warning on stderr (MPFT_LOOPBACK_ONLY stays unset),
# and the command's exit status is this script's in both cases.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]" >&2
  exit 2
fi

# An already isolated caller (a nested make) needs no second namespace.
if [ "${MPFT_LOOPBACK_ONLY:-}" = 1 ]; then
  exec "$@"
fi

uid=$(id -u)
gid=$(id -g)
# The outer namespace maps the caller to root so `ip` may bring loopback up; the inner one maps back to the caller's
# own uid and gid, without capabilities, so the command runs with the caller's identity and file permissions.
if command -v unshare >/dev/null && command -v ip >/dev/null \
   && unshare --map-root-user --net true 2>/dev/null; then
  export MPFT_LOOPBACK_ONLY=1
  exec unshare --map-root-user --net -- sh -c \
    'u=$1 g=$2; shift 2; ip link set lo up && exec unshare --map-user="$u" --map-group="$g" -- "$@"' \
    sh "$uid" "$gid" "$@"
fi

echo "warning: could not start a private network namespace (unshare/ip missing or user namespaces disabled);" \
     "running in the host network, where Ray's ports listen on every interface" >&2
exec "$@"
