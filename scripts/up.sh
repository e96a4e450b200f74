#!/usr/bin/env bash
# The run command: the whole goms stack in Docker, with or without a container registry.
#
#   scripts/up.sh                       # then: curl http://127.0.0.1:8080/api/user/login
#   scripts/up.sh --scale user=5        # extra arguments go to `compose up -d`
#   GOMS_OFFLINE=1 scripts/up.sh        # never pull; build everything locally
#   scripts/down.sh [-v]                # stop it (-v also deletes the data volumes)
#
# With a registry: the official etcd, RabbitMQ, Elasticsearch and Kibana images, and the goms
# image built from docker/Dockerfile (`up --build`), from compose/docker-compose.yml.
# Without one: etcd and RabbitMQ images built from Debian packages, goms built on this host
# (cargo, release profile; GOMS_BUILD_PROFILE=debug for a faster build) and packaged into an
# image, and compose/docker-compose.offline.yml on top, which leaves out Elasticsearch and
# Kibana (no image of them can be built offline).
# Uses `docker compose` (v2) when present, else `docker-compose` (v1 >= 1.28).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-goms}

log() { echo "[up] $*" >&2; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  log "Docker Compose is missing: install the compose plugin (docker compose) or docker-compose"
  exit 1
fi
docker info >/dev/null 2>&1 || { log "no Docker engine answers (is dockerd running?)"; exit 1; }

MAIN=compose/docker-compose.yml
OFFLINE=compose/docker-compose.offline.yml
PULL_TIMEOUT=${GOMS_PULL_TIMEOUT:-900}

# The images online mode needs: the stack's, and the bases of docker/Dockerfile.
ONLINE_IMAGES=(
  "${GOMS_ETCD_IMAGE:-quay.io/coreos/etcd:v3.5.17}"
  "${GOMS_RABBITMQ_IMAGE:-rabbitmq:3.13-management}"
  "${GOMS_ES_IMAGE:-docker.elastic.co/elasticsearch/elasticsearch:8.15.3}"
  "${GOMS_KIBANA_IMAGE:-docker.elastic.co/kibana/kibana:8.15.3}"
  rust:1-bookworm
  debian:bookworm-slim
)

have_or_pull() {
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  log "pulling $1"
  timeout "$2" docker pull -q "$1" >/dev/null 2>&1
}

online=0
if [ "${GOMS_OFFLINE:-0}" != 1 ]; then
  online=1
  for image in "${ONLINE_IMAGES[@]}"; do
    if ! have_or_pull "$image" "$PULL_TIMEOUT"; then
      log "cannot pull $image"
      online=0
      break
    fi
  done
fi

if [ "$online" = 1 ]; then
  log "registry reachable: official images, goms built from docker/Dockerfile"
  "${COMPOSE[@]}" -f "$MAIN" up -d --build "$@"
  files=(-f "$MAIN")
else
  log "offline mode: building images from Debian packages and goms on this host"
  docker/offline/build-images.sh >/dev/null
  GOMS_BUILD_PROFILE=${GOMS_BUILD_PROFILE:-release} docker/offline/build-goms-image.sh >/dev/null
  cat >&2 <<'NOTE'
[up] NOTE: Elasticsearch and Kibana are left out: no registry, and no image of them can be
[up]       built from Debian packages. Everything else runs: etcd, RabbitMQ, the gateway, the
[up]       `user` replicas and the trace consumer, which keeps trace events queued in RabbitMQ
[up]       (goms.trace) until an Elasticsearch answers. See docs/deployment.md, "Offline".
NOTE
  files=(-f "$MAIN" -f "$OFFLINE")
  "${COMPOSE[@]}" "${files[@]}" up -d "$@"
fi

# Wait for the gateway, then say where everything is.
published() {   # host address of a container port, e.g. 127.0.0.1:8080
  local address
  address="$("${COMPOSE[@]}" "${files[@]}" port "$1" "$2" 2>/dev/null | tail -n 1 || true)"
  echo "${address/0.0.0.0/127.0.0.1}"
}
gateway="$(published gateway 8080)"
if [ -n "$gateway" ]; then
  for _ in $(seq 1 60); do
    curl -fsS --max-time 2 "http://$gateway/healthz" >/dev/null 2>&1 && break
    sleep 1
  done
  if curl -fsS --max-time 2 "http://$gateway/healthz" >/dev/null 2>&1; then
    log "gateway ready:  curl http://$gateway/api/user/login    (cluster: http://$gateway/cluster)"
  else
    log "the gateway is not healthy yet: ${COMPOSE[*]} ${files[*]} logs gateway"
  fi
fi
if [ "$online" = 1 ]; then
  log "Kibana (traces): http://$(published kibana 5601)"
fi
log "RabbitMQ UI:     http://$(published rabbitmq 15672)  (guest/guest)"
log "scale:           ${COMPOSE[*]} ${files[*]} up -d --scale user=5"
log "stop:            scripts/down.sh   (-v also deletes the data)"
