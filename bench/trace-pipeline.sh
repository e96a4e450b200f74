#!/usr/bin/env bash
# Events per second through publisher -> RabbitMQ -> trace consumer(s) -> Elasticsearch
# stand-in. Starts a RabbitMQ container (GOMS_RABBITMQ_IMAGE, default the offline image),
# runs examples/trace_pipeline_bench.rs in release mode, and removes the container.
#   bench/trace-pipeline.sh [EVENTS]      (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
image="${GOMS_RABBITMQ_IMAGE:-goms/rabbitmq:3.10-debian}"
docker image inspect "$image" >/dev/null 2>&1 || eval "$(docker/offline/build-images.sh)"
cargo build --release --locked --example trace_pipeline_bench >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
name="goms-bench-rabbit-$$"
docker run -d --rm --name "$name" -p "127.0.0.1:$port:5672" "$image" >/dev/null
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 120); do
  docker logs "$name" 2>&1 | grep -q "Server startup complete" && break
  sleep 1
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
GOMS_BENCH_AMQP="amqp://guest:guest@127.0.0.1:$port/%2f" target/release/examples/trace_pipeline_bench "${1:-20000}"
