#!/usr/bin/env bash
# Stops the stack started by scripts/up.sh (project ${COMPOSE_PROJECT_NAME:-goms}).
#   scripts/down.sh        containers and network; data volumes stay
#   scripts/down.sh -v     also the etcd, RabbitMQ and Elasticsearch volumes
# Extra arguments go to `compose down`.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-goms}

# scripts/compose.sh passes the files of the mode scripts/up.sh chose; --remove-orphans
# takes containers of services that no longer exist in them.
exec scripts/compose.sh down --remove-orphans "$@"
