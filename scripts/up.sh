#!/usr/bin/env bash
# The run command: the whole goms stack in Docker, with or without a container registry.
#
#   scripts/up.sh                       # then: curl http://127.0.0.1:8080/api/user/login
#   scripts/up.sh --scale user=5        # extra arguments go to `compose up -d`
#   GOMS_OFFLINE=1 scripts/up.sh        # never pull; build everything locally
#   scripts/compose.sh ps               # any compose command, in the mode up.sh chose
#   scripts/down.sh [-v]                # stop it (-v also deletes the data volumes)
#
# With a registry: the official etcd, RabbitMQ, Elasticsearch and Kibana images, and the goms
# image built from docker/Dockerfile (`up --build`), from compose/docker-compose.yml.
# Without one: etcd and RabbitMQ images built from Debian packages, goms built on this host
# (cargo, release profile; GOMS_BUILD_PROFILE=debug for a faster build) and packaged into an
# image, and compose/docker-compose.offline.yml on top, which leaves out Elasticsearch and
# Kibana (no image of them can be built offline). The mode goes to compose/.mode, which
# scripts/compose.sh and scripts/down.sh read.
#
# Build output (apt, debootstrap, cargo, docker build) goes to target/up.log; the terminal
# gets one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-goms}

mkdir -p target
LOG=target/up.log
: >"$LOG"
started=$SECONDS
log() { echo "[up +$((SECONDS - started))s] $*" >&2; }
# Runs a step with its output in the log; on failure shows the log's end and stops.
step() {
  local what=$1
  shift
  log "$what"
  if ! "$@" >>"$LOG" 2>&1; then
    log "FAILED: $what. The last lines of $LOG:"
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

step "installing what the build needs (scripts/install-deps.sh; nothing when present)" \
  scripts/install-deps.sh

# The gateway serves HTTPS on 8443 with the certificate in config/tls: a self-signed one for
# localhost the first time (kept afterwards, and yours when you replace it).
scripts/tls-localhost.sh "${GOMS_CONFIG_DIR:-config}/tls"
log "HTTPS certificate: ${GOMS_CONFIG_DIR:-config}/tls/localhost.crt (docs/tls.md)"

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
  timeout "$PULL_TIMEOUT" docker pull -q "$1" >>"$LOG" 2>&1
}

online=0
if [ "${GOMS_OFFLINE:-0}" != 1 ]; then
  log "looking for the official images (a registry)"
  online=1
  for image in "${ONLINE_IMAGES[@]}"; do
    if ! have_or_pull "$image"; then
      log "cannot pull $image: no registry, so offline mode"
      online=0
      break
    fi
  done
fi

if [ "$online" = 1 ]; then
  echo online >compose/.mode
  log "online mode: official images; goms built by docker/Dockerfile (about 10 minutes the first time)"
  step "building goms and starting the stack (compose up -d --build)" \
    scripts/compose.sh up -d --build "$@"
else
  echo offline >compose/.mode
  profile=${GOMS_BUILD_PROFILE:-release}
  cat >&2 <<NOTE
[up] Offline mode, as no registry answers. It will:
[up]   1. build etcd and RabbitMQ images from Debian packages (about 3 minutes the first time,
[up]      seconds when they exist),
[up]   2. build goms on this host (cargo, $profile profile: about 9 minutes cold on 2 cores,
[up]      seconds when up to date) and package it into an image,
[up]   3. start etcd, RabbitMQ, the gateway, 3 user replicas, the order service (Python behind
[up]      goms sidecar) and the trace consumer.
[up] Elasticsearch and Kibana are LEFT OUT: no image of them can be built from Debian
[up] packages. The consumer keeps trace events queued in RabbitMQ (goms.trace) until an
[up] Elasticsearch answers (docs/deployment.md, "Offline"). Build output: $LOG
NOTE
  step "building etcd and RabbitMQ images from Debian packages" docker/offline/build-images.sh
  step "building goms ($profile) and its image" \
    env GOMS_BUILD_PROFILE="$profile" docker/offline/build-goms-image.sh
  step "starting the stack (compose up -d)" scripts/compose.sh up -d "$@"
fi

# Wait for the gateway, then say where everything is.
published() {   # host address of a container port, e.g. 127.0.0.1:8080
  local address
  address="$(scripts/compose.sh port "$1" "$2" 2>/dev/null | tail -n 1 || true)"
  echo "${address/0.0.0.0/127.0.0.1}"
}
gateway="$(published gateway 8080)"
admin="$(published gateway 9901)"
if [ -n "$gateway" ]; then
  for _ in $(seq 1 60); do
    curl -fsS --max-time 2 "http://$gateway/healthz" >/dev/null 2>&1 && break
    sleep 1
  done
  if curl -fsS --max-time 2 "http://$gateway/healthz" >/dev/null 2>&1; then
    log "gateway ready:   curl http://$gateway/api/user/login"
  else
    log "the gateway is not healthy yet: scripts/compose.sh logs gateway"
  fi
fi
https="$(published gateway 8443)"
if [ -n "$https" ]; then
  log "HTTPS:           curl --cacert config/tls/localhost.crt https://localhost:${https##*:}/api/user/login"
fi
log "dashboard:       http://$admin/ui   (admin listener, this host only)"
log "cluster, metrics: curl http://$admin/cluster"
if [ "$online" = 1 ]; then
  log "Kibana (traces): http://$(published kibana 5601)"
fi
log "RabbitMQ UI:     http://$(published rabbitmq 15672)  (guest/guest)"
log "scale:           scripts/compose.sh up -d --scale user=5"
log "stop:            scripts/down.sh   (-v also deletes the data)"
