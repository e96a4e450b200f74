#!/usr/bin/env bash
# bench/compare.sh: the goms gateway against nginx, HAProxy and direct access, on the same upstreams,
# interleaved in one run (issue 5). See docs/benchmarks.md for what it measures and how to read it.
#
#   bench/compare.sh                         # full run: 3 rounds x 5 s, 16 and 256 connections
#   bench/compare.sh --rounds 5 --duration 10
#   bench/compare.sh --smoke                 # CI: 1 round, 2 s per run, 16 connections only
#
# Options:
#   --rounds N         rounds of A B C D (default 3, at least 3 unless --smoke)
#   --duration S       seconds per wrk run (default 5)
#   --conns "A B"      connection counts (default "16 256")
#   --threads N        goms gateway proxy threads, passed as --threads (default 2, the gateway's default)
#   --wrk-threads N    wrk threads (default 2, capped at the connection count)
#   --goms-bin PATH    gateway binary (default target/release/goms; built with
#                      `cargo build --release --locked` when missing). Env GOMS_BIN works too.
#   --out DIR          also write results.tsv and table.md there
#   --keep             keep the scratch directory (configs, logs) for inspection
#   --tracing          also measure a second gateway with tracing on (`goms+trace`), publishing to a
#                      local RabbitMQ (installed from Debian if missing); the `goms` rows are tracing off
#   --trace-env K=V    extra environment for the `goms+trace` gateway, repeatable (e.g.
#                      --trace-env GOMS__TRACE__PUBLISH_INTERVAL=200ms), to weigh a trace setting
#   --tls              also measure HTTPS: `goms+tls` (the same gateway's gateway.tls listener) and
#                      `nginx+tls` (the same nginx with `listen ... ssl`), one self-signed ECDSA P-256
#                      certificate for both, TLS 1.3, keep-alive; plus a `handshake` scenario, a GET
#                      on a new connection each time (Connection: close), which counts new TLS
#                      handshakes per second. TLS rows compare with nginx+tls.
#   --http2            also measure HTTP/2 over TLS with h2load (Debian's nghttp2-client; implies --tls):
#                      `goms+h2` (the gateway's TLS listener, h2 by ALPN) and `nginx+h2` (`listen ...
#                      ssl http2`), --h2-streams concurrent streams per connection (default 10).
#                      h2load reports no percentiles: for these rows the p50 column holds its mean
#                      latency and the p99 column its largest. h2 rows compare with nginx+h2.
#   --bare-pingora     also measure `pingora`: a bare pingora round-robin proxy (examples/bare_pingora.rs,
#                      built with cargo), doing what the nginx front end does, with --threads threads;
#                      the floor goms's gateway is built on
#   --own-app-floor    also measure `floor-sessions` and `floor-raw` (examples/own_app_floor.rs): the
#                      same round robin with pingora's proxy replaced by a proxy of its own, on
#                      pingora-core's HTTP/1 sessions and on raw bytes with httparse; what an owned
#                      forwarding path costs before any goms feature (issue 35's next step); and
#                      `pingora-handoff` (bare_pingora --handoff): pingora-proxy behind an app that
#                      reads each request's first bytes, the path of a request an owned path passes on
#   --profile          afterwards, profile the gateway with `perf record -g` during a GET run at the
#                      lowest connection count (--profile-seconds, default 10); prints the hottest
#                      symbols and keeps profile.txt (and perf.data with --keep or --out)
#   --hold S           after start-up, print the front ends' URLs and PIDs and wait S seconds (for
#                      perf, strace, curl by hand), then measure as usual
#   --smoke            1 round, 2 s per run, one connection count (16); for CI
#   --callgrind        instead of the timed rounds, run every proxy under valgrind's callgrind and
#                      print the instructions each executes per request (GET and POST, 4 connections,
#                      --duration s each): unlike req/s and CPU time, these counts repeat from run to
#                      run whatever else the machine does. Then the gateway's instructions by phase of
#                      the request path (bench/callgrind-phases.py); with --tracing also a traced
#                      gateway with the dashboard off (`goms+trace-nodash`), and what tracing and the
#                      dashboard cost. Installs valgrind from Debian if missing.
#
# Everything it starts (upstream nginx, etcd, gateway, front nginx, HAProxy) is stopped by PID in an
# EXIT trap, even on failure. It never signals processes by name: other nginx/etcd may be running.
# All listeners it starts bind 127.0.0.1, except the goms gateway, which binds 0.0.0.0 (it has no
# listen-address setting yet); all traffic goes to 127.0.0.1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=3
DURATION=5
CONNS="16 256"
GW_THREADS=2
WRK_THREADS=2
GOMS_BIN=${GOMS_BIN:-}
OUT_DIR=""
KEEP=0
SMOKE=0
TRACING=0
EXTRA_TRACE_ENV=()
BARE_PINGORA=0
OWN_APP_FLOOR=0
TLS=0
H2=0
H2_STREAMS=10
PROFILE=0
PROFILE_SECS=10
HOLD=0
CALLGRIND=0
POST_BYTES=1024

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=${2:?}; shift 2 ;;
        --duration) DURATION=${2:?}; shift 2 ;;
        --conns) CONNS=${2:?}; shift 2 ;;
        --threads) GW_THREADS=${2:?}; shift 2 ;;
        --wrk-threads) WRK_THREADS=${2:?}; shift 2 ;;
        --goms-bin) GOMS_BIN=${2:?}; shift 2 ;;
        --out) OUT_DIR=${2:?}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --tracing) TRACING=1; shift ;;
        --trace-env)
            case "${2:-}" in GOMS__*=*) EXTRA_TRACE_ENV+=("$2") ;; *) die "--trace-env takes GOMS__NAME=value, got '${2:-}'" ;; esac
            shift 2 ;;
        --bare-pingora) BARE_PINGORA=1; shift ;;
        --own-app-floor) OWN_APP_FLOOR=1; shift ;;
        --tls) TLS=1; shift ;;
        --http2) TLS=1; H2=1; shift ;;
        --h2-streams) H2_STREAMS=${2:?}; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --callgrind) CALLGRIND=1; shift ;;
        --hold) HOLD=${2:?}; shift 2 ;;
        --profile) PROFILE=1; shift ;;
        --profile-seconds) PROFILE_SECS=${2:?}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
if [ "$SMOKE" = 1 ]; then
    ROUNDS=1; DURATION=2; CONNS="16"
fi
for v in "$ROUNDS" "$DURATION" "$GW_THREADS" "$WRK_THREADS" "$PROFILE_SECS" "$H2_STREAMS" $CONNS; do
    case "$v" in ''|*[!0-9]*) die "not a positive integer: '$v'" ;; esac
    [ "$v" -gt 0 ] || die "must be at least 1: $v"
