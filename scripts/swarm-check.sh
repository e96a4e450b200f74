#!/usr/bin/env bash
# The stack on Docker Swarm (issue 38, stage 1), on a one-node swarm of this host's Docker:
#
#   1. builds the offline images and the goms image (as scripts/stack-check.sh does),
#   2. `docker swarm init --advertise-addr 127.0.0.1` unless this Docker is in a swarm already,
#   3. `docker stack deploy` of compose/stack.yml (overlay network, goms.yml and services.yml
#      as configs, the key as a secret), the gateway published in host mode on a free port,
#   4. a steady sequential client (GET /api/user/login, status and X-Served-By recorded),
#   5. checks: every `user` replica is routed; a task SIGKILLed by `docker kill` is replaced
#      by Swarm and served again; a rolling update of `user` (`docker service update --image`,
#      start-first) completes; not one request failed through all of it,
#   6. on exit (also on failure): removes the stack, and leaves the swarm if it made it.
#
# With --ha (issue 38, stage 2), the stack is compose/stack.yml with compose/stack-ha.yml:
# three etcd members and a three-node RabbitMQ cluster with quorum queues. Before step 5's
# checks, one etcd member and the first broker node are scaled to 0 under the steady client:
# no request may fail, and the gateway must publish trace events again (to another node).
#
# Environment: GOMS_BUILD_PROFILE, GOMS_NO_CARGO_BUILD, GOMS_IMAGE, GOMS_ETCD_IMAGE,
# GOMS_RABBITMQ_IMAGE as for scripts/stack-check.sh; GOMS_CHECK_KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export GOMS_BUILD_PROFILE=${GOMS_BUILD_PROFILE:-debug}

