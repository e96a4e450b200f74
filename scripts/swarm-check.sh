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
# With --nodes 3 (issue 38, stage 3; run by hand, not in CI), the HA stack runs on a swarm of
# three nodes on this one machine (scripts/lib/swarm-nodes.sh: a network namespace, a veth on
# one bridge and a dockerd each), spread by compose/stack-nodes.yml: one etcd member and one
# RabbitMQ node per node, a gateway per node (host-mode port 8080 on 10.77.0.11-13), `user`
# spread. Under a steady client (to node 1's gateway), node 3 (GOMS_CHECK_CUT_NODE) is cut off
# (its veth goes down; its dockerd and containers keep running), and the check reports and
# fails unless: failed requests are 0, or only the one in flight at the cut; the cut node's
# `user` replicas run again elsewhere and are routed (the time is reported); etcd keeps quorum;
# once the node is back, every trace event of every answered request is in goms.trace.
# Everything it made (daemons, namespaces, links, the iptables rule, data) goes on exit.
#
# Environment: GOMS_BUILD_PROFILE, GOMS_NO_CARGO_BUILD, GOMS_IMAGE, GOMS_ETCD_IMAGE,
# GOMS_RABBITMQ_IMAGE as for scripts/stack-check.sh; GOMS_CHECK_KEEP=1 keeps the work folder
# (and with --nodes, the nodes' data roots).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export GOMS_BUILD_PROFILE=${GOMS_BUILD_PROFILE:-debug}

started=$SECONDS
log() { echo "[swarm-check +$((SECONDS - started))s] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

HA=0
NODES=0
while [ $# -gt 0 ]; do
  case $1 in
    --ha) HA=1 ;;
    --nodes) NODES=${2:-}; shift ;;
    --nodes=*) NODES=${1#*=} ;;
    *) fail "unknown argument: $1 (none, --ha, or --nodes 3)" ;;
  esac
  shift
done
[ "$NODES" = 0 ] || [ "$NODES" = 3 ] || fail "--nodes takes 3 (compose/stack-nodes.yml spreads the stack over three nodes)"
[ "$NODES" = 0 ] || HA=1
STACK_FILES=(-c compose/stack.yml)
[ "$HA" = 1 ] && STACK_FILES+=(-c compose/stack-ha.yml)
[ "$NODES" = 0 ] || STACK_FILES+=(-c compose/stack-nodes.yml)

STACK=gomsswarm$$
WORK="$(mktemp -d /tmp/goms-swarm-check.XXXXXX)"
CLIENT_LOG=$WORK/client.log
STOP_FILE=$WORK/stop-client
CLIENT_PID=
SWARM_MADE=0
DEPLOYED=0
NEXT_IMAGE=

exec 3>&1 4>&2   # the original stdout/stderr, for cleanup (a signal may land inside a redirection)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  exec 1>&3 2>&4
  if [ -n "$CLIENT_PID" ]; then
    touch "$STOP_FILE"
    wait "$CLIENT_PID" 2>/dev/null || true
  fi
  if [ "$NODES" != 0 ]; then
    if [ "$DEPLOYED" = 1 ] && [ "$rc" != 0 ]; then
      log "state at failure:"
      node_docker 1 node ls >&2 || true
      node_docker 1 stack ps --no-trunc "$STACK" >&2 || true
      node_docker 1 service logs --tail 30 "${STACK}_gateway" >&2 2>&1 || true
    fi
    DEPLOYED=0
    log "removing the $NODES nodes (daemons, namespaces, links, iptables rule, data)"
    swarm_nodes_down
    rm -f "$WORK/images.tar"
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
. scripts/lib/swarm-nodes.sh
NODES_WORK=$WORK