done
[ "${#EXTRA_TRACE_ENV[@]}" = 0 ] || [ "$TRACING" = 1 ] || die "--trace-env needs --tracing"
[ "$SMOKE" = 1 ] || [ "$ROUNDS" -ge 3 ] || die "--rounds must be at least 3 (or use --smoke)"
[ "$DURATION" -le 120 ] || die "--duration is capped at 120 s"
[ "$ROUNDS" -le 50 ] || die "--rounds is capped at 50"
[ "$PROFILE_SECS" -le 120 ] || die "--profile-seconds is capped at 120"
case "$HOLD" in ''|*[!0-9]*) die "--hold takes seconds" ;; esac
[ "$HOLD" -le 3600 ] || die "--hold is capped at 3600 s"

# ---------------------------------------------------------------------------------------------
# Dependencies (Debian packages; we run as root)
# ---------------------------------------------------------------------------------------------
need_pkgs=()
command -v nginx >/dev/null || need_pkgs+=(nginx)
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
command -v wrk >/dev/null || need_pkgs+=(wrk)
[ "$H2" = 0 ] || command -v h2load >/dev/null || need_pkgs+=(nghttp2-client)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
command -v etcdctl >/dev/null || need_pkgs+=(etcd-client)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v pgrep >/dev/null || need_pkgs+=(procps)
[ "$PROFILE" = 0 ] || command -v perf >/dev/null || need_pkgs+=(linux-perf)
[ "$CALLGRIND" = 0 ] || command -v callgrind_control >/dev/null || need_pkgs+=(valgrind)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]}; run as root or install them"
    log "installing from Debian: ${need_pkgs[*]}"
    apt-get update -qq
    # policy-rc.d or no init system keeps the packaged services from starting; we never use them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# Scratch directory, PIDs, cleanup
# ---------------------------------------------------------------------------------------------
T=$(mktemp -d /tmp/goms-bench.XXXXXX)
ulimit -n 65536 2>/dev/null || true   # for 256 connections x 2 sides x proxies; 20000 is plenty too
PIDS=()        # every long-running process we started, in start order
LATE_PIDS=()   # stopped after PIDS (epmd, after its broker)
GW_PID=""
# --callgrind: every proxy starts under callgrind; each writes $T/callgrind-NAME.out.N per dump.
VG() { # VG NAME: the command prefix for a proxy named NAME (nothing without --callgrind)
    [ "$CALLGRIND" = 1 ] || return 0
    printf '%s\n' valgrind --tool=callgrind --dump-instr=no "--callgrind-out-file=$T/callgrind-$1.out"
}

# All descendants of a PID (nginx master -> workers), depth first, the PID itself first.
tree_pids() {
    local p=$1 c
    echo "$p"
    for c in $(pgrep -P "$p" 2>/dev/null || true); do tree_pids "$c"; done
}

stop_pid() { # stop_pid PID SIGNAL: signal the PID, wait up to 5 s, then SIGKILL it and its descendants
    local pid=$1 sig=$2 all i p
    kill -0 "$pid" 2>/dev/null || return 0
    all=$(tree_pids "$pid")
    kill -s "$sig" "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    for p in $all; do
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
    done
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do
        pid=${PIDS[$i]}
        if [ "$pid" = "$GW_PID" ] || [ "$pid" = "${GWT_PID:-}" ] || [ "$pid" = "${BP_PID:-}" ]; then
            stop_pid "$pid" INT   # SIGINT: pingora's fast shutdown (SIGTERM drains)
        else
            stop_pid "$pid" TERM
        fi
    done
    for pid in ${LATE_PIDS[@]+"${LATE_PIDS[@]}"}; do stop_pid "$pid" TERM; done
    if [ "$rc" != 0 ]; then
        echo "compare.sh: failed (exit $rc); logs:" >&2
        for f in "$T"/*.log "$T"/*/*.log; do
            [ -s "$f" ] || continue
            echo "--- $f (last 15 lines)" >&2
            tail -n 15 "$f" >&2
        done
    fi
    if [ "$KEEP" = 1 ]; then
        echo "compare.sh: scratch directory kept: $T" >&2
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Free ports on 127.0.0.1, below the ephemeral range so wrk's and the proxies' outgoing
# connections can never take them.
# ---------------------------------------------------------------------------------------------
read -r EPH_LO _ < /proc/sys/net/ipv4/ip_local_port_range
PORT_LO=10000
PORT_HI=$(( EPH_LO > 12000 ? EPH_LO - 1 : 29999 ))
TAKEN=" "
FREE_PORT=""
free_port() {
    local p i
    for i in $(seq 500); do
        p=$(( PORT_LO + (RANDOM * 32768 + RANDOM) % (PORT_HI - PORT_LO) ))
        case "$TAKEN" in *" $p "*) continue ;; esac
        if [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]; then
            TAKEN="$TAKEN$p "
            FREE_PORT=$p
            return 0
        fi
    done
    die "no free port found"
}

