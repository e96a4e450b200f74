#!/usr/bin/env bash
# Runs a doc's shell blocks marked `<!-- docs-check -->`, in order, in one bash, from the
# repository's top folder, exactly as a new user following the doc would type them; fails when
# any command fails. CI runs it on docs/services.md so that its three ways in cannot drift.
#
#   scripts/docs-check.sh [--debug] [DOC]     (default DOC: docs/services.md)
#
#   --debug   use the debug build (`cargo build` and target/debug) where the doc says
#             --release and target/release: CI's tests have built it already.
#
# The blocks start servers on the doc's fixed ports (etcd 2379, gateway 8080 and 9901, ...);
# the script refuses to start while one of them is taken, and stops every process the blocks
# left behind, even on failure. Logs the blocks write (*.log) are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

debug=0
doc=docs/services.md
for arg in "$@"; do
  case "$arg" in
    --debug) debug=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) doc=$arg ;;
  esac
done
log() { echo "[docs-check] $*" >&2; }

command -v etcd >/dev/null 2>&1 || { log "etcd is not installed (Debian: etcd-server; scripts/install-deps.sh installs it)"; exit 1; }
for port in 2379 2380 8080 9901 9300 3000 9190 4191 9400; do
  if ss -Htln "( sport = :$port )" 2>/dev/null | grep -q .; then
    log "port $port is taken; the doc's commands need it (stop what listens there)"
    exit 1
  fi
done

script=$(mktemp)
logs_before=$(mktemp)
ls ./*.log 2>/dev/null > "$logs_before" || true
# The marked blocks, in order: a fenced block right after a `<!-- docs-check -->` line.
awk '
  /^<!-- docs-check -->$/ { armed = 1; next }
  armed && /^```/ && !inside { inside = 1; next }
  inside && /^```$/ { inside = 0; armed = 0; print ""; next }
  inside { print }
' "$doc" > "$script.body"
[ -s "$script.body" ] || { log "no block marked <!-- docs-check --> in $doc"; exit 1; }
{
  echo 'set -euo pipefail'
  if [ "$debug" = 1 ]; then
    sed -e 's/cargo build --release/cargo build/g' -e 's#target/release#target/debug#g' "$script.body"
  else
    cat "$script.body"
  fi
} > "$script"
log "running $(grep -c . "$script.body") lines of $doc$([ "$debug" = 1 ] && echo ' (debug build)')"

cleanup() {
  # Whatever the blocks left running (the last block stops them; a failure may not reach it).
  [ -n "${group:-}" ] && kill -- "-$group" 2>/dev/null || true
  rm -f "$script" "$script.body"
  comm -13 "$logs_before" <(ls ./*.log 2>/dev/null) | xargs -r rm -f
  rm -f "$logs_before"
}
trap cleanup EXIT

status=0
setsid bash "$script" &
group=$!
wait "$group" || status=$?
if [ "$status" != 0 ]; then
  log "FAILED (exit $status); the logs the blocks wrote:"
  for file in $(comm -13 "$logs_before" <(ls ./*.log 2>/dev/null)); do
    echo "--- $file" >&2; tail -n 20 "$file" >&2
  done
  exit "$status"
fi
# The last block sent SIGTERM to every node: each must leave by itself, in time.
for _ in $(seq 1 300); do
  pgrep -g "$group" >/dev/null 2>&1 || break
  sleep 0.1
done
if pgrep -g "$group" >/dev/null 2>&1; then
  log "FAILED: still running 30 s after the doc's last block stopped them: $(pgrep -g "$group" -a | tr '\n' ';')"
  exit 1
fi
log "passed: every marked block of $doc ran as written"
