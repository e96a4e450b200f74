#!/usr/bin/env bash
# The appliance's scripted check (issue 4), runnable without a registry:
#
#   1. validates both compose files (`config -q`),
#   2. builds the offline images and the goms image from a host build (debug by default),
#   3. brings the stack up with the offline override under a project of its own
#      (goms-check-<pid>, host ports picked by Docker on 127.0.0.1, config/ copied to a
#      temporary folder that is the gateway's mounted config directory),
#   4. waits for health: gateway /healthz, /cluster listing three `user` nodes,
#   5. runs a steady sequential client (GET /api/user/login, every status and X-Served-By
#      recorded) while it scales `user` 3 -> 5 -> 2 and edits the route file live,
#   6. asserts: no failed request, the new replicas served traffic, the removed replicas got
#      none after their removal, the added route answers, the invalid edit is refused with
#      file:line in the gateway log and changed nothing,
#   7. scales `order` (a Python app behind `goms sidecar`) 1 -> 3 under a second steady client:
#      no failed request, all three replicas answer, and the sidecars published trace events,
#   7b. stops RabbitMQ, sends marked requests, scales `user` 3 -> 1 and starts RabbitMQ: every
#      event of every marked request reaches goms.trace (the removed replicas' spool folders
#      are adopted by live nodes),
#   8. tears everything down (`down -v --remove-orphans`), also on failure or Ctrl-C.
#
# Environment:
#   GOMS_BUILD_PROFILE=debug|release  binary to package (default debug: the test run built it)
#   GOMS_NO_CARGO_BUILD=1             package target/<profile>/goms as it is (no cargo run)
#   GOMS_IMAGE, GOMS_ETCD_IMAGE, GOMS_RABBITMQ_IMAGE   images (defaults: the offline ones)
#   GOMS_CHECK_KEEP=1                 keep the work folder (client log, gateway log)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export LC_ALL=C   # "." as the decimal point of $EPOCHREALTIME
export GOMS_BUILD_PROFILE=${GOMS_BUILD_PROFILE:-debug}

CLIENT_PAUSE=${GOMS_CHECK_CLIENT_PAUSE:-0.02}      # seconds between two requests
CLIENT_MAX_REQUESTS=${GOMS_CHECK_CLIENT_MAX:-30000} # bounds on the client, whatever happens
CLIENT_MAX_SECONDS=${GOMS_CHECK_CLIENT_SECONDS:-600}

started=$SECONDS
log() { echo "[stack-check +$((SECONDS - started))s] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

# --- tools ---------------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
command -v curl >/dev/null 2>&1 || fail "curl is needed"
if command -v jq >/dev/null 2>&1; then
  nodes_of() { jq -r --arg s "$1" '(.services[$s].Nodes // [])[]'; }
elif command -v python3 >/dev/null 2>&1; then
  nodes_of() {
    python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin).get("services",{}).get(sys.argv[1],{}).get("Nodes") or []))' "$1"
  }
else
  fail "jq or python3 is needed to read /cluster"
fi

MAIN=compose/docker-compose.yml
OFFLINE=compose/docker-compose.offline.yml
PROJECT=goms-check-$$
c() { "${COMPOSE[@]}" -p "$PROJECT" -f "$MAIN" -f "$OFFLINE" "$@"; }

WORK="$(mktemp -d /tmp/goms-stack-check.XXXXXX)"
CONFIG_DIR=$WORK/config
CLIENT_LOG=$WORK/client.log
STOP_FILE=$WORK/stop-client
CLIENT_PID=
STACK_UP=0

exec 3>&1 4>&2   # the original stdout/stderr, for cleanup (a signal may land inside a redirection)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  exec 1>&3 2>&4
  [ -n "${ORDER_STOP:-}" ] && touch "$ORDER_STOP"
  if [ -n "$CLIENT_PID" ]; then
    touch "$STOP_FILE"
    kill "$CLIENT_PID" 2>/dev/null || true
    wait "$CLIENT_PID" 2>/dev/null || true
  fi
  if [ "$STACK_UP" = 1 ]; then
    c logs --no-color gateway >"$WORK/gateway.log" 2>&1 || true
    if [ "$rc" != 0 ]; then
      log "state at failure:"
      c ps >&2 || true
      log "last gateway log lines:"
      tail -n 40 "$WORK/gateway.log" >&2 || true
    fi
    log "tearing down $PROJECT"
    c down -v --remove-orphans --timeout 15 >/dev/null 2>&1 || log "warning: 'down' failed for $PROJECT"
  fi
  if [ "$rc" != 0 ] || [ "${GOMS_CHECK_KEEP:-0}" = 1 ]; then
    log "work folder kept: $WORK (client.log, gateway.log)"
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

