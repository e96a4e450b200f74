# Sourced by scripts/stack-check.sh and scripts/swarm-check.sh: polling with a deadline, and the
# steady sequential client whose log the checks read. The caller defines `fail` (and `log`).
#
# Client settings, read when client_loop starts: BASE (http://host:port), CLIENT_PATH (the
# request number is appended), CLIENT_LOG, STOP_FILE (the client stops once it exists),
# CLIENT_PAUSE (seconds between requests), CLIENT_MAX_REQUESTS and CLIENT_MAX_SECONDS.

# Polls "$@" until it succeeds; fails naming $2 after $1 seconds.
wait_for() {
  local timeout=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for: $what"
    sleep 0.5
  done
}

# One line per request: <epoch seconds> <n> <curl exit> <status> <X-Served-By or ->
client_loop() {
  local n=0 begin=$SECONDS t0 headers rc line status served
  exec >>"$CLIENT_LOG" 2>/dev/null
  while [ ! -e "$STOP_FILE" ] && [ "$n" -lt "${CLIENT_MAX_REQUESTS:-30000}" ] \
        && [ $((SECONDS - begin)) -lt "${CLIENT_MAX_SECONDS:-600}" ]; do
    n=$((n + 1))
    status=000 served=-
    t0=$EPOCHREALTIME
    rc=0
    headers="$(curl -sS -o /dev/null -D - --max-time 10 "$BASE$CLIENT_PATH$n" 2>&1)" || rc=$?
    while IFS= read -r line; do
      line=${line%$'\r'}
      case "${line,,}" in
        http/*) status=${line#* }; status=${status%% *} ;;
        x-served-by:*) served=${line#*:}; served=${served# } ;;
      esac
    done <<<"$headers"
    echo "$t0 $n $rc $status $served"
    sleep "${CLIENT_PAUSE:-0.02}"
  done
}
