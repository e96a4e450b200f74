#!/usr/bin/env bash
# One-shot Kibana setup for the goms stack (the `kibana-init` compose service).
# 1. Creates (or updates) the data view `trace_logs*` over the daily trace indices
#    trace_logs-YYYY.MM.DD, with `time` (the event time) as its time field.
# 2. Imports saved objects from /goms/docs/kibana/*.ndjson and /goms/kibana/*.ndjson, if any
#    (export them from Kibana: Stack Management -> Saved objects -> Export).
# Idempotent: imports overwrite objects with the same ids. Exits non-zero on a failure.
set -euo pipefail

KIBANA_URL=${KIBANA_URL:-http://kibana:5601}
log() { echo "[kibana-init] $*" >&2; }

for _ in $(seq 1 60); do
  curl -fsS "$KIBANA_URL/api/status" >/dev/null 2>&1 && break
  sleep 2
done

log "data view trace_logs* (id goms-trace-logs)"
curl -fsS -X POST "$KIBANA_URL/api/data_views/data_view" \
  -H 'kbn-xsrf: goms' -H 'Content-Type: application/json' \
  -d '{"override": true,
       "data_view": {"id": "goms-trace-logs", "name": "goms trace_logs",
                     "title": "trace_logs*", "timeFieldName": "time"}}' >/dev/null

curl -fsS -X POST "$KIBANA_URL/api/kibana/settings" \
  -H 'kbn-xsrf: goms' -H 'Content-Type: application/json' \
  -d '{"changes": {"defaultIndex": "goms-trace-logs"}}' >/dev/null \
  || log "note: could not make trace_logs* the default data view"

shopt -s nullglob
for file in /goms/docs/kibana/*.ndjson /goms/kibana/*.ndjson; do
  log "import $file"
  answer="$(curl -fsS -X POST "$KIBANA_URL/api/saved_objects/_import?overwrite=true" \
    -H 'kbn-xsrf: goms' --form "file=@$file")"
  case "$answer" in
    *'"success":true'*) ;;
    *) log "import of $file failed: $answer"; exit 1 ;;
  esac
done
log "done: Kibana -> Discover -> data view \"goms trace_logs\""
