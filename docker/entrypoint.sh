#!/bin/sh
# Entrypoint of the goms image (runs under tini as the non-root user `goms`).
#
# Each container registers the address other containers reach it at. Unless
# GOMS__SERVICE__ADVERTISE_HOST / GOMS__GATEWAY__ADVERTISE_HOST are set, both default to
# this container's own IP, so every scaled replica (`--scale user=5`) registers a unique,
# reachable host:port in etcd instead of the config default 127.0.0.1.
set -eu

container_ip() {
  # The first non-loopback IPv4 address of `hostname -i` (Docker writes it to /etc/hosts),
  # else the first address of `hostname -I` (all interfaces).
  for ip in $(hostname -i 2>/dev/null || true) $(hostname -I 2>/dev/null || true); do
    case "$ip" in
      127.*|::1|*:*) continue ;;
    esac
    echo "$ip"
    return 0
  done
  return 1
}

if [ -z "${GOMS__SERVICE__ADVERTISE_HOST:-}" ] || [ -z "${GOMS__GATEWAY__ADVERTISE_HOST:-}" ]; then
  if ip="$(container_ip)"; then
    : "${GOMS__SERVICE__ADVERTISE_HOST:=$ip}"
    : "${GOMS__GATEWAY__ADVERTISE_HOST:=$ip}"
    export GOMS__SERVICE__ADVERTISE_HOST GOMS__GATEWAY__ADVERTISE_HOST
  else
    echo "goms-entrypoint: could not find this container's IP; set GOMS__SERVICE__ADVERTISE_HOST / GOMS__GATEWAY__ADVERTISE_HOST" >&2
  fi
fi

# Docker and Swarm secrets arrive as files (/run/secrets/NAME): GOMS_CALL_SERVICE_KEY_FILE names
# the file holding the key. Its variable is removed before goms starts: goms reads GOMS__*
# only, and an unknown one would be refused.
if [ -n "${GOMS_CALL_SERVICE_KEY_FILE:-}" ]; then
  if [ -z "${GOMS__CALL_SERVICE_KEY:-}" ]; then
    GOMS__CALL_SERVICE_KEY="$(cat "$GOMS_CALL_SERVICE_KEY_FILE")"
    export GOMS__CALL_SERVICE_KEY
  fi
  unset GOMS_CALL_SERVICE_KEY_FILE
fi

exec goms "$@"
