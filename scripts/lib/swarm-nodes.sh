# shellcheck shell=bash
# Sourced by scripts/swarm-check.sh (--nodes N, issue 38 stage 3): N Docker Swarm nodes on one
# machine, without Docker-in-Docker (refused here: `--privileged` fails with "unable to apply
# caps"). Node i is:
#
#   - a network namespace gomsN<i> (/var/run/netns/gomsN<i>) whose eth0 is one end of a veth
#     pair; the other end (gomsv<i>) is on the bridge gomsbr0. The host side is 10.77.0.1/24,
#     node i is 10.77.0.(10+i). The host's FORWARD policy is DROP, so one iptables rule
#     (comment "goms-swarm-nodes") accepts what the bridge forwards between nodes;
#   - a dockerd of its own, started with `nsenter --net=/var/run/netns/gomsN<i>` (not
#     `ip netns exec`: that remounts /sys, and dockerd then fails with "Devices cgroup isn't
#     mounted"), with its own --config-file, --data-root, --exec-root, --host and --pidfile,
#     and --storage-driver fuse-overlayfs --bridge none --iptables=false. Its socket is
#     /run/goms-node<i>/docker.sock; `node_docker i ...` runs the docker CLI against it.
#
# Every node reports the host's hostname: tell nodes apart by their Swarm node ID or by a
# label (swarm_nodes_label puts goms_node=<i> on node i).
#
# The caller defines `log` and `fail`, sets NODES_WORK (a folder for the data roots and the
# daemons' logs) and calls swarm_nodes_down from its EXIT trap: it removes everything that
# swarm_nodes_up made, whatever state it is in (containers, daemons and their shims, mounts,
# namespaces, links, the iptables rule), and NODES_WORK/node<i> unless GOMS_CHECK_KEEP=1.

NODES_BRIDGE=gomsbr0
NODES_SUBNET_PREFIX=10.77.0
NODES_RULE_COMMENT=goms-swarm-nodes
NODES_COUNT=0        # nodes made so far (their namespaces may exist even if dockerd failed)
NODES_BRIDGE_MADE=0
NODES_RULE_MADE=0

node_ip() { echo "$NODES_SUBNET_PREFIX.$((10 + $1))"; }
node_netns() { echo "gomsN$1"; }
node_veth() { echo "gomsv$1"; }
node_run() { echo "/run/goms-node$1"; }
node_sock() { echo "unix://$(node_run "$1")/docker.sock"; }
node_docker() { local i=$1; shift; docker -H "$(node_sock "$i")" "$@"; }
node_pid() { cat "$(node_run "$1")/docker.pid" 2>/dev/null || true; }

# The tools stage 3 needs; installs the Debian packages of those that are missing.
swarm_nodes_tools() {
  local missing=()
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
  command -v fuse-overlayfs >/dev/null 2>&1 || missing+=(fuse-overlayfs)
  command -v dockerd >/dev/null 2>&1 || fail "dockerd is needed (the Docker Engine package)"
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null \
      || fail "apt-get install ${missing[*]} failed"
  fi
  [ -e /dev/fuse ] || fail "/dev/fuse is missing (fuse-overlayfs needs it)"
  [ "$(id -u)" = 0 ] || fail "stage 3 makes namespaces, links and daemons: run it as root"
}

# Brings up nodes 1..$1 (bridge, rule, namespaces, veths, daemons) and waits for each daemon.
swarm_nodes_up() {
  local n=$1 i
  if ip link show "$NODES_BRIDGE" >/dev/null 2>&1; then
    fail "the bridge $NODES_BRIDGE exists already: another run is going on, or one was killed (ip link del $NODES_BRIDGE; ip netns del gomsN1 ...)"
  fi
  ip link add "$NODES_BRIDGE" type bridge
  NODES_BRIDGE_MADE=1
  ip addr add "$NODES_SUBNET_PREFIX.1/24" dev "$NODES_BRIDGE"
  ip link set "$NODES_BRIDGE" up
  iptables -I FORWARD 1 -i "$NODES_BRIDGE" -o "$NODES_BRIDGE" -m comment --comment "$NODES_RULE_COMMENT" -j ACCEPT
  NODES_RULE_MADE=1
  for i in $(seq "$n"); do
    NODES_COUNT=$i
    ip netns add "$(node_netns "$i")"
    ip link add "$(node_veth "$i")" type veth peer name "gomsp$i"
    ip link set "gomsp$i" netns "$(node_netns "$i")"
    ip link set "$(node_veth "$i")" master "$NODES_BRIDGE" up
    ip -n "$(node_netns "$i")" link set lo up
    ip -n "$(node_netns "$i")" link set "gomsp$i" name eth0
    ip -n "$(node_netns "$i")" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "$(node_netns "$i")" link set eth0 up
    # No default route: nothing outside the bridge is reachable from a node, and the pull
    # that Swarm tries before it starts a task (no registry is reachable) fails at once with
    # "network is unreachable" instead of waiting ~20 s for a DNS timeout.
    mkdir -p "$NODES_WORK/node$i/data" "$(node_run "$i")/exec"
    # Its own cgroup parent: the host's daemon uses /docker.
    printf '{"cgroup-parent": "/goms-node%s", "log-driver": "json-file", "log-opts": {"max-size": "10m"}}\n' "$i" \
      >"$NODES_WORK/node$i/daemon.json"
    nsenter --net="/var/run/netns/$(node_netns "$i")" \
      dockerd --host "$(node_sock "$i")" \
        --config-file "$NODES_WORK/node$i/daemon.json" \
        --data-root "$NODES_WORK/node$i/data" \
        --exec-root "$(node_run "$i")/exec" \
        --pidfile "$(node_run "$i")/docker.pid" \
        --storage-driver fuse-overlayfs --bridge none --iptables=false \
        >"$NODES_WORK/node$i/dockerd.log" 2>&1 &
  done
  for i in $(seq "$n"); do
    wait_for 60 "node $i's dockerd answering on $(node_sock "$i") (log: $NODES_WORK/node$i/dockerd.log)" node_docker "$i" info
  done
}

