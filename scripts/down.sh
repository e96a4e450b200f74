#!/usr/bin/env bash
# Stops the stack started by scripts/up.sh (project ${COMPOSE_PROJECT_NAME:-goms}).
#   scripts/down.sh        containers and network; data volumes stay
#   scripts/down.sh -v     also the etcd, RabbitMQ and Elasticsearch volumes
# Extra arguments go to `compose down`.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-goms}

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  echo "[down] Docker Compose is missing" >&2
  exit 1
fi

# The main file names every service (the offline override only hides Elasticsearch and
# Kibana), so it serves for both modes; --remove-orphans takes containers of services that
# no longer exist in it.
"${COMPOSE[@]}" -f compose/docker-compose.yml down --remove-orphans "$@"