wait_http() { # wait_http URL SECONDS: until the URL answers 200
    local url=$1 secs=$2 i
    for i in $(seq $((secs * 10))); do
        if [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)" = 200 ]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

alive() { kill -0 "$1" 2>/dev/null || die "$2 exited; see its log below"; }

# ---------------------------------------------------------------------------------------------
# The goms binary
# ---------------------------------------------------------------------------------------------
if [ -z "$GOMS_BIN" ]; then
    GOMS_BIN=$REPO/target/release/goms
    if [ ! -x "$GOMS_BIN" ]; then
        log "building the gateway: cargo build --release --locked"
        (cd "$REPO" && cargo build --release --locked)
    fi
fi
[ -x "$GOMS_BIN" ] || die "no gateway binary at $GOMS_BIN"

# ---------------------------------------------------------------------------------------------
# Upstreams: one nginx (one worker) serving a fixed small 200 body on three ports.
# The body is 23 bytes; X-Served-By tells which port answered (round-robin check below).
# ---------------------------------------------------------------------------------------------
free_port; U1=$FREE_PORT; free_port; U2=$FREE_PORT; free_port; U3=$FREE_PORT
mkdir -p "$T/up/tmp"
nginx_common() { # temp paths under a prefix, so nginx never touches /var/lib/nginx
    local d=$1
    cat <<EOF
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type text/plain;
EOF
}
cat > "$T/up/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid $T/up/nginx.pid;
error_log $T/up/error.log warn;
events { worker_connections 8192; }
http {
$(nginx_common "$T/up")
    server {
        listen 127.0.0.1:$U1;
        listen 127.0.0.1:$U2;
        listen 127.0.0.1:$U3;
        location / {
            add_header X-Served-By \$server_port;
            return 200 "goms bench upstream ok\n";
        }
    }
}
EOF
nginx -p "$T/up" -c "$T/up/nginx.conf" > "$T/up/stdout.log" 2>&1 &
UP_PID=$!; PIDS+=("$UP_PID")

# ---------------------------------------------------------------------------------------------
# A local etcd on the host (Debian's), with a scratch data dir; the upstreams registered as
# service `bench` (no lease: they live as long as this etcd).
# ---------------------------------------------------------------------------------------------
free_port; EP=$FREE_PORT; free_port; EPP=$FREE_PORT
etcd --name bench --data-dir "$T/etcd" \
    --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
    --listen-peer-urls "http://127.0.0.1:$EPP" --initial-advertise-peer-urls "http://127.0.0.1:$EPP" \
    --initial-cluster "bench=http://127.0.0.1:$EPP" > "$T/etcd.log" 2>&1 &
ETCD_PID=$!; PIDS+=("$ETCD_PID")
export ETCDCTL_API=3
etcdctl_() { etcdctl --endpoints "http://127.0.0.1:$EP" --dial-timeout 2s "$@"; }
for i in $(seq 100); do
    alive "$ETCD_PID" etcd
    etcdctl_ endpoint health >/dev/null 2>&1 && break
    sleep 0.2
    [ "$i" -lt 100 ] || die "etcd not healthy after 20 s"
done
for p in $U1 $U2 $U3; do
    etcdctl_ put "/goms/services/bench/up-$p" \
        "{\"id\":\"up-$p\",\"service\":\"bench\",\"http\":\"127.0.0.1:$p\",\"version\":\"bench\",\"weight\":1,\"zone\":\"\",\"started_at\":\"\"}" >/dev/null
done
alive "$UP_PID" "upstream nginx"
wait_http "http://127.0.0.1:$U1/small" 10 || die "upstream nginx not answering"

# ---------------------------------------------------------------------------------------------
# Front end 1: the goms gateway. Routes from a file, replicas from the local etcd.
# ---------------------------------------------------------------------------------------------
# Tracing. Gateways that have the trace pipeline (a `trace:` section in goms.yml) publish trace
# events by default, to amqpAddr (default 127.0.0.1:5672, which may be somebody else's broker).
# The `goms` front end therefore runs with tracing off, its amqpAddr pointing at a closed local
# port and its spool in the scratch directory, so it never publishes anywhere.
# Hook for "tracing on vs off": --tracing adds a front end `goms+trace`, a second gateway started
# with GATEWAY_TRACE_ENV / GATEWAY_TRACE_ARGS, measured in the same rounds; compare its rows with
# the `goms` rows. It needs a broker: see start_trace_broker below.
start_trace_broker() { # a local RabbitMQ from Debian on free ports, scratch dirs, its own epmd
    local rp rdp ep i epmd_pid
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        log "installing rabbitmq-server from Debian (for --tracing)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
    fi
    free_port; rp=$FREE_PORT; free_port; rdp=$FREE_PORT; free_port; ep=$FREE_PORT
    mkdir -p "$T/rabbit/log" "$T/rabbit/mnesia"
    : > "$T/rabbit/enabled_plugins.erl"; echo '[].' > "$T/rabbit/enabled_plugins"
    env HOME="$T/rabbit" RABBITMQ_MNESIA_BASE="$T/rabbit/mnesia" RABBITMQ_LOG_BASE="$T/rabbit/log" \
        RABBITMQ_NODENAME="bench$rp@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$rp" RABBITMQ_DIST_PORT="$rdp" RABBITMQ_ENABLED_PLUGINS_FILE="$T/rabbit/enabled_plugins" \
        ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT="$ep" \
        /usr/lib/rabbitmq/bin/rabbitmq-server > "$T/rabbit.log" 2>&1 &
    RABBIT_PID=$!; PIDS+=("$RABBIT_PID")
    for i in $(seq 120); do
        epmd_pid=$(ss -Htlnp "( sport = :$ep )" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
        if [ -n "$epmd_pid" ]; then
            case " ${LATE_PIDS[*]-} " in *" $epmd_pid "*) ;; *) LATE_PIDS+=("$epmd_pid") ;; esac
        fi
        alive "$RABBIT_PID" rabbitmq-server
        [ -n "$(ss -Htln "( sport = :$rp )" 2>/dev/null)" ] && break
        [ "$i" -lt 120 ] || die "RabbitMQ not listening after 60 s"
        sleep 0.5
    done
    log "local RabbitMQ on 127.0.0.1:$rp (epmd port $ep)"
    TRACE_AMQP_URL="amqp://guest:guest@127.0.0.1:$rp"
}

printf 'callServiceKey: probe\ntrace:\n  enabled: false\n' > "$T/trace-probe.yml"
if "$GOMS_BIN" --config "$T/trace-probe.yml" check-config > /dev/null 2>&1; then
    TRACE_AVAILABLE=1
    free_port; DEAD_PORT=$FREE_PORT          # reserved, never listened on
    GATEWAY_ENV=(GOMS__TRACE__ENABLED=false "GOMS__AMQP_ADDR=amqp://guest:guest@127.0.0.1:$DEAD_PORT"
        "GOMS__TRACE__SPOOL_DIR=$T/spool")
else
    TRACE_AVAILABLE=0                        # a gateway built before the trace pipeline
    GATEWAY_ENV=()
fi
GATEWAY_TRACE_ENV=()
GATEWAY_TRACE_ARGS=()
if [ "$TRACING" = 1 ] && [ "$TRACE_AVAILABLE" = 1 ]; then
    start_trace_broker                       # sets TRACE_AMQP_URL
    [ "${#EXTRA_TRACE_ENV[@]}" = 0 ] || log "goms+trace also runs with: ${EXTRA_TRACE_ENV[*]}"
    GATEWAY_TRACE_ENV=(GOMS__TRACE__ENABLED=true "GOMS__AMQP_ADDR=$TRACE_AMQP_URL"
        "GOMS__TRACE__SPOOL_DIR=$T/spool-trace" ${EXTRA_TRACE_ENV[@]+"${EXTRA_TRACE_ENV[@]}"})
fi

# In a folder of its own: the gateway watches the route file's folder, and the logs written
# next to it would wake that watcher during every run.
mkdir -p "$T/routes"
cat > "$T/routes/routes.yml" <<'EOF'
services:
  bench:
    small: "/small"
    post: "/post"
