#!/bin/bash
# Container healthcheck for the goms image, without curl (bash's /dev/tcp).
#
#   goms-healthcheck http PORT [PATH] [STATUS-GLOB]   GET http://127.0.0.1:PORT/PATH; healthy when
#                                                     the status matches STATUS-GLOB (default 2??)
#   goms-healthcheck tcp PORT                         healthy when PORT accepts a connection
#
# The gateway:  goms-healthcheck http 8080 /healthz
# A service:    goms-healthcheck http 9080 / '???'   (any HTTP answer: without the
#               Call-Service-Key a service answers 401, which proves it serves HTTP)
set -euo pipefail

mode=${1:-http}
port=${2:?usage: goms-healthcheck http|tcp PORT [PATH] [STATUS-GLOB]}
path=${3:-/healthz}
expect=${4:-2??}

exec 3<>"/dev/tcp/127.0.0.1/$port"
[ "$mode" = tcp ] && exit 0

printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nUser-Agent: goms-healthcheck\r\nConnection: close\r\n\r\n' \
  "$path" "$port" >&3
IFS=' ' read -r -t 5 _version status _rest <&3 || { echo "no answer on :$port$path" >&2; exit 1; }
# shellcheck disable=SC2053  # the glob is meant to match
if [[ $status == $expect ]]; then
  exit 0
fi
echo "GET :$port$path answered $status (want $expect)" >&2
exit 1