# Swarm over the nodes: node 1 inits, the others join as managers (three managers keep a
# quorum when one is lost). A 2 s dispatcher heartbeat makes a lost node "down" within
# seconds (the default is 5 s, and a node is declared down after a few missed beats).
swarm_nodes_swarm() {
  local n=$1 i token
  node_docker 1 swarm init --advertise-addr "$(node_ip 1)" --listen-addr "$(node_ip 1):2377" \
    --dispatcher-heartbeat 2s --default-addr-pool 10.78.0.0/16 >/dev/null
  token=$(node_docker 1 swarm join-token -q manager)
  for i in $(seq 2 "$n"); do
    node_docker "$i" swarm join --token "$token" --advertise-addr "$(node_ip "$i")" \
      --listen-addr "$(node_ip "$i"):2377" "$(node_ip 1):2377" >/dev/null
  done
}

# Puts the label goms_node=<i> on node i (all nodes share one hostname: the node ID tells).
swarm_nodes_label() {
  local n=$1 i id
  for i in $(seq "$n"); do
    id=$(node_docker "$i" info --format '{{.Swarm.NodeID}}')
    node_docker 1 node update --label-add "goms_node=$i" "$id" >/dev/null
  done
}

# Loads the image archive $2 into nodes 1..$1.
swarm_nodes_load() {
  local n=$1 archive=$2 i
  for i in $(seq "$n"); do
    node_docker "$i" load -i "$archive" >/dev/null || fail "docker load into node $i failed"
  done
}

# Cuts node $1 off: its veth goes down; its daemon and containers keep running, unreachable.
swarm_nodes_cut() { ip link set "$(node_veth "$1")" down; }
swarm_nodes_heal() { ip link set "$(node_veth "$1")" up; }

# PIDs of processes whose command line names node $1's exec root (its containerd and shims).
node_procs() {
  local run; run=$(node_run "$1")
  grep -lsE -- "${run%?}[${run: -1}]/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true
}

# Stops node $1's containers and its dockerd (SIGTERM; SIGKILL after 30 s), then kills what is
# left of its containerd and shims and removes its cgroups.
swarm_node_stop() {
  local i=$1 pid ids cg
  pid=$(node_pid "$i")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    ids=$(node_docker "$i" ps -aq 2>/dev/null || true)
    # Leaving the swarm stops its tasks; what is left is removed by ID.
    timeout 30 docker -H "$(node_sock "$i")" swarm leave --force >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    [ -n "$ids" ] && timeout 60 docker -H "$(node_sock "$i")" rm -f $ids >/dev/null 2>&1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # Its containerd and any shim left (killing dockerd leaves containers running).
  for pid in $(node_procs "$i"); do kill -KILL "$pid" 2>/dev/null || true; done
  # Its cgroups (daemon.json's cgroup-parent): a container whose shim was killed may still run
  # there; its processes are killed by PID, then the cgroups go, deepest first.
  for pid in $(cat /sys/fs/cgroup/pids/"goms-node$i"/*/cgroup.procs /sys/fs/cgroup/"goms-node$i"/*/cgroup.procs 2>/dev/null); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for cg in /sys/fs/cgroup/*/"goms-node$i" /sys/fs/cgroup/"goms-node$i"; do
    [ -d "$cg" ] || continue
    for _ in $(seq 20); do find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null && break; sleep 0.25; done
  done
  return 0
}

swarm_nodes_down() {
  local i pid mnt
  # The nodes stop side by side: leaving the swarm and stopping the containers take a while.
  for i in $(seq "$NODES_COUNT"); do swarm_node_stop "$i" & done
  wait
  for i in $(seq "$NODES_COUNT"); do
    for pid in $(node_procs "$i"); do kill -KILL "$pid" 2>/dev/null || true; done
    # Mounts left under its data and exec roots (container rootfs, netns files), deepest first.
    for mnt in $(awk -v a="$NODES_WORK/node$i/" -v b="$(node_run "$i")/" \
                   'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts | sort -r); do
      umount -l "$mnt" 2>/dev/null || true
    done
    ip netns del "$(node_netns "$i")" 2>/dev/null || true
    ip link del "$(node_veth "$i")" 2>/dev/null || true
    rm -rf --one-file-system "$(node_run "$i")"
    if [ "${GOMS_CHECK_KEEP:-0}" != 1 ]; then
      { rm -rf --one-file-system "$NODES_WORK/node$i/data" 2>/dev/null || log "warning: could not remove $NODES_WORK/node$i/data"; } &
    fi
  done
  wait
  if [ "$NODES_RULE_MADE" = 1 ]; then
    iptables -D FORWARD -i "$NODES_BRIDGE" -o "$NODES_BRIDGE" -m comment --comment "$NODES_RULE_COMMENT" -j ACCEPT 2>/dev/null \
      || log "warning: could not remove the iptables FORWARD rule '$NODES_RULE_COMMENT'"
  fi
  if [ "$NODES_BRIDGE_MADE" = 1 ]; then
    ip link del "$NODES_BRIDGE" 2>/dev/null || log "warning: could not delete the bridge $NODES_BRIDGE"
  fi
  NODES_COUNT=0 NODES_RULE_MADE=0 NODES_BRIDGE_MADE=0
}