EOF
start_gateway() { # start_gateway NAME PORT [ENV...] -- [ARGS...]; sets STARTED_PID
    local name=$1 port=$2; shift 2
    local envs=() args=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    args=("$@")
    local vg=(); mapfile -t vg < <(VG "$name")
    env GOMS__CALL_SERVICE_KEY=bench ${envs[@]+"${envs[@]}"} ${vg[@]+"${vg[@]}"} \
        "$GOMS_BIN" --config /nonexistent gateway --http-port "$port" \
        --etcd-addr "127.0.0.1:$EP" --routes "$T/routes/routes.yml" --threads "$GW_THREADS" \
        --node-id "bench-$name" ${args[@]+"${args[@]}"} > "$T/$name.log" 2>&1 &
    STARTED_PID=$!
}
free_port; GP=$FREE_PORT
if [ "$TLS" = 1 ]; then
    # One certificate for both TLS front ends: ECDSA P-256, as scripts/up.sh makes it.
    "$REPO/scripts/tls-localhost.sh" "$T/tls"
    free_port; GTLSP=$FREE_PORT
    GATEWAY_ENV+=("GOMS__GATEWAY__TLS__LISTEN=127.0.0.1:$GTLSP"
        "GOMS__GATEWAY__TLS__CERTIFICATES=$T/tls/localhost.crt:$T/tls/localhost.key")
fi
start_gateway gateway "$GP" ${GATEWAY_ENV[@]+"${GATEWAY_ENV[@]}"} --
GW_PID=$STARTED_PID; PIDS+=("$GW_PID")

GWT_PID=""
if [ "$TRACING" = 1 ] && [ "$TRACE_AVAILABLE" = 1 ]; then
    free_port; GTP=$FREE_PORT
    start_gateway gateway-trace "$GTP" ${GATEWAY_TRACE_ENV[@]+"${GATEWAY_TRACE_ENV[@]}"} -- \
        ${GATEWAY_TRACE_ARGS[@]+"${GATEWAY_TRACE_ARGS[@]}"}
    GWT_PID=$STARTED_PID; PIDS+=("$GWT_PID")
fi
# --callgrind --tracing: the same traced gateway with the dashboard off, for what the
# dashboard costs (gateway.dashboard: false).
GWTN_PID=""
if [ "$CALLGRIND" = 1 ] && [ -n "$GWT_PID" ]; then
    free_port; GTNP=$FREE_PORT
    start_gateway gateway-trace-nodash "$GTNP" ${GATEWAY_TRACE_ENV[@]+"${GATEWAY_TRACE_ENV[@]}"} \
        GOMS__GATEWAY__DASHBOARD=false "GOMS__TRACE__SPOOL_DIR=$T/spool-trace-nodash" -- \
        ${GATEWAY_TRACE_ARGS[@]+"${GATEWAY_TRACE_ARGS[@]}"}
    GWTN_PID=$STARTED_PID; PIDS+=("$GWTN_PID")
fi

# ---------------------------------------------------------------------------------------------
# Front end 2: nginx, one worker, upstream block with keep-alive, round robin (its default).
# It adds the same Call-Service-Key and X-Forwarded-For the gateway adds, and rewrites the path.
# ---------------------------------------------------------------------------------------------
free_port; NP=$FREE_PORT
NGINX_TLS=""
if [ "$TLS" = 1 ]; then
    free_port; NTP=$FREE_PORT
    NGINX_H2=""; [ "$H2" = 0 ] || NGINX_H2=" http2"
    NGINX_TLS="listen 127.0.0.1:$NTP ssl$NGINX_H2;
        ssl_certificate $T/tls/localhost.crt;
        ssl_certificate_key $T/tls/localhost.key;
        ssl_protocols TLSv1.2 TLSv1.3;"