# --- 1. compose files ----------------------------------------------------------------------
log "validating compose files with ${COMPOSE[*]}"
"${COMPOSE[@]}" -f "$MAIN" config -q || fail "$MAIN does not validate"
"${COMPOSE[@]}" -f "$MAIN" -f "$OFFLINE" config -q || fail "$MAIN + $OFFLINE do not validate"

# --- 2. images -----------------------------------------------------------------------------
log "offline images (existing ones are kept)"
docker/offline/build-images.sh >/dev/null
log "goms image from the $GOMS_BUILD_PROFILE build"
docker/offline/build-goms-image.sh >/dev/null

# --- 3. stack ------------------------------------------------------------------------------
cp -r config "$CONFIG_DIR"
rm -rf "$CONFIG_DIR/tls"
scripts/tls-localhost.sh "$CONFIG_DIR/tls" 2>/dev/null
chmod -R a+rX "$WORK"   # the containers run as the non-root user goms
export GOMS_CONFIG_DIR=$CONFIG_DIR
export GOMS_LOG_FORMAT=text   # the checks below read the gateway's text log
export GOMS_GATEWAY_PORT=127.0.0.1: GOMS_GATEWAY_TLS_PORT=127.0.0.1: GOMS_GATEWAY_ADMIN_PORT=127.0.0.1: GOMS_ETCD_PORT=127.0.0.1: GOMS_AMQP_PORT=127.0.0.1: GOMS_RABBITMQ_UI_PORT=127.0.0.1:
log "starting project $PROJECT (config dir $CONFIG_DIR)"
STACK_UP=1
c up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "'up -d' failed"; }
GW="$(c port gateway 8080 | tail -n 1)"
GW=${GW/0.0.0.0/127.0.0.1}
[ -n "$GW" ] || fail "gateway port not published"
BASE=http://$GW
ADMIN="$(c port gateway 9901 | tail -n 1)"
ADMIN=http://${ADMIN/0.0.0.0/127.0.0.1}
log "gateway at $BASE (admin $ADMIN)"

nodes() { curl -fsS --max-time 3 "$ADMIN/cluster" | nodes_of "$1" | sort; }
user_nodes() { nodes user; }
user_count_is() { [ "$(user_nodes | grep -c .)" = "$1" ]; }
order_count_is() { [ "$(nodes order | grep -c .)" = "$1" ]; }
status_of() { curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$@" || true; }
answers() { [ "$(status_of "$BASE$1")" = "$2" ]; }

wait_for 90 "gateway /healthz" curl -fsS --max-time 2 "$BASE/healthz"
wait_for 60 "/cluster listing 3 user nodes" user_count_is 3
body="$(curl -fsS --max-time 5 "$BASE/api/user/login?a=1&b=3" -d username=test -d password=test)" \
  || fail "first call through the gateway failed"
case "$body" in *'"msg":"success"'*'"urlParam":"?a=1&b=3"'*|*'"urlParam":"?a=1&b=3"'*'"msg":"success"'*) ;;
  *) fail "unexpected echo body: $body" ;; esac
nodes_initial="$(user_nodes)"
log "healthy: user nodes $(echo $nodes_initial)"
TLS_GW="$(c port gateway 8443 | tail -n 1)"
TLS_PORT=${TLS_GW##*:}
[ -n "$TLS_PORT" ] || fail "gateway HTTPS port not published"
body="$(curl -fsS --max-time 5 --cacert "$CONFIG_DIR/tls/localhost.crt" \
  --resolve "localhost:$TLS_PORT:127.0.0.1" "https://localhost:$TLS_PORT/api/user/login?a=1&b=3" \
  -d username=test -d password=test)" || fail "a call over HTTPS (8443) failed"
