#!/usr/bin/env bash
# Compose for the goms stack, in the mode scripts/up.sh chose, so that every command of the
# README works the same with or without a registry:
#   - `docker compose` (v2) when present, else `docker-compose` (v1 >= 1.28);
#   - compose/docker-compose.yml, plus compose/docker-compose.offline.yml when up.sh ran
#     offline (it records the mode in compose/.mode, which git ignores).
#
#   scripts/compose.sh ps
#   scripts/compose.sh up -d --scale user=5
#   scripts/compose.sh logs -f gateway
#   scripts/compose.sh exec etcd etcdctl get --prefix /goms/services/
#
# A plain `-f` list would not do: Compose reads `.env` from a folder that differs between v1
# and v2, so a COMPOSE_FILE written there is not seen by both.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-goms}

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  echo "[compose] Docker Compose is missing: install the compose plugin (docker compose) or docker-compose" >&2
  exit 1
fi

files=(-f compose/docker-compose.yml)
mode=$(cat compose/.mode 2>/dev/null || echo online)
if [ "$mode" = offline ]; then
  files+=(-f compose/docker-compose.offline.yml)
fi
exec "${COMPOSE[@]}" "${files[@]}" "$@"