started=$SECONDS
log() { echo "[swarm-check +$((SECONDS - started))s] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

HA=0
[ "${1:-}" = --ha ] && HA=1
STACK_FILES=(-c compose/stack.yml)
[ "$HA" = 1 ] && STACK_FILES+=(-c compose/stack-ha.yml)

STACK=gomsswarm$$
WORK="$(mktemp -d /tmp/goms-swarm-check.XXXXXX)"
CLIENT_LOG=$WORK/client.log
STOP_FILE=$WORK/stop-client
CLIENT_PID=
SWARM_MADE=0
DEPLOYED=0
NEXT_IMAGE=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$CLIENT_PID" ]; then
    touch "$STOP_FILE"
    wait "$CLIENT_PID" 2>/dev/null || true
  fi
  if [ "$DEPLOYED" = 1 ]; then
    if [ "$rc" != 0 ]; then
      log "state at failure:"
      docker stack ps --no-trunc "$STACK" >&2 || true
      docker service logs --tail 30 "${STACK}_gateway" >&2 2>&1 || true
    fi
    docker stack rm "$STACK" >/dev/null 2>&1 || true
    # The stack's network goes once its tasks are gone; volumes are removed by name.
    for _ in $(seq 60); do
      [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ] && break
      sleep 1
    done
    for volume in etcd-data rabbitmq-data etcd2-data etcd3-data rabbitmq2-data rabbitmq3-data; do
      docker volume rm "${STACK}_$volume" >/dev/null 2>&1 || true
    done
  fi
  [ -n "$NEXT_IMAGE" ] && docker image rm "$NEXT_IMAGE" >/dev/null 2>&1 || true
  if [ "$SWARM_MADE" = 1 ]; then
    docker swarm leave --force >/dev/null 2>&1 || log "warning: could not leave the swarm"
  fi
  if [ "$rc" != 0 ] || [ "${GOMS_CHECK_KEEP:-0}" = 1 ]; then
    log "work folder kept: $WORK"
  else
    rm -rf --one-file-system "$WORK"
  fi
  if [ "$rc" = 0 ]; then log "PASS in $((SECONDS - started))s"; else log "FAILED (exit $rc) after $((SECONDS - started))s"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

. scripts/lib/check-client.sh

# --- 1. images -----------------------------------------------------------------------------
log "offline images (existing ones are kept)"
eval "$(docker/offline/build-images.sh)"
export GOMS_ETCD_IMAGE GOMS_RABBITMQ_IMAGE
log "goms image from the $GOMS_BUILD_PROFILE build"
eval "$(docker/offline/build-goms-image.sh)"
export GOMS_IMAGE=${GOMS_IMAGE:-goms/goms:latest}

# --- 2. swarm ------------------------------------------------------------------------------
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  log "docker swarm init --advertise-addr 127.0.0.1"
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  SWARM_MADE=1
fi

# --- 3. stack ------------------------------------------------------------------------------
cp -r config "$WORK/config"
echo "swarm-check key $$" >"$WORK/goms.key"
export GOMS_CONFIG_DIR=$WORK/config GOMS_KEY_FILE=$WORK/goms.key
GOMS_GATEWAY_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export GOMS_GATEWAY_PORT
BASE=http://127.0.0.1:$GOMS_GATEWAY_PORT
log "docker stack deploy $STACK (gateway on $BASE, host mode)"
DEPLOYED=1
docker stack deploy --resolve-image never "${STACK_FILES[@]}" "$STACK" >"$WORK/deploy.log" 2>&1 \
  || { cat "$WORK/deploy.log" >&2; fail "docker stack deploy failed"; }

gateway_container() { docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_gateway" | head -n 1; }
# The gateway's /cluster, from its admin listener inside the container.
cluster() { docker exec "$(gateway_container)" goms cluster --gateway 127.0.0.1:9901; }
user_nodes() {
  cluster | python3 -c 'import json,sys; print("\n".join(sorted(json.load(sys.stdin)["services"].get("user",{}).get("Nodes") or [])))'
}
user_count_is() { [ "$(user_nodes | grep -c .)" = "$1" ]; }

wait_for 180 "the gateway's /healthz on $BASE" curl -fsS --max-time 2 "$BASE/healthz"
wait_for 120 "/cluster listing 3 user nodes" user_count_is 3
curl -fsS --max-time 5 "$BASE/api/user/login" >/dev/null || fail "first call through the gateway failed"
log "serving: user nodes $(echo $(user_nodes))"

# --- 4. steady client ----------------------------------------------------------------------
CLIENT_PATH="/api/user/login?n=" CLIENT_MAX_REQUESTS=40000
: >"$CLIENT_LOG"
client_loop &
CLIENT_PID=$!
requests() { wc -l <"$CLIENT_LOG"; }
failed() { awk '$3 != 0 || $4 != 200' "$CLIENT_LOG" | wc -l; }
served_by_all() {
  local node
  for node in $(user_nodes); do
    awk -v node="$node" '$5 == node' "$CLIENT_LOG" | grep -q . || return 1
  done
}

# --- 5. checks -----------------------------------------------------------------------------
wait_for 60 "every user replica serving" served_by_all
log "every replica routed ($(requests) requests, $(failed) failed)"

if [ "$HA" = 1 ]; then
  task_of() { docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_$1" | head -n 1; }
  rabbitmqctl_json() { docker exec "$(task_of rabbitmq2)" rabbitmqctl "$@" --formatter json 2>/dev/null; }
  running_brokers() { rabbitmqctl_json cluster_status | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))'; }
  trace_queue_type() {
    rabbitmqctl_json list_queues name type \
      | python3 -c 'import json,sys; print(next((q["type"] for q in json.load(sys.stdin) if q["name"] == "goms.trace"), ""))'
  }
  published() {
    docker exec "$(gateway_container)" python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9901/metrics").read().decode())' \
      | awk '$1 == "goms_trace_events_published_total" {print $2}'
  }
  brokers_are() { [ "$(running_brokers)" = "$1" ]; }
  queue_is_quorum() { [ "$(trace_queue_type)" = quorum ]; }
  queue_members() {
    docker exec "$(task_of rabbitmq2)" rabbitmqctl list_queues name members 2>/dev/null \
      | awk '$1 == "goms.trace"' | grep -o 'rabbit@' | wc -l
  }
  has_three_members() { [ "$(queue_members)" = 3 ]; }
  wait_for 120 "a RabbitMQ cluster of three" brokers_are 3
  wait_for 60 "goms.trace declared as a quorum queue" queue_is_quorum
  # A quorum queue's members are the nodes in the cluster when it was declared: the gateway
  # may have declared it before the other nodes joined. Nodes that join later are added, as
  # an operator does (docs/deployment.md); RabbitMQ 3.10 does not do it by itself.
  for node in rabbit@rabbitmq rabbit@rabbitmq2 rabbit@rabbitmq3; do
    docker exec "$(task_of rabbitmq2)" rabbitmq-queues grow "$node" all --queue-pattern '^goms\.trace' >/dev/null 2>&1 || true
  done
  wait_for 30 "goms.trace replicated on all three nodes" has_three_members
  log "HA: RabbitMQ cluster of 3, goms.trace is $(trace_queue_type); etcd members: $(docker exec "$(task_of etcd2)" etcdctl member list 2>/dev/null | wc -l)"
  before_loss=$(requests)
  log "HA: scale etcd (a member) and rabbitmq (the first node) to 0 under traffic"
  docker service scale --detach "${STACK}_etcd=0" "${STACK}_rabbitmq=0" >/dev/null
  wait_for 60 "two RabbitMQ nodes left" brokers_are 2
  published_after_loss=$(published)
  more_published() { [ "$(published)" -gt "$published_after_loss" ]; }
  wait_for 60 "the gateway publishing trace events again" more_published
  enough_after_loss() { [ "$(requests)" -gt $((before_loss + 300)) ]; }
  wait_for 60 "300 requests after the loss" enough_after_loss
  [ "$(failed)" = 0 ] || fail "$(failed) requests failed after losing an etcd member and a broker node"
  log "HA: $(( $(requests) - before_loss )) requests since the loss, 0 failed; trace events published: $(published)"
  docker service scale --detach "${STACK}_etcd=1" "${STACK}_rabbitmq=1" >/dev/null
fi

victim=$(docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_user" | head -n 1)
victim_node=$(docker inspect --format '{{.Config.Hostname}}' "$victim")
before_kill=$(user_nodes)
log "docker kill (SIGKILL) a user task ($victim_node)"
docker kill "$victim" >/dev/null
replaced() {
  local now; now=$(user_nodes)
  [ "$(echo "$now" | grep -c .)" = 3 ] && [ "$now" != "$before_kill" ]
}
wait_for 120 "Swarm to replace the killed task and the new one to register" replaced
wait_for 60 "the new replica serving" served_by_all
log "the killed task was replaced: user nodes $(echo $(user_nodes)) ($(requests) requests, $(failed) failed)"

NEXT_IMAGE=${GOMS_IMAGE%:*}:swarm-check-$$
docker tag "$GOMS_IMAGE" "$NEXT_IMAGE"
before_update=$(user_nodes)
log "rolling update: docker service update --image $NEXT_IMAGE ${STACK}_user"
docker service update --detach=false --quiet --image "$NEXT_IMAGE" "${STACK}_user" >/dev/null \
  || fail "the rolling update did not converge"
all_new() {
  local now; now=$(user_nodes)
  [ "$(echo "$now" | grep -c .)" = 3 ] && [ -z "$(comm -12 <(echo "$before_update") <(echo "$now"))" ]
}
wait_for 120 "three registered replicas, all new" all_new
wait_for 60 "every updated replica serving" served_by_all
touch "$STOP_FILE"
wait "$CLIENT_PID" 2>/dev/null || true
CLIENT_PID=
total=$(requests)
bad=$(failed)
log "after the update: user nodes $(echo $(user_nodes)); $total requests, $bad failed"
if [ "$bad" != 0 ]; then
  awk '$3 != 0 || $4 != 200' "$CLIENT_LOG" | head -n 20 >&2
  fail "$bad of $total requests failed"
fi