case "$body" in *'"msg":"success"'*) ;; *) fail "unexpected HTTPS echo body: $body" ;; esac
log "HTTPS on 8443 answers with the self-signed localhost certificate"
# gRPC with grpcio (gRPC's C core, not goms's tonic): h2c on 8080, and over TLS on 8443.
python3 -c 'import grpc' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check grpcio >/dev/null 2>&1 \
  || fail "pip install grpcio failed"
reply="$(python3 scripts/grpc-echo-call.py "$GW" via-h2c)" || fail "a gRPC call over h2c failed: $reply"
case "$reply" in "via-h2c "*) ;; *) fail "unexpected gRPC reply: $reply" ;; esac
reply="$(python3 scripts/grpc-echo-call.py "127.0.0.1:$TLS_PORT" via-tls --ca "$CONFIG_DIR/tls/localhost.crt")" \
  || fail "a gRPC call over TLS failed: $reply"
case "$reply" in "via-tls "*) ;; *) fail "unexpected gRPC reply over TLS: $reply" ;; esac
log "gRPC goms.echo.v1.Echo/Unary answers over h2c (8080) and TLS (8443): served by ${reply#via-tls }"

# --- 4. steady client ----------------------------------------------------------------------
: >"$CLIENT_LOG"
CLIENT_PATH="/api/user/login?n=" client_loop &
CLIENT_PID=$!
now() { echo "$EPOCHREALTIME"; }
# Requests served by node $1 after time $2.
served_after() { awk -v node="$1" -v t="$2" '$5 == node && $1 > t' "$CLIENT_LOG" | wc -l; }
served_all_after() {
  local t=$1 node
  shift
  for node in "$@"; do [ "$(served_after "$node" "$t")" -gt 0 ] || return 1; done
}

t_start=$(now)
wait_for 20 "baseline traffic on all 3 replicas" served_all_after "$t_start" $nodes_initial

# --- 5. scale up 3 -> 5 ---------------------------------------------------------------------
log "scale user 3 -> 5"
t_up=$(now)
c up -d --no-deps --no-recreate --scale user=5 user >"$WORK/scale-up.log" 2>&1 \
  || { cat "$WORK/scale-up.log" >&2; fail "scale to 5 failed"; }
wait_for 30 "/cluster listing 5 user nodes" user_count_is 5
nodes_five="$(user_nodes)"
nodes_new="$(comm -13 <(echo "$nodes_initial") <(echo "$nodes_five"))"
[ "$(echo "$nodes_new" | grep -c .)" = 2 ] || fail "expected 2 new nodes, got: $nodes_new"
wait_for 30 "traffic on the new replicas ($(echo $nodes_new))" served_all_after "$t_up" $nodes_new
log "new replicas served traffic: $(for n in $nodes_new; do printf '%s=%s ' "$n" "$(served_after "$n" "$t_up")"; done)"

# --- 6. scale down 5 -> 2 -------------------------------------------------------------------
log "scale user 5 -> 2 (SIGTERM -> deregister -> drain)"
t_down=$(now)
c up -d --no-deps --no-recreate --scale user=2 user >"$WORK/scale-down.log" 2>&1 \
  || { cat "$WORK/scale-down.log" >&2; fail "scale to 2 failed"; }
