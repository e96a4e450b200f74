#!/bin/sh
# The `order` container of the stack: a Python app that knows nothing of goms
# (examples/order/app.py), and `goms sidecar` in front of it, which registers it in etcd
# while it is healthy, checks the Call-Service-Key and traces its requests. The sidecar's
# settings come from GOMS__SERVICE__* and GOMS__SIDECAR__* (compose/docker-compose.yml).
set -eu
python3 /app/examples/order/app.py --port 3000 --replica "$(hostname)" &
exec /usr/local/bin/goms-entrypoint sidecar