fi
mkdir -p "$T/front/tmp"
# Under callgrind, one process: no master to fork the worker off.
MASTER_PROCESS=on; [ "$CALLGRIND" = 0 ] || MASTER_PROCESS=off
cat > "$T/front/nginx.conf" <<EOF
worker_processes 1;
master_process $MASTER_PROCESS;
worker_rlimit_nofile 16384;
daemon off;
pid $T/front/nginx.pid;
error_log $T/front/error.log warn;
events { worker_connections 8192; }
http {
$(nginx_common "$T/front")
    upstream bench {
        server 127.0.0.1:$U1;
        server 127.0.0.1:$U2;
        server 127.0.0.1:$U3;
        keepalive 512;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$NP;
        $NGINX_TLS
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$host;
        proxy_set_header Call-Service-Key bench;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        location = /api/bench/small { proxy_pass http://bench/small; }
        location = /api/bench/post { proxy_pass http://bench/post; }
    }
}
EOF
mapfile -t vg < <(VG nginx)
${vg[@]+"${vg[@]}"} nginx -p "$T/front" -c "$T/front/nginx.conf" > "$T/front/stdout.log" 2>&1 &
NG_PID=$!; PIDS+=("$NG_PID")

# ---------------------------------------------------------------------------------------------
# Front end 3: HAProxy, one thread, round robin, http-reuse always.
# ---------------------------------------------------------------------------------------------
free_port; HP=$FREE_PORT
cat > "$T/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 120s
frontend bench_front
    bind 127.0.0.1:$HP
    default_backend bench
backend bench
    balance roundrobin
    option forwardfor
    http-request replace-path ^/api/bench(/.*) \1
    http-request set-header Call-Service-Key bench
    server u1 127.0.0.1:$U1
    server u2 127.0.0.1:$U2
    server u3 127.0.0.1:$U3
EOF
haproxy -c -q -f "$T/haproxy.cfg" || die "haproxy config invalid"
mapfile -t vg < <(VG haproxy)
${vg[@]+"${vg[@]}"} haproxy -db -f "$T/haproxy.cfg" > "$T/haproxy.log" 2>&1 &
HA_PID=$!; PIDS+=("$HA_PID")

# ---------------------------------------------------------------------------------------------
# Optional front end: bare pingora (--bare-pingora), the same round robin with no goms code.
# ---------------------------------------------------------------------------------------------
BP_PID=""
if [ "$BARE_PINGORA" = 1 ]; then
    log "building the bare pingora proxy: cargo build --release --locked --example bare_pingora"
    (cd "$REPO" && cargo build --release --locked --example bare_pingora)
    free_port; BPP=$FREE_PORT
    mapfile -t vg < <(VG pingora)
    ${vg[@]+"${vg[@]}"} "$REPO/target/release/examples/bare_pingora" "127.0.0.1:$BPP" "$GW_THREADS" \
        "127.0.0.1:$U1" "127.0.0.1:$U2" "127.0.0.1:$U3" > "$T/bare-pingora.log" 2>&1 &
    BP_PID=$!; PIDS+=("$BP_PID")
fi

# ---------------------------------------------------------------------------------------------
# Optional front ends: proxies of their own on pingora's server (--own-app-floor), no goms code.
# ---------------------------------------------------------------------------------------------
declare -A FLOOR_PORT FLOOR_PID
if [ "$OWN_APP_FLOOR" = 1 ]; then
    log "building the own-app floors: cargo build --release --locked --example own_app_floor --example bare_pingora"
    (cd "$REPO" && cargo build --release --locked --example own_app_floor --example bare_pingora)
    for mode in sessions raw; do
        free_port; FLOOR_PORT[$mode]=$FREE_PORT
        mapfile -t vg < <(VG "floor-$mode")
        ${vg[@]+"${vg[@]}"} "$REPO/target/release/examples/own_app_floor" "$mode" \
            "127.0.0.1:${FLOOR_PORT[$mode]}" "$GW_THREADS" \
            "127.0.0.1:$U1" "127.0.0.1:$U2" "127.0.0.1:$U3" > "$T/floor-$mode.log" 2>&1 &
        FLOOR_PID[$mode]=$!; PIDS+=("$!")
    done
    free_port; FLOOR_PORT[handoff]=$FREE_PORT
    mapfile -t vg < <(VG pingora-handoff)
    ${vg[@]+"${vg[@]}"} "$REPO/target/release/examples/bare_pingora" --handoff "127.0.0.1:${FLOOR_PORT[handoff]}" \
        "$GW_THREADS" "127.0.0.1:$U1" "127.0.0.1:$U2" "127.0.0.1:$U3" > "$T/pingora-handoff.log" 2>&1 &
    FLOOR_PID[handoff]=$!; PIDS+=("$!")
fi

# ---------------------------------------------------------------------------------------------
# Readiness and a round-robin check: six GETs through each proxy must reach all three ports.
# ---------------------------------------------------------------------------------------------
FRONTENDS=(goms nginx haproxy direct)
declare -A URL PID_OF
URL[goms]="http://127.0.0.1:$GP";   PID_OF[goms]=$GW_PID
URL[nginx]="http://127.0.0.1:$NP";  PID_OF[nginx]=$NG_PID
URL[haproxy]="http://127.0.0.1:$HP"; PID_OF[haproxy]=$HA_PID
URL[direct]="http://127.0.0.1:$U1"; PID_OF[direct]=""
if [ -n "$GWT_PID" ]; then
    FRONTENDS=(goms goms+trace nginx haproxy direct)
    URL[goms+trace]="http://127.0.0.1:$GTP"; PID_OF[goms+trace]=$GWT_PID
fi
if [ -n "$GWTN_PID" ]; then
    FRONTENDS=(goms goms+trace goms+trace-nodash "${FRONTENDS[@]:2}")
    URL[goms+trace-nodash]="http://127.0.0.1:$GTNP"; PID_OF[goms+trace-nodash]=$GWTN_PID
fi
if [ "$TLS" = 1 ]; then
    FRONTENDS+=(goms+tls nginx+tls)
    URL[goms+tls]="https://127.0.0.1:$GTLSP"; PID_OF[goms+tls]=$GW_PID
    URL[nginx+tls]="https://127.0.0.1:$NTP"; PID_OF[nginx+tls]=$NG_PID
fi
if [ "$H2" = 1 ]; then
    FRONTENDS+=(goms+h2 nginx+h2)
    URL[goms+h2]="https://127.0.0.1:$GTLSP"; PID_OF[goms+h2]=$GW_PID
    URL[nginx+h2]="https://127.0.0.1:$NTP"; PID_OF[nginx+h2]=$NG_PID
fi
if [ -n "$BP_PID" ]; then
    FRONTENDS=("${FRONTENDS[0]}" pingora "${FRONTENDS[@]:1}")
    URL[pingora]="http://127.0.0.1:$BPP"; PID_OF[pingora]=$BP_PID
fi
if [ "$OWN_APP_FLOOR" = 1 ]; then
    FRONTENDS=("${FRONTENDS[0]}" floor-sessions floor-raw pingora-handoff "${FRONTENDS[@]:1}")
    for mode in sessions raw; do
        URL[floor-$mode]="http://127.0.0.1:${FLOOR_PORT[$mode]}"; PID_OF[floor-$mode]=${FLOOR_PID[$mode]}
    done
    URL[pingora-handoff]="http://127.0.0.1:${FLOOR_PORT[handoff]}"; PID_OF[pingora-handoff]=${FLOOR_PID[handoff]}
fi
for fe in "${FRONTENDS[@]}"; do
    [ -z "${PID_OF[$fe]}" ] || alive "${PID_OF[$fe]}" "$fe"
    wait_http "${URL[$fe]}/api/bench/small" 60 || die "$fe not answering 200 on /api/bench/small"
    code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 -X POST --data-binary "@/dev/null" \
        "${URL[$fe]}/api/bench/post")
    [ "$code" = 200 ] || die "$fe answers $code to POST /api/bench/post"
    if [ "$fe" != direct ]; then
        ports=$(for i in 1 2 3 4 5 6; do
            curl -sk -D - -o /dev/null --max-time 2 "${URL[$fe]}/api/bench/small" | tr -d '\r' |
                awk -F': ' 'tolower($1) == "x-served-by" { print $2 }'
        done | sort -u | tr '\n' ' ')
        n=$(echo "$ports" | wc -w)
        [ "$n" = 3 ] || log "warning: $fe reached $n upstream port(s) in 6 requests: $ports"
    fi
done

if [ "$HOLD" -gt 0 ]; then
    for fe in "${FRONTENDS[@]}"; do
        log "$fe: ${URL[$fe]}/api/bench/small (pid ${PID_OF[$fe]:-none}; upstream nginx pid $UP_PID)"
    done
    log "etcd: 127.0.0.1:$EP; scratch: $T; holding ${HOLD} s"
    sleep "$HOLD" &              # in the background: bash runs the INT/TERM trap only between commands
    HOLD_PID=$!; PIDS+=("$HOLD_PID")
    wait "$HOLD_PID" || true
fi

# wrk scripts. done() prints one machine-readable line; --latency prints the human-readable one too.
cat > "$T/report.lua" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d status_errors=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
{
    echo 'wrk.method = "POST"'
    echo "wrk.body = string.rep(\"x\", $POST_BYTES)"
    echo 'wrk.headers["Content-Type"] = "application/octet-stream"'
    cat "$T/report.lua"
} > "$T/post.lua"
{
    echo 'wrk.headers["Connection"] = "close"'
    cat "$T/report.lua"
} > "$T/close.lua"
head -c "$POST_BYTES" /dev/zero | tr '\0' x > "$T/post.body"

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime (clock ticks) of the given PIDs; /proc/PID/stat counts all threads, dead ones too
    local total=0 p s f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -ra f <<< "$s"
        total=$(( total + f[11] + f[12] ))
    done
    echo "$total"
}