t_down_done=$(now)   # the removed containers have exited and are gone
wait_for 15 "/cluster listing 2 user nodes" user_count_is 2
nodes_two="$(user_nodes)"
nodes_removed="$(comm -23 <(echo "$nodes_five") <(echo "$nodes_two"))"
[ "$(echo "$nodes_removed" | grep -c .)" = 3 ] || fail "expected 3 removed nodes, got: $nodes_removed"
running="$(c ps -q user | grep -c . || true)"
[ "$running" = 2 ] || fail "expected 2 user containers, found $running"
t_settle=$(now)
wait_for 20 "traffic on the remaining replicas ($(echo $nodes_two))" served_all_after "$t_settle" $nodes_two
sleep 3
gateway_log() { c logs --no-color gateway 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'; }
# When the gateway saw each removed node leave (its lease revoked on SIGTERM): no request the
# client started after that moment may reach the node (0.2 s margin for the table update).
leave_report=
for node in $nodes_removed; do
  late="$(served_after "$node" "$t_down_done")"
  [ "$late" = 0 ] || fail "removed replica $node served $late requests after its removal"
  stamp="$(gateway_log | grep -F "[user] node [$node] leave" | grep -Eo '[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z' | head -n 1)"
  [ -n "$stamp" ] || fail "the gateway did not log '[user] node [$node] leave'"
  t_leave="$(date -d "$stamp" +%s.%N)"
  after_leave="$(served_after "$node" "$(awk -v t="$t_leave" 'BEGIN{printf "%.6f", t + 0.2}')")"
  [ "$after_leave" = 0 ] || fail "removed replica $node served $after_leave requests started after the gateway saw it leave"
  leave_report+=" $node: left $(awk -v a="$t_down" -v b="$t_leave" 'BEGIN{printf "%.1f", b-a}')s after the scale command, last request $(awk -v n="$node" '$5 == n {t=$1} END {printf "%.1f", t}' "$CLIENT_LOG" | awk -v l="$t_leave" '{printf "%.1fs before", l-$1}');"
done
log "removed replicas served nothing after leaving:${leave_report}"
log "remaining: $(echo $nodes_two)"

# --- 7. routes edited live ------------------------------------------------------------------
ROUTES=$CONFIG_DIR/services.yml
write_routes() {   # atomically, as editors and `mv` do
  cat >"$ROUTES.tmp"
  chmod a+r "$ROUTES.tmp"
  mv -f "$ROUTES.tmp" "$ROUTES"
}
answers /api/user/profile 404 || fail "/api/user/profile answers before it exists"
log "valid edit: add route user.profile"
t_edit=$(now)
write_routes <<'YAML'
services:
  user:
    register: "/register"
    login: "/login"
    profile: "/profile"
  order:
    submit: "/order/submit"
YAML
wait_for 15 "the new route /api/user/profile answering 200" answers /api/user/profile 200
log "new route answers 200 after $(awk -v a="$t_edit" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"

log "invalid edit: route path without a leading / on line 6"
write_routes <<'YAML'
services:
  user:
    register: "/register"
    login: "/login"
    profile: "/profile"
    broken: "no-leading-slash"
  order:
    submit: "/order/submit"
YAML
refused_logged() {
  gateway_log | grep 'Route file refused' | grep -Eq 'services\.yml:6:[0-9]+'
}
wait_for 15 "gateway log: 'Route file refused' with services.yml:6:<col>" refused_logged
refusal="$(gateway_log | grep 'Route file refused' | tail -n 1)"
log "gateway logged: ${refusal#*| }"
sleep 3   # let the 2 s poll see the file again: it must still be refused
answers /api/user/login 200 || fail "/api/user/login stopped answering after the invalid edit"
answers /api/user/profile 200 || fail "/api/user/profile stopped answering after the invalid edit"
answers /api/user/broken 404 || fail "the refused route /api/user/broken answers"
answers /api/order/submit 200 || fail "/api/order/submit stopped answering after the invalid edit"
log "previous routes keep serving (login 200, profile 200, broken 404, order/submit 200)"

# --- 8. a service in another language: order (Python behind goms sidecar), 1 -> 3 -----------
ORDER_LOG=$WORK/order-client.log
ORDER_STOP=$WORK/stop-order-client
wait_for 60 "/cluster listing 1 order node" order_count_is 1
: >"$ORDER_LOG"
(STOP_FILE=$ORDER_STOP CLIENT_LOG=$ORDER_LOG CLIENT_PATH="/api/order/submit?item=" client_loop) &
ORDER_PID=$!
t_order=$(now)
log "scale order 1 -> 3"
c up -d --no-deps --no-recreate --scale order=3 order >"$WORK/scale-order.log" 2>&1 \
  || { cat "$WORK/scale-order.log" >&2; fail "scale order to 3 failed"; }
wait_for 60 "/cluster listing 3 order nodes" order_count_is 3
order_nodes="$(nodes order)"
order_served_all() {
  local node
  for node in $order_nodes; do
    awk -v node="$node" -v t="$t_order" '$5 == node && $1 > t {n++} END {exit !n}' "$ORDER_LOG" || return 1
  done
}
wait_for 30 "traffic on all 3 order replicas ($(echo $order_nodes))" order_served_all
touch "$ORDER_STOP"
wait "$ORDER_PID" || true
order_total="$(grep -c . "$ORDER_LOG" || true)"
order_failed="$(awk '$3 != 0 || $4 != 200 || $5 == "-"' "$ORDER_LOG" | wc -l)"
[ "$order_failed" = 0 ] || { head -n 20 "$ORDER_LOG" >&2; fail "$order_failed of $order_total order requests failed"; }
# sed reads the whole list: head would close the pipe early, and pipefail would see SIGPIPE.
order_container="$(c ps -q order | sed -n 1p)"
published_events() {
  docker exec "$order_container" python3 -c \
    "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:4191/metrics').read().decode())" \
    | awk '$1 == "goms_trace_events_published_total" {print $2}'
}
order_published() { [ "$(published_events)" -gt 0 ]; }
wait_for 20 "an order sidecar's trace events confirmed by RabbitMQ" order_published
log "order: $order_total requests, 0 failed, served by $(echo $order_nodes); a sidecar published $(published_events) trace events"

# The trace consumer runs without Elasticsearch (offline), waiting; it must not crash-loop.
consumer="$(c ps -q trace-consumer | head -n 1)"
[ -n "$consumer" ] || fail "no trace-consumer container"
[ "$(docker inspect -f '{{.State.Running}} {{.RestartCount}}' "$consumer")" = "true 0" ] \
  || fail "trace-consumer is not running steadily: $(docker inspect -f '{{.State.Status}}, restarts {{.RestartCount}}' "$consumer")"
queued="$(c exec -T rabbitmq rabbitmqctl -q list_queues name messages 2>/dev/null | awk '$1 == "goms.trace" {print $2}' || true)"
log "trace-consumer running; trace messages queued in goms.trace (no Elasticsearch offline; a message carries up to 1,024 events): ${queued:-unknown}"

# --- 8b. spooled events outlive their replicas: RabbitMQ stopped, user scaled 3 -> 1 --------
# Every event of every answered request must reach goms.trace, including those the removed
# replicas spooled: a live node adopts their spool folders (the goms-spool volume).
ADOPT_LOG=$WORK/adopt-client.log
ADOPT_MARK=adopt-$$
ADOPT_REQUESTS=60
log "spool adoption: user 2 -> 3, RabbitMQ and the consumer stopped, $ADOPT_REQUESTS marked requests, user 3 -> 1, RabbitMQ started"
c up -d --no-deps --no-recreate --scale user=3 user >"$WORK/scale-adopt-up.log" 2>&1 \
  || { cat "$WORK/scale-adopt-up.log" >&2; fail "scale user to 3 failed"; }
wait_for 30 "/cluster listing 3 user nodes" user_count_is 3
nodes_before_adopt="$(user_nodes)"
# Stopped, the consumer hands its unacknowledged messages back: they can be read then.
c stop trace-consumer >/dev/null 2>&1 || fail "stopping trace-consumer failed"
c stop rabbitmq >/dev/null 2>&1 || fail "stopping rabbitmq failed"
: >"$ADOPT_LOG"
for n in $(seq 1 "$ADOPT_REQUESTS"); do
  status="$(curl -sS -o /dev/null -D "$WORK/adopt-headers" -w '%{http_code}' --max-time 10 \
    -H "X-Request-Id: $ADOPT_MARK-$n" "$BASE/api/user/login?adopt=$n" || true)"
  served="$(tr -d '\r' <"$WORK/adopt-headers" | awk -F': ' 'tolower($1) == "x-served-by" {print $2}')"
  [ "$status" = 200 ] || fail "marked request $n with RabbitMQ stopped: status $status"
  echo "$n $served" >>"$ADOPT_LOG"
done
c up -d --no-deps --no-recreate --scale user=1 user >"$WORK/scale-adopt-down.log" 2>&1 \
  || { cat "$WORK/scale-adopt-down.log" >&2; fail "scale user to 1 failed"; }
wait_for 15 "/cluster listing 1 user node" user_count_is 1
nodes_gone="$(comm -23 <(echo "$nodes_before_adopt") <(user_nodes))"
for node in $nodes_gone; do
  grep -q " $node\$" "$ADOPT_LOG" || fail "removed replica $node served no marked request: nothing to adopt from it"
done
c start rabbitmq >/dev/null 2>&1 || fail "starting rabbitmq failed"
wait_for 120 "RabbitMQ answering again" c exec -T rabbitmq rabbitmq-diagnostics -q ping
# Read after the restart: Docker picks the host port again.
RABBIT_UI="$(c port rabbitmq 15672 | tail -n 1)"
RABBIT_UI=http://${RABBIT_UI/0.0.0.0/127.0.0.1}
marked_events() {
  python3 scripts/trace-queue-events.py "$RABBIT_UI" goms.trace 2>/dev/null | python3 -c '
import json, sys
mark = sys.argv[1]
print(len({e["eventId"] for e in map(json.loads, sys.stdin) if str(e.get("requestId", "")).startswith(mark)}))
' "$ADOPT_MARK-" 2>/dev/null || echo 0
}
# Adoption runs at each node's start and then every minute; the spools replay at once.
expected_events=$((ADOPT_REQUESTS * 4))
deadline=$((SECONDS + 180))
until [ "$(marked_events)" = "$expected_events" ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "marked events in goms.trace: $(marked_events) of $expected_events after 180 s"
  sleep 5
done
adoptions="$(c logs --no-color 2>/dev/null | grep -c "Adopted the trace spool folder" || true)"
[ "$adoptions" -ge "$(echo "$nodes_gone" | grep -c .)" ] \
  || fail "$expected_events events arrived, but only $adoptions adoption(s) were logged for $(echo $nodes_gone)"
log "spool adoption: all $expected_events events of $ADOPT_REQUESTS requests in goms.trace; the spools of $(echo $nodes_gone) adopted ($adoptions adoption(s) logged)"
c start trace-consumer >/dev/null 2>&1 || fail "starting trace-consumer again failed"

# --- 9. verdict ----------------------------------------------------------------------------
sleep 2
touch "$STOP_FILE"
wait "$CLIENT_PID" || true
CLIENT_PID=
t_end=$(now)

total="$(grep -c . "$CLIENT_LOG" || true)"
failed="$(awk '$3 != 0 || $4 != 200 || $5 == "-"' "$CLIENT_LOG" | wc -l)"
phase() { awk -v a="$1" -v b="$2" '$1 >= a && $1 < b' "$CLIENT_LOG" | wc -l; }
echo
echo "stack-check summary ($PROJECT, ${COMPOSE[*]}, $GOMS_BUILD_PROFILE binary)"
echo "  requests: $total, failed: $failed, over $(awk -v a="$t_start" -v b="$t_end" 'BEGIN{printf "%.0f", b-a}')s"
echo "  phases:   3 replicas $(phase "$t_start" "$t_up"), scaling 3->5 $(phase "$t_up" "$t_down"), 5->2 $(phase "$t_down" "$t_edit"), route edits $(phase "$t_edit" "$t_end")"
echo "  served by:"
awk '$5 != "-" {n[$5]++} END {for (k in n) print "    " k, n[k]}' "$CLIENT_LOG" | sort
echo "  new replicas:     $(echo $nodes_new)"
echo "  removed replicas: $(echo $nodes_removed) (0 requests after removal)"
echo "  routes: valid edit applied; invalid edit refused (${refusal##*error=})"
echo "  order (Python behind goms sidecar): $order_total requests, 0 failed, scaled 1 -> 3: $(echo $order_nodes)"
echo "  spool adoption: RabbitMQ stopped, user 3 -> 1: all $expected_events events of $ADOPT_REQUESTS requests reached goms.trace ($(echo $nodes_gone) adopted)"
echo "  traces: ${queued:-?} messages (up to 1,024 events each) queued in RabbitMQ goms.trace (Elasticsearch left out offline)"
echo
if [ "$failed" != 0 ]; then
  log "failed requests (first 20):"
  awk '$3 != 0 || $4 != 200 || $5 == "-"' "$CLIENT_LOG" | head -n 20 >&2
  fail "$failed of $total requests failed"
fi
[ "$total" -gt 100 ] || fail "the client made only $total requests"
