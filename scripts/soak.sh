#!/usr/bin/env bash
# The chaos soak: etcd and RabbitMQ containers, the Elasticsearch stand-in, two gateways,
# three `user` replicas and a trace consumer on this machine, under steady GET and POST
# traffic, with one fault every 30 s (tests/soak/main.rs). Prints its figures and exits
# non-zero unless every check holds.
#
#   scripts/soak.sh --minutes 3              # what CI runs
#   scripts/soak.sh --minutes 30 --release   # the figures in docs/operations.md
#   scripts/soak.sh --minutes 3 --seed 7     # the same faults, in the same order, again
#
# Other flags go to the soak itself: `scripts/soak.sh --help` lists them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

profile=()
args=()
for arg in "$@"; do
  case "$arg" in
    --release) profile=(--release) ;;
    *) args+=("$arg") ;;
  esac
done

scripts/install-deps.sh >/dev/null
if [ -z "${GOMS_ETCD_IMAGE:-}" ] || [ -z "${GOMS_RABBITMQ_IMAGE:-}" ]; then
  eval "$(docker/offline/build-images.sh)"
fi
export GOMS_ETCD_IMAGE GOMS_RABBITMQ_IMAGE
exec cargo test --locked "${profile[@]}" --test soak -- "${args[@]}"