# --- the RabbitMQ cluster's checks (--ha and --nodes) ------------------------------------------
# Each mode defines `in_broker CMD...`, which runs CMD in a broker's container that stays up.
# shellcheck disable=SC2317  # called through wait_for
rabbitmqctl_json() { in_broker rabbitmqctl "$@" --formatter json 2>/dev/null; }
# shellcheck disable=SC2317
running_brokers() {
  rabbitmqctl_json cluster_status | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))'
}
# shellcheck disable=SC2317
trace_queue_type() {
  rabbitmqctl_json list_queues name type \
    | python3 -c 'import json,sys; print(next((q["type"] for q in json.load(sys.stdin) if q["name"] == "goms.trace"), ""))'
}
# shellcheck disable=SC2317
trace_queue_members() {
  in_broker rabbitmqctl list_queues name members 2>/dev/null | awk '$1 == "goms.trace"' | grep -o 'rabbit@' | wc -l
}
# shellcheck disable=SC2317
brokers_are() { [ "$(running_brokers)" = "$1" ]; }
# shellcheck disable=SC2317
queue_is_quorum() { [ "$(trace_queue_type)" = quorum ]; }
# shellcheck disable=SC2317
has_three_members() { [ "$(trace_queue_members)" = 3 ]; }
# Waits for three running brokers and for goms.trace as a quorum queue on all three.
broker_cluster_of_three() {
  wait_for 240 "a RabbitMQ cluster of three" brokers_are 3
  wait_for 120 "goms.trace declared as a quorum queue" queue_is_quorum
  # A quorum queue's members are the nodes in the cluster when it was declared: the gateway
  # may have declared it before the other nodes joined. Nodes that join later are added, as
  # an operator does (docs/deployment.md); RabbitMQ 3.10 does not do it by itself.
  local node
  for node in rabbit@rabbitmq rabbit@rabbitmq2 rabbit@rabbitmq3; do
    in_broker rabbitmq-queues grow "$node" all --queue-pattern '^goms\.trace' >/dev/null 2>&1 || true
  done
  wait_for 60 "goms.trace replicated on all three nodes" has_three_members
}