# run_h2load FRONTEND SCENARIO CONNS SECONDS THREADS PATH: h2load's output with a `BENCH` line
# as report.lua writes it (mean latency as p50, the largest as p99: h2load has no percentiles).
run_h2load() {
    local fe=$1 scen=$2 c=$3 secs=$4 t=$5 path=$6 out data=()
    [ "$scen" = get ] || data=(-d "$T/post.body" -H "content-type: application/octet-stream")
    out=$(timeout $(( secs + 30 )) h2load -t "$t" -c "$c" -m "$H2_STREAMS" -D "$secs" \
        ${data[@]+"${data[@]}"} "${URL[$fe]}$path" 2>&1) || { echo "$out" >&2; die "h2load failed against $fe"; }
    echo "$out"
    echo "$out" | awk -v secs="$secs" '
        function us(x) { if (x ~ /us$/) return x + 0; if (x ~ /ms$/) return x * 1000; return x * 1e6 }
        /^finished in/ { split($3, d, "s"); duration = d[1] * 1e6 }
        /^requests:/ { done = $8; failed = $10 + $12 + $14 }
        /^status codes:/ { bad = $5 + $7 + $9 }
        /^time for request:/ { p50 = us($6); p99 = us($5) }
        END { if (duration == 0) duration = secs * 1e6
              printf "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d status_errors=%d\n",
                  done, duration, p50, p99, failed, bad }'
}

