#!/usr/bin/env bash
# The test command: runs the whole suite against real etcd (and RabbitMQ) containers.
#
# Uses the official images when they can be pulled; otherwise (or with GOMS_OFFLINE=1)
# builds equivalents from Debian packages with docker/offline/build-images.sh.
# Image names can be forced with GOMS_ETCD_IMAGE / GOMS_RABBITMQ_IMAGE.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test gateway).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# The build needs cmake and protoc, the images debootstrap: installed when missing.
scripts/install-deps.sh

OFFICIAL_ETCD=quay.io/coreos/etcd:v3.5.17
OFFICIAL_RABBITMQ=rabbitmq:3.13-management

have_or_pull() {
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  timeout 120 docker pull -q "$1" >/dev/null 2>&1
}

if [ -z "${GOMS_ETCD_IMAGE:-}" ] || [ -z "${GOMS_RABBITMQ_IMAGE:-}" ]; then
  if [ "${GOMS_OFFLINE:-0}" != "1" ] && have_or_pull "$OFFICIAL_ETCD" && have_or_pull "$OFFICIAL_RABBITMQ"; then
    echo "[test] using official images" >&2
    export GOMS_ETCD_IMAGE="${GOMS_ETCD_IMAGE:-$OFFICIAL_ETCD}"
    export GOMS_RABBITMQ_IMAGE="${GOMS_RABBITMQ_IMAGE:-$OFFICIAL_RABBITMQ}"
  else
    echo "[test] no registry (or GOMS_OFFLINE=1): building offline images from Debian packages" >&2
    eval "$(docker/offline/build-images.sh)"
  fi
fi
echo "[test] GOMS_ETCD_IMAGE=$GOMS_ETCD_IMAGE GOMS_RABBITMQ_IMAGE=$GOMS_RABBITMQ_IMAGE" >&2

# Two cores: three tests at a time keep the containers and processes from starving.
cargo test --locked "$@" -- --test-threads "${GOMS_TEST_THREADS:-3}"

# The real-Elasticsearch test is ignored unless an image exists here to run it against.
if [ -n "${GOMS_ES_IMAGE:-}" ] && docker image inspect "$GOMS_ES_IMAGE" >/dev/null 2>&1; then
  echo "[test] GOMS_ES_IMAGE=$GOMS_ES_IMAGE: running real_elasticsearch_end_to_end" >&2
  cargo test --locked --test trace real_elasticsearch_end_to_end -- --include-ignored
fi
