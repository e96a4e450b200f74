#!/usr/bin/env bash
# Makes a self-signed certificate for localhost (and 127.0.0.1) in DIR, unless one is there:
# DIR/localhost.crt and DIR/localhost.key, the files the compose stack's gateway serves on 8443.
# scripts/up.sh and scripts/stack-check.sh run it. Replace both files with your own (same
# names) and the gateway serves them within seconds (docs/tls.md).
#   scripts/tls-localhost.sh [DIR]      (default config/tls)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-config/tls}
if [ -s "$dir/localhost.crt" ] && [ -s "$dir/localhost.key" ]; then
  exit 0
fi
command -v openssl >/dev/null 2>&1 || { echo "[tls] openssl is needed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$dir/localhost.key.next" -out "$dir/localhost.crt.next" 2>/dev/null
# The containers run as the user goms: a self-signed key for localhost may be readable.
chmod a+r "$dir/localhost.key.next" "$dir/localhost.crt.next"
mv "$dir/localhost.key.next" "$dir/localhost.key"
mv "$dir/localhost.crt.next" "$dir/localhost.crt"
echo "[tls] made a self-signed certificate for localhost: $dir/localhost.crt (key beside it)" >&2