# run_wrk FRONTEND SCENARIO CONNS SECONDS -> prints "requests rps p50_us p99_us cpu_us_per_req up_cpu_us_per_req errors"
run_wrk() {
    local fe=$1 scen=$2 c=$3 secs=$4 t path script out pids=() up_pids=() a0 a1 u0 u1 line
    t=$(( WRK_THREADS < c ? WRK_THREADS : c ))
    case "$scen" in
        get) path=/api/bench/small; script=$T/report.lua ;;
        handshake) path=/api/bench/small; script=$T/close.lua ;;
        *) path=/api/bench/post; script=$T/post.lua ;;
    esac
    [ -z "${PID_OF[$fe]}" ] || mapfile -t pids < <(tree_pids "${PID_OF[$fe]}")
    mapfile -t up_pids < <(tree_pids "$UP_PID")
    local broker_pids=() b0=0 b1=0
    [ "$fe" != goms+trace ] || mapfile -t broker_pids < <(tree_pids "$RABBIT_PID")
    a0=$(cpu_ticks ${pids[@]+"${pids[@]}"}); u0=$(cpu_ticks "${up_pids[@]}")
    [ ${#broker_pids[@]} = 0 ] || b0=$(cpu_ticks "${broker_pids[@]}")
    if [[ "$fe" == *+h2 ]]; then
        out=$(run_h2load "$fe" "$scen" "$c" "$secs" "$t" "$path")
    else
        out=$(timeout $(( secs + 30 )) wrk -t "$t" -c "$c" -d "${secs}s" --timeout 5s --latency \
            -s "$script" "${URL[$fe]}$path" 2>&1) || { echo "$out" >&2; die "wrk failed against $fe"; }
    fi
    a1=$(cpu_ticks ${pids[@]+"${pids[@]}"}); u1=$(cpu_ticks "${up_pids[@]}")
    [ ${#broker_pids[@]} = 0 ] || b1=$(cpu_ticks "${broker_pids[@]}")
    echo "$out" >> "$T/wrk.log"
    line=$(echo "$out" | grep '^BENCH ') || { echo "$out" >&2; die "no wrk summary for $fe"; }
    # The broker shares the machine: its CPU during goms+trace runs is part of tracing's cost.
    [ ${#broker_pids[@]} = 0 ] || echo "$line" | awk -v b=$((b1 - b0)) '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "requests") print b, kv[2] }
    }' >> "$T/broker-cpu.txt"
    echo "$line" | awk -v a=$((a1 - a0)) -v u=$((u1 - u0)) -v hz="$CLK_TCK" -v proxy="${PID_OF[$fe]}" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        n = v["requests"]; if (n < 1) n = 1
        cpu = (proxy == "") ? "-" : sprintf("%.2f", a * 1e6 / hz / n)
        printf "%d %.1f %d %d %s %.2f %d\n", v["requests"], v["requests"] * 1e6 / v["duration_us"],
            v["p50_us"], v["p99_us"], cpu, u * 1e6 / hz / n, v["errors"] + v["status_errors"]
    }'
}

# ---------------------------------------------------------------------------------------------
# --callgrind: instructions per request, counted by callgrind, instead of the timed rounds.
# Counters are zeroed after a warm-up and dumped after a wrk run; the dump's total covers all of
# the proxy's threads. Valgrind runs a program some 50 times slower, so few connections suffice.
# ---------------------------------------------------------------------------------------------
callgrind_total() { # callgrind_total NAME: the instruction total of NAME's newest dump
    local f
    f=$(ls -t "$T/callgrind-$1.out".* 2>/dev/null | head -n 1)
    [ -n "$f" ] || die "no callgrind dump for $1"
    awk '/^totals:/ { print $2; exit }' "$f"
}
if [ "$CALLGRIND" = 1 ]; then
    declare -A CG_NAME=([goms]=gateway [goms+trace]=gateway-trace [goms+trace-nodash]=gateway-trace-nodash [pingora]=pingora [floor-sessions]=floor-sessions [floor-raw]=floor-raw [pingora-handoff]=pingora-handoff [nginx]=nginx [haproxy]=haproxy)
    declare -A CG_DUMP
    CG_OUT=$T/instructions.tsv
    printf 'scenario\tfrontend\trequests\tinstructions_per_request\n' > "$CG_OUT"
    for scen in get post; do
        for fe in "${FRONTENDS[@]}"; do
            [ "$fe" != direct ] || continue
            run_wrk "$fe" "$scen" 4 1 > /dev/null      # warm-up: pools, caches, lazy statics
            callgrind_control --zero "${PID_OF[$fe]}" > /dev/null 2>&1
            requests=$(run_wrk "$fe" "$scen" 4 "$DURATION" | awk '{ print $1 }')
            callgrind_control --dump "${PID_OF[$fe]}" > /dev/null 2>&1
            total=$(callgrind_total "${CG_NAME[$fe]}")
            CG_DUMP[$scen/$fe]="$(ls -t "$T/callgrind-${CG_NAME[$fe]}.out".* | head -n 1) $requests"
            printf '%s\t%s\t%s\t%s\n' "$scen" "$fe" "$requests" $(( total / requests )) >> "$CG_OUT"
            log "callgrind: $scen via $fe: $requests requests, $(( total / requests )) instructions/request"
        done
    done
    echo
    echo "Instructions per request (valgrind --tool=callgrind, all threads of the proxy, 4 connections, ${DURATION} s)"
    echo
    echo "| scenario | front end | requests | instructions/request | vs nginx |"
    echo "| --- | --- | ---: | ---: | ---: |"
    awk -F'\t' 'NR > 1 { row[NR] = $0; if ($2 == "nginx") base[$1] = $4 }
        END { for (i = 2; i <= NR; i++) { split(row[i], f, "\t")
            printf "| %s | %s | %d | %d | %.2f |\n", (f[1] == "get" ? "GET small" : "POST 1 KiB"), f[2], f[3], f[4], f[4] / base[f[1]] } }' "$CG_OUT"
    # Where the gateway's instructions go, and what tracing and the dashboard cost.
    phase_fe=goms; [ -z "$GWT_PID" ] || phase_fe=goms+trace
    for scen in get post; do
        echo
        # shellcheck disable=SC2086 # "dump requests"
        python3 "$REPO/bench/callgrind-phases.py" ${CG_DUMP[$scen/$phase_fe]} "$phase_fe, ${scen^^}"
    done
    if [ -n "$GWTN_PID" ]; then
        echo
        awk -F'\t' 'NR > 1 { n[$1 "/" $2] = $4 }
            END { for (s = 1; s <= 2; s++) { scen = (s == 1 ? "get" : "post")
                on = n[scen "/goms+trace"]; off = n[scen "/goms"]; nodash = n[scen "/goms+trace-nodash"]
                printf "%s: tracing adds %.1f%% to the instructions of tracing off (the 15%% target is for CPU time: see the timed rounds); traced total %d%s; %d without the dashboard (%+.1f%%; totals differ by 2-3%% from run to run, so the phase table'"'"'s dashboard row is the steadier figure)\n", toupper(scen), 100 * (on - off) / off, on, (scen == "get" ? " (target: at most 94,800, a bare pingora proxy'"'"'s GET)" : ""), nodash, 100 * (nodash - on) / on } }' "$CG_OUT"
    fi
    [ -z "$OUT_DIR" ] || { mkdir -p "$OUT_DIR"; cp "$CG_OUT" "$T"/callgrind-*.out.* "$OUT_DIR/"; }
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Measure: warm-up, then rounds of A B C D for every scenario and connection count.
# ---------------------------------------------------------------------------------------------
MAXC=0; for c in $CONNS; do [ "$c" -gt "$MAXC" ] && MAXC=$c; done
log "warm-up: 1 s per front end at $MAXC connections"
for fe in "${FRONTENDS[@]}"; do run_wrk "$fe" get "$MAXC" 1 >/dev/null; done

RES=$T/results.tsv
printf 'round\tscenario\tconns\tfrontend\trequests\trps\tp50_us\tp99_us\tcpu_us_per_req\tupstream_cpu_us_per_req\terrors\n' > "$RES"
SCENARIOS="get post"
[ "$TLS" = 0 ] || SCENARIOS="get post handshake"
# A handshake run is made for the TLS front ends only.
total_runs=$(( ROUNDS * 2 * $(echo $CONNS | wc -w) * ${#FRONTENDS[@]} + ROUNDS * TLS * 2 * $(echo $CONNS | wc -w) ))
log "measuring: $ROUNDS round(s) x scenarios {$SCENARIOS} x conns {$CONNS} x ${#FRONTENDS[@]} front ends x ${DURATION} s = $total_runs runs"
START=$(date +%s)
for r in $(seq "$ROUNDS"); do
    for scen in $SCENARIOS; do
        for c in $CONNS; do
            for fe in "${FRONTENDS[@]}"; do
                [ "$scen" != handshake ] || [[ "$fe" == *+tls ]] || continue
                [ -z "${PID_OF[$fe]}" ] || alive "${PID_OF[$fe]}" "$fe"
                read -r n rps p50 p99 cpu ucpu err < <(run_wrk "$fe" "$scen" "$c" "$DURATION")
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                    "$r" "$scen" "$c" "$fe" "$n" "$rps" "$p50" "$p99" "$cpu" "$ucpu" "$err" >> "$RES"
                log "round $r $scen c=$c $fe: $rps req/s, p50 ${p50} us, p99 ${p99} us, cpu ${cpu} us/req, errors $err"
            done
        done
    done
done
ELAPSED=$(( $(date +%s) - START ))

# Peak RSS (VmHWM) after all runs.
hwm() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
GW_HWM=$(hwm "$GW_PID")
NG_HWM=0; for p in $(tree_pids "$NG_PID"); do h=$(hwm "$p"); [ "$h" -gt "$NG_HWM" ] && NG_HWM=$h; done
HA_HWM=$(hwm "$HA_PID")

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
GW_VERSION=$("$GOMS_BIN" --version 2>/dev/null || echo "goms ?")
if [ "$GOMS_BIN" = "$REPO/target/release/goms" ]; then
    GW_BUILT="repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")"
else
    GW_BUILT="built $(date -u -r "$GOMS_BIN" +%Y-%m-%dT%H:%MZ)"
fi
TABLE=$T/table.md
{
    echo "goms bench: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    echo "gateway: $GW_VERSION ($GOMS_BIN, $GW_BUILT), --threads $GW_THREADS, discovery: local etcd $(etcd --version 2>/dev/null | awk '/etcd Version/ { print $3 }') on 127.0.0.1:$EP"
    echo "nginx $(nginx -v 2>&1 | sed 's|.*/||') (1 worker), HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread 1), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }') -t $WRK_THREADS; upstreams: one nginx worker on 3 ports"
    echo "$ROUNDS round(s) x ${DURATION} s per run, interleaved $(echo "${FRONTENDS[@]}" | sed 's/ / -> /g'); medians over rounds; measuring took ${ELAPSED} s"
    echo
    echo "| scenario | conns | front end | req/s | p50 ms | p99 ms | vs nginx | vs direct | CPU µs/req | upstream CPU µs/req | errors |"
    echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    : > "$T/trace-summary.txt"
    tail -n +2 "$RES" | awk -F'\t' -v order="${FRONTENDS[*]}" -v conns="$CONNS" -v scenarios="$SCENARIOS" -v tracefile="$T/trace-summary.txt" '
    function median(list,    a, n, i, j, x) {       # list: space-separated numbers; "-" if empty
        n = split(list, a, " ")
        if (n == 0) return "-"
        for (i = 2; i <= n; i++) { x = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
        return (n % 2) ? a[(n + 1) / 2] + 0 : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function add(k, v) { L[k] = (k in L) ? L[k] " " v : v }
    {
        r = $1; s = $2; c = $3; fe = $4
        rps[r, s, c, fe] = $6; rounds[r] = 1
        add("rps" SUBSEP s SUBSEP c SUBSEP fe, $6)
        add("p50" SUBSEP s SUBSEP c SUBSEP fe, $7)
        add("p99" SUBSEP s SUBSEP c SUBSEP fe, $8)
        if ($9 != "-") add("cpu" SUBSEP s SUBSEP c SUBSEP fe, $9)
        add("ucpu" SUBSEP s SUBSEP c SUBSEP fe, $10)
        err[s, c, fe] += $11
    }
    END {
        nf = split(order, F, " "); nc = split(conns, C, " ")
        ns = split(scenarios, S, " "); label["get"] = "GET small"; label["post"] = "POST 1 KiB"
        label["handshake"] = "GET, new TLS conn"
        for (si = 1; si <= ns; si++) for (ci = 1; ci <= nc; ci++) for (fi = 1; fi <= nf; fi++) {
            s = S[si]; c = C[ci]; fe = F[fi]; k = SUBSEP s SUBSEP c SUBSEP fe
            if (!(("rps" k) in L)) continue
            rn = ""; rd = ""
            ref = (fe ~ /\+tls$/) ? "nginx+tls" : (fe ~ /\+h2$/) ? "nginx+h2" : "nginx"
            for (r in rounds) {
                if ((r, s, c, ref) in rps && rps[r, s, c, ref] > 0) rn = rn " " rps[r, s, c, fe] / rps[r, s, c, ref]
                if ((r, s, c, "direct") in rps && rps[r, s, c, "direct"] > 0) rd = rd " " rps[r, s, c, fe] / rps[r, s, c, "direct"]
            }
            cpu = median(L["cpu" k]); vn = median(rn); vd = median(rd)
            printf "| %s | %s | %s | %.0f | %.2f | %.2f | %s | %s | %s | %.1f | %d |\n", label[s], c, fe,
                median(L["rps" k]), median(L["p50" k]) / 1000, median(L["p99" k]) / 1000,
                (vn == "-") ? "-" : sprintf("%.2f", vn), (vd == "-") ? "-" : sprintf("%.2f", vd),
                (cpu == "-") ? "-" : sprintf("%.1f", cpu), median(L["ucpu" k]), err[s, c, fe]
            if (fe == "goms+trace") {
                rt = ""
                for (r in rounds) if ((r, s, c, "goms") in rps && rps[r, s, c, "goms"] > 0) rt = rt " " rps[r, s, c, fe] / rps[r, s, c, "goms"]
                vt = median(rt)
                tr = tr sprintf("%s%s c=%s: %s", (tr == "") ? "" : "; ", label[s], c, (vt == "-") ? "-" : sprintf("%.2f", vt))
            }
        }
        if (tr != "") print "tracing on vs off (req/s of goms+trace / goms, same round, median): " tr > tracefile
    }'
    echo
    echo "peak RSS (VmHWM): goms gateway $((GW_HWM / 1024)) MiB ($GW_HWM kB); nginx worker $((NG_HWM / 1024)) MiB; haproxy $((HA_HWM / 1024)) MiB"
    if [ -n "$GWT_PID" ]; then
        cat "$T/trace-summary.txt"
        awk -v hz="$CLK_TCK" '{ t += $1; n += $2 } END { if (n > 0) printf "RabbitMQ CPU during goms+trace runs: %.1f µs/req (all goms+trace runs together; not in the table'"'"'s CPU column)\n", t * 1e6 / hz / n }' "$T/broker-cpu.txt"
        echo "goms+trace peak RSS $(( $(hwm "$GWT_PID") / 1024 )) MiB; events to a local RabbitMQ ($TRACE_AMQP_URL):" \
            "$(curl -s --max-time 3 "${URL[goms+trace]}/metrics" | awk '/^goms_trace_events_[a-z]+_total / {
                n = $1; sub(/^goms_trace_events_/, "", n); sub(/_total$/, "", n); printf "%s%s %s", sep, n, $2; sep = ", " }')"
    elif [ "$TRACE_AVAILABLE" = 0 ]; then
        echo "tracing on vs off: not available yet (this gateway has no trace pipeline; hook: --tracing)"
    else
        echo "tracing on vs off: not measured (rows above: tracing off); run with --tracing to measure it"
    fi
} > "$TABLE"
cat "$TABLE"
if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    cp "$RES" "$TABLE" "$OUT_DIR/"
    cp "$T/wrk.log" "$OUT_DIR/wrk.log"
    cp "$T"/gateway*.log "$OUT_DIR/" 2>/dev/null || true
    log "results written to $OUT_DIR"
fi

# ---------------------------------------------------------------------------------------------
# Optional profile of the gateway under load (perf, software cpu-clock event: works in VMs
# without hardware counters). Self time per symbol; -g also records kernel and frame-pointer stacks.
# ---------------------------------------------------------------------------------------------
if [ "$PROFILE" = 1 ]; then
    MINC=$MAXC; for c in $CONNS; do [ "$c" -lt "$MINC" ] && MINC=$c; done
    log "profiling the gateway: perf record -g, ${PROFILE_SECS} s of GET at $MINC connections"
    perf record -e cpu-clock -F 999 -g -o "$T/perf.data" -p "$GW_PID" -- sleep "$((PROFILE_SECS + 1))" \
        > "$T/perf-record.log" 2>&1 &
    PERF_PID=$!; PIDS+=("$PERF_PID")
    sleep 0.5
    run_wrk goms get "$MINC" "$PROFILE_SECS" | awk '{ printf "under perf: %s req/s, %s us CPU/req\n", $2, $5 }' > "$T/profile.txt"
    wait "$PERF_PID" || true
    {
        echo "perf: cpu-clock samples of the goms gateway (all threads), self time; kernel = [kernel.kallsyms]"
        echo "by DSO:"
        perf report -i "$T/perf.data" --stdio --no-children --sort dso -g none 2>/dev/null |
            awk '/%/ && !/^#/ { sub(/[ -]+$/, ""); printf "  %s\n", $0 }' | head -6
        echo "hottest symbols:"
        perf report -i "$T/perf.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.5 2>/dev/null |
            awk '/%/ && !/^#/ { sub(/[ -]+$/, ""); printf "  %s\n", substr($0, 1, 200) }' | head -40
    } >> "$T/profile.txt"
    cat "$T/profile.txt"
    if [ -n "$OUT_DIR" ]; then
        cp "$T/profile.txt" "$OUT_DIR/"
        cp "$T/perf.data" "$OUT_DIR/perf.data"
        cp "$GOMS_BIN" "$OUT_DIR/goms" 2>/dev/null || true  # perf report needs the same binary
    fi
fi