# --- stage 3 (--nodes 3): three nodes on this machine, one of them cut off -------------------
# Called after the images are built; everything it makes goes in cleanup (swarm_nodes_down).
# shellcheck disable=SC2317  # the helpers inside are called through wait_for
run_nodes_check() {
  local cut=${GOMS_CHECK_CUT_NODE:-3} i
  [ "$cut" -ge 2 ] && [ "$cut" -le "$NODES" ] \
    || fail "GOMS_CHECK_CUT_NODE must be 2..$NODES (the client goes to node 1's gateway)"
  export LC_ALL=C   # "." as the decimal point of $EPOCHREALTIME
  now() { echo "$EPOCHREALTIME"; }
  since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN {printf "%.1f", b - a}'; }
  swarm_nodes_tools

  # --- nodes and swarm ---
  log "image archive for the nodes (docker save)"
  docker save -o "$WORK/images.tar" "$GOMS_IMAGE" "$GOMS_ETCD_IMAGE" "$GOMS_RABBITMQ_IMAGE"
  log "$NODES nodes: a network namespace, a veth on $NODES_BRIDGE and a dockerd each"
  swarm_nodes_up "$NODES"
  log "docker load into each node"
  swarm_nodes_load "$NODES" "$WORK/images.tar"
  rm -f "$WORK/images.tar"
  log "swarm: node 1 inits ($(node_ip 1)), nodes 2..$NODES join as managers; labels goms_node=<i>"
  swarm_nodes_swarm "$NODES"
  swarm_nodes_label "$NODES"
  node_status() {   # the status of node $1 as the leader sees it (ready, down, ...)
    node_docker 1 node ls --filter "node.label=goms_node=$1" --format '{{.Status}}' | tr 'A-Z' 'a-z'
  }
  nodes_ready() { for i in $(seq "$NODES"); do [ "$(node_status "$i")" = ready ] || return 1; done; }
  wait_for 60 "$NODES Ready nodes" nodes_ready

  # --- stack ---
  cp -r config "$WORK/config"
  echo "swarm-check key $$" >"$WORK/goms.key"
  export GOMS_CONFIG_DIR=$WORK/config GOMS_KEY_FILE=$WORK/goms.key
  export GOMS_GATEWAY_PORT=8080
  BASE=http://$(node_ip 1):$GOMS_GATEWAY_PORT
  log "docker stack deploy ${STACK_FILES[*]} $STACK (gateways on $(node_ip 1)..$(node_ip "$NODES"):8080, host mode)"
  DEPLOYED=1
  DOCKER_HOST=$(node_sock 1) docker stack deploy --resolve-image never "${STACK_FILES[@]}" "$STACK" >"$WORK/deploy.log" 2>&1 \
    || { cat "$WORK/deploy.log" >&2; fail "docker stack deploy failed"; }

  task_on() { node_docker "$1" ps -q --filter "label=com.docker.swarm.service.name=${STACK}_$2" | sed -n 1p; }
  tasks_on() { node_docker "$1" ps -q --filter "label=com.docker.swarm.service.name=${STACK}_$2" | grep -c . || true; }
  on1() { local svc=$1; shift; node_docker 1 exec "$(task_on 1 "$svc")" "$@"; }
  cluster() { on1 gateway goms cluster --gateway 127.0.0.1:9901; }
  user_nodes() {
    cluster | python3 -c 'import json,sys; print("\n".join(sorted(json.load(sys.stdin)["services"].get("user",{}).get("Nodes") or [])))'
  }
  user_count_is() { [ "$(user_nodes | grep -c .)" = "$1" ]; }
  wait_for 300 "the gateway's /healthz on $BASE" curl -fsS --max-time 2 "$BASE/healthz"
  wait_for 180 "/cluster listing 3 user nodes" user_count_is 3
  in_broker() { on1 rabbitmq "$@"; }
  broker_cluster_of_three
  etcd_members=$(on1 etcd etcdctl member list 2>/dev/null | grep -c started || true)
  for i in $(seq "$NODES"); do
    log "node $i ($(node_ip "$i")): $(node_docker "$i" ps --format '{{.Label "com.docker.swarm.service.name"}}' | sed "s/^${STACK}_//" | sort | tr '\n' ' ')"
  done
  for i in $(seq 2 "$NODES"); do
    curl -fsS --max-time 5 "http://$(node_ip "$i"):8080/healthz" >/dev/null || fail "node $i's gateway does not answer on $(node_ip "$i"):8080"
  done
  [ "$(tasks_on "$cut" user)" -ge 1 ] || fail "no user replica runs on node $cut: nothing to move (rerun)"
  log "serving: user nodes $(user_nodes | tr '\n' ' '); etcd members started: $etcd_members; RabbitMQ: 3 nodes, goms.trace quorum on 3"

  # --- steady client ---
  local mark=n$$
  CLIENT_PATH="/api/user/login?mark=$mark&n=" CLIENT_MAX_REQUESTS=40000 CLIENT_MAX_SECONDS=1200
  : >"$CLIENT_LOG"
  client_loop &
  CLIENT_PID=$!
  requests() { grep -c . "$CLIENT_LOG" || true; }
  failed_lines() { awk '$3 != 0 || $4 != 200' "$CLIENT_LOG"; }
  served_by_all_after() {   # every node in $2.. served a request started after $1
    local t=$1 node; shift
    for node in "$@"; do
      awk -v node="$node" -v t="$t" '$5 == node && $1 > t {n++} END {exit !n}' "$CLIENT_LOG" || return 1
    done
  }
  local t0 nodes_before
  t0=$(now)
  nodes_before=$(user_nodes)
  # shellcheck disable=SC2086
  wait_for 60 "every user replica serving" served_by_all_after "$t0" $nodes_before
  enough() { [ "$(requests)" -ge "$1" ]; }
  wait_for 120 "200 requests before the cut" enough 200
  [ -z "$(failed_lines)" ] || { failed_lines | head >&2; fail "requests failed before the cut"; }
  log "steady: $(requests) requests, 0 failed, served by $(echo $nodes_before)"

  # --- the cut ---
  local t_cut t_cut_end t_down t_registered t_routed
  log "cut node $cut off: ip link set $(node_veth "$cut") down (its dockerd and containers keep running)"
  t_cut=$(now)
  swarm_nodes_cut "$cut"
  t_cut_end=$(now)

  # etcd: the two members left hold the quorum: both healthy, and a write goes through.
  local endpoints=
  for i in $(seq "$NODES"); do
    [ "$i" = "$cut" ] && continue
    if [ "$i" = 1 ]; then endpoints+=${endpoints:+,}http://etcd:2379; else endpoints+=${endpoints:+,}http://etcd$i:2379; fi
  done
  etcd_quorum() {
    on1 etcd etcdctl --endpoints "$endpoints" --command-timeout 3s endpoint health \
      && on1 etcd etcdctl --endpoints "$endpoints" --command-timeout 3s put goms-swarm-check/quorum "$(now)"
  }
  wait_for 30 "etcd writable through the members left ($endpoints)" etcd_quorum
  local etcd_ok_at etcd_leader
  etcd_ok_at=$(since "$t_cut")
  etcd_leader=$(on1 etcd etcdctl --endpoints "$endpoints" endpoint status 2>/dev/null | awk -F', ' '$5 == "true" {print $1}' | sed -n 1p)
  log "etcd: quorum kept by $endpoints (a put went through ${etcd_ok_at}s after the cut; leader ${etcd_leader:-?})"
  node_is_down() { [ "$(node_status "$cut")" = down ]; }
  wait_for 120 "Swarm marking node $cut down" node_is_down
  t_down=$(now)
  log "node $cut is down for Swarm after $(since "$t_cut" "$t_down")s"

  # The cut node's user replicas: replaced on other nodes, registered, routed.
  moved() {
    local now_nodes; now_nodes=$(user_nodes)
    [ "$(echo "$now_nodes" | grep -c .)" = 3 ] && [ "$now_nodes" != "$nodes_before" ]
  }
  wait_for 180 "the cut node's user replicas running elsewhere and registered" moved
  t_registered=$(now)
  local nodes_after lost new
  nodes_after=$(user_nodes)
  lost=$(comm -23 <(echo "$nodes_before") <(echo "$nodes_after"))
  new=$(comm -13 <(echo "$nodes_before") <(echo "$nodes_after"))
  # shellcheck disable=SC2086
  wait_for 60 "the new replicas ($(echo $new)) serving" served_by_all_after "$t_cut" $new
  # The first request each new replica served: the last of those is when all are routed.
  t_routed=$(for i in $new; do awk -v node="$i" -v t="$t_cut" '$5 == node && $1 > t {print $1; exit}' "$CLIENT_LOG"; done | sort -n | tail -n 1)
  log "replicas moved: $(echo $lost) -> $(echo $new); routed $(since "$t_cut" "$t_routed")s after the cut"
  local at_routed
  at_routed=$(requests)
  wait_for 120 "200 more requests" enough $((at_routed + 200))
  wait_for 30 "etcd still writable" etcd_quorum

  # --- the node comes back ---
  log "node $cut back: ip link set $(node_veth "$cut") up"
  local t_heal
  t_heal=$(now)
  swarm_nodes_heal "$cut"
  node_is_ready() { [ "$(node_status "$cut")" = ready ]; }
  wait_for 120 "node $cut Ready again" node_is_ready
  local t_ready
  t_ready=$(now)
  log "node $cut Ready again after $(since "$t_heal" "$t_ready")s"
  wait_for 300 "a RabbitMQ cluster of three again" brokers_are 3
  etcd_all_healthy() {
    on1 etcd etcdctl --endpoints http://etcd:2379,http://etcd2:2379,http://etcd3:2379 --command-timeout 3s endpoint health
  }
  wait_for 120 "three healthy etcd members again" etcd_all_healthy
  # The cut node's old user tasks were replaced: Swarm stops them now.
  old_gone() { [ "$(tasks_on "$cut" user)" = 0 ]; }
  wait_for 120 "the replaced user tasks on node $cut stopped" old_gone
  local at_back
  at_back=$(requests)
  wait_for 120 "100 more requests" enough $((at_back + 100))
  touch "$STOP_FILE"
  wait "$CLIENT_PID" 2>/dev/null || true
  CLIENT_PID=

  # --- trace events: every event of every answered request in goms.trace ---
  # Requests answered 200 each leave request.start/end (gateway) and service.start/end (user).
  node_docker 1 exec -i "$(task_on 1 gateway)" sh -c 'cat >/tmp/trace-queue-events.py' <scripts/trace-queue-events.py
  events_missing() {
    on1 gateway sh -c 'python3 /tmp/trace-queue-events.py http://rabbitmq:15672 goms.trace' 2>/dev/null \
      | python3 -c '
import json, sys, urllib.parse
mark, log = sys.argv[1], sys.argv[2]
seen, events, ids = {}, 0, set()
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    q = urllib.parse.parse_qs((e.get("request") or {}).get("urlParam", "").lstrip("?"))
    if q.get("mark") == [mark]:
        seen.setdefault(q["n"][0], set()).add(e["event"])
        events += 1
        ids.add(e["eventId"])
answered = [f.split()[1] for f in open(log) if f.split()[2:4] == ["0", "200"]]
print(sum(4 - len(seen.get(n, ())) for n in answered), 4 * len(answered), events - len(ids))
' "$mark" "$CLIENT_LOG"
  }
  local missing expected duplicates deadline
  deadline=$((SECONDS + 180))
  while :; do
    read -r missing expected duplicates < <(events_missing || echo "? ? ?")
    [ "$missing" = 0 ] && break
    [ "$SECONDS" -lt "$deadline" ] || fail "trace events: $missing of $expected missing from goms.trace 180 s after the node came back"
    sleep 5
  done

  # --- report ---
  # The client is sequential: a request took (next start - its start - pause), at most.
  longest() {
    awk -v p="${CLIENT_PAUSE:-0.02}" 'NR > 1 && $1 - prev > m {m = $1 - prev} {prev = $1} END {printf "%.1f", m - p}' "$CLIENT_LOG"
  }
  local total bad bad_other
  total=$(requests)
  bad=$(failed_lines | wc -l)
  # In flight at the cut: started before the link went down, and not over when the cut began
  # (the client is sequential: a request is over when the next one starts).
  bad_other=$(awk -v b="$t_cut" -v e="$t_cut_end" '
    {start[$2] = $1; bad[$2] = ($3 != 0 || $4 != 200)}
    END {for (n in start) if (bad[n] && !(start[n] <= e && ((n + 1) in start ? start[n + 1] : 1e12) > b)) c++; print c + 0}
  ' "$CLIENT_LOG")
  echo
  echo "swarm-check --nodes $NODES ($STACK, $GOMS_BUILD_PROFILE binary): node $cut cut off under a steady client"
  echo "  requests (GET):     $total, failed $bad (in flight at the cut: $((bad - bad_other)); others: $bad_other); the longest took $(longest) s"
  echo "  node down (Swarm):  $(since "$t_cut" "$t_down") s after the cut (dispatcher heartbeat 2 s)"
  echo "  user replicas:      $(echo $lost) -> $(echo $new): routed $(since "$t_cut" "$t_routed") s after the cut (first request it served; /cluster poll saw it at $(since "$t_cut" "$t_registered") s)"
  echo "  etcd:               quorum kept ($endpoints healthy; a put went through $etcd_ok_at s after the cut, another after the move; leader ${etcd_leader:-?})"
  echo "  trace events:       $expected expected (4 per answered request), $missing lost; $duplicates sent twice (same eventId: indexed once)"
  echo "  node $cut back:        Ready $(since "$t_heal" "$t_ready") s after its veth came up; its old user task stopped; etcd and RabbitMQ three again"
  echo
  if [ "$bad_other" != 0 ]; then
    failed_lines | head -n 20 >&2
    fail "$bad_other requests failed that were not in flight at the cut"
  fi
}

# --- 1. images -----------------------------------------------------------------------------
log "offline images (existing ones are kept)"
eval "$(docker/offline/build-images.sh)"
export GOMS_ETCD_IMAGE GOMS_RABBITMQ_IMAGE
log "goms image from the $GOMS_BUILD_PROFILE build"
eval "$(docker/offline/build-goms-image.sh)"
export GOMS_IMAGE=${GOMS_IMAGE:-goms/goms:latest}

if [ "$NODES" != 0 ]; then
  run_nodes_check
  exit 0
fi

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
  # rabbitmq2: the check takes the first broker away below.
  in_broker() { docker exec "$(task_of rabbitmq2)" "$@"; }
  published() {
    docker exec "$(gateway_container)" python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9901/metrics").read().decode())' \
      | awk '$1 == "goms_trace_events_published_total" {print $2}'
  }
  broker_cluster_of_three
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
