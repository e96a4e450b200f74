#!/usr/bin/env bash
# Installs the Debian packages that building and testing goms need. Idempotent.
#   cmake            pingora-core builds zlib-ng through flate2
#   protobuf-compiler etcd-client's build script runs protoc
#   libprotobuf-dev  ...which imports google/protobuf/*.proto (with --no-install-recommends
#                    protoc comes without them)
#   debootstrap      docker/offline/build-images.sh builds the base image without a registry
#   e2fsprogs        chattr, with which tests/trace.rs makes a spool folder refuse deletes
#   chromium         tests/dashboard.rs loads the gateway's /ui headless and reads its DOM
#   etcd-server      scripts/docs-check.sh runs docs/services.md, which starts etcd as a user would
#   docker.io, docker-compose  only where no Docker engine / compose is installed yet
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v docker >/dev/null 2>&1 || need+=(docker.io)
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  need+=(docker-compose)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "[install-deps] installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
else
  echo "[install-deps] everything present" >&2
fi

# A Docker engine must answer; start Debian's dockerd by hand where none runs
# (policy-rc.d blocks the package's own start inside containers and CI sandboxes).
if ! docker info >/dev/null 2>&1; then
  echo "[install-deps] no Docker engine answers; starting dockerd" >&2
  (dockerd >/tmp/goms-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "[install-deps] dockerd did not start; see /tmp/goms-dockerd.log" >&2; exit 1; }
fi
