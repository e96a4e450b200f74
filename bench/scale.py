#!/usr/bin/env python3
"""bench/scale.py: how the gateway's cost grows with routes, replicas and membership churn.

Prints figures; asserts none. Everything runs on this host, on loopback:

- a local etcd (Debian's `etcd-server`) on a scratch data dir;
- one nginx worker as the upstream, on 0.0.0.0:PORT, so that every 127.0.0.x address reaches
  it: replicas are registered at distinct loopback addresses (127.0.1.2, 127.0.1.3, ...) in
  front of that one upstream, and it answers with the address it was reached at;
- the gateway (`--goms-bin`, default target/release/goms), tracing off, 2 threads;
- wrk for load (2 threads, 16 connections).

It measures:
1. CPU per request and RSS with 10, 1,000 and 10,000 routes;
2. CPU per request and RSS with 3, 100 and 1,000 replicas of one service;
3. the time from a valid route-file edit to the new route serving, with 10,000 routes;
4. the time from a replica's etcd put to its first routed request, while 1,000 replicas of
   another service churn at 10 joins and 10 leaves a second;
5. the gateway's CPU while that churn runs with no traffic, and with neither.

Usage: bench/scale.py [--goms-bin PATH] [--duration S] [--quick]
"""

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(message):
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def free_port():
    """A free port below the ephemeral range, so no outgoing connection takes it meanwhile."""
    while True:
        port = random.randint(20000, 30000)
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
                return port
            except OSError:
                continue


def wait_until(what, check, timeout=30.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(port, path, timeout=2.0):
    """Status and body of a GET on 127.0.0.1:port; (0, error) when the connection fails."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response.status, body.decode(errors="replace")
    except OSError as error:
        return 0, str(error)


class Etcd:
    """A local etcd, spoken to through its JSON gateway (/v3/kv/...), one kept-alive connection."""

    def __init__(self, scratch):
        self.port, peer = free_port(), free_port()
        self.process = subprocess.Popen(
            ["etcd", "--name", "scale", "--data-dir", f"{scratch}/etcd",
             "--listen-client-urls", f"http://127.0.0.1:{self.port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"scale=http://127.0.0.1:{peer}"],
            stdout=open(f"{scratch}/etcd.log", "w"), stderr=subprocess.STDOUT)
        self.lock = threading.Lock()
        self.connection = None
        wait_until("etcd", lambda: self._try("/v3/kv/range", {"key": self._b64("probe")}))

    @staticmethod
    def _b64(text):
        return base64.b64encode(text.encode()).decode()

    def _try(self, path, body):
        try:
            self.call(path, body)
            return True
        except OSError:
            self.connection = None
            return False

    def call(self, path, body):
        with self.lock:
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.connection.request("POST", path, json.dumps(body),
                                    {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise OSError(f"etcd {path}: {response.status} {data[:200]!r}")
            return json.loads(data)

    def put_replica(self, service, node_id, address):
        value = json.dumps({"id": node_id, "service": service, "http": address,
                            "version": "scale", "weight": 1, "zone": "", "started_at": ""})
        self.call("/v3/kv/put", {"key": self._b64(f"/goms/services/{service}/{node_id}"),
                                 "value": self._b64(value)})

    def delete_replica(self, service, node_id):
        self.call("/v3/kv/deleterange",
                  {"key": self._b64(f"/goms/services/{service}/{node_id}")})

    def delete_service(self, service):
        prefix = f"/goms/services/{service}/"
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        self.call("/v3/kv/deleterange",
                  {"key": self._b64(prefix), "range_end": self._b64(end)})


def loopback(index):
    """The index-th replica address: 127.0.1.2, 127.0.1.3, ... 127.0.1.251, 127.0.2.2, ..."""
    return f"127.0.{1 + index // 250}.{2 + index % 250}"


def route_file(path, routes, added=()):
    """`routes` routes r0, r1, ... of service `bench`, then the `added` ones, and `probe/p`."""
    lines = ["services:", "  bench:"]
    lines += [f"    r{i}: /small" for i in range(routes)]
    lines += [f"    {name}: /small" for name in added]
    lines += ["  probe:", "    p: /small"]
    text = "\n".join(lines) + "\n"
    temporary = path + ".new"
    with open(temporary, "w") as out:
        out.write(text)
    os.rename(temporary, path)  # the gateway never reads half a file


def wrk(port, path, duration):
    """Requests made and req/s of one wrk run."""
    output = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{duration}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        log(f"warning: {errors.group(1)} non-2xx answers on {path}")
    return requests, float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


class Stage:
    def __init__(self, args):
        self.scratch = tempfile.mkdtemp(prefix="goms-scale.")
        self.processes = []
        self.etcd = Etcd(self.scratch)
        self.processes.append(self.etcd.process)
        self.upstream_port = free_port()
        self.start_upstream()
        self.routes = f"{self.scratch}/routes/services.yml"
        os.makedirs(os.path.dirname(self.routes))
        route_file(self.routes, 10)
        self.port, self.admin = free_port(), free_port()
        env = dict(os.environ, GOMS__CALL_SERVICE_KEY="bench", GOMS__TRACE__ENABLED="false",
                   GOMS__AMQP_ADDR=f"amqp://guest:guest@127.0.0.1:{free_port()}",
                   GOMS__TRACE__SPOOL_DIR=f"{self.scratch}/spool", RUST_LOG="warn")
        self.gateway = subprocess.Popen(
            [args.goms_bin, "--config", "/nonexistent", "gateway", "--http-port", str(self.port),
             "--etcd-addr", f"127.0.0.1:{self.etcd.port}", "--routes", self.routes,
             "--threads", "2", "--admin-addr", f"127.0.0.1:{self.admin}",
             "--node-id", "scale-gateway"],
            env=env, stdout=open(f"{self.scratch}/gateway.log", "w"), stderr=subprocess.STDOUT)
        self.processes.append(self.gateway)
        wait_until("the gateway", lambda: get(self.admin, "/healthz")[0] == 200)

    def start_upstream(self):
        folder = f"{self.scratch}/up"
        os.makedirs(f"{folder}/tmp")
        with open(f"{folder}/nginx.conf", "w") as conf:
            conf.write(f"""worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {folder}/tmp/body;
    proxy_temp_path {folder}/tmp/proxy;
    fastcgi_temp_path {folder}/tmp/fastcgi;
    uwsgi_temp_path {folder}/tmp/uwsgi;
    scgi_temp_path {folder}/tmp/scgi;
    keepalive_requests 1000000;
    default_type text/plain;
    server {{
        listen 0.0.0.0:{self.upstream_port};
        location / {{ return 200 "$server_addr\\n"; }}
    }}
}}
""")
        upstream = subprocess.Popen(["nginx", "-p", folder, "-c", f"{folder}/nginx.conf"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(upstream)
        wait_until("the upstream", lambda: get(self.upstream_port, "/")[0] == 200)

    def replica_count(self, service):
        status, body = get(self.admin, "/cluster", timeout=10)
        if status != 200:
            return -1
        return len(json.loads(body)["services"].get(service, {}).get("Nodes", []))

    def set_replicas(self, service, count, start=0):
        """Registers exactly `count` replicas of `service` and waits until the gateway has them."""
        self.etcd.delete_service(service)
        for index in range(start, start + count):
            self.etcd.put_replica(service, f"{service}-{index}",
                                  f"{loopback(index)}:{self.upstream_port}")
        wait_until(f"{count} replicas of {service} at the gateway",
                   lambda: self.replica_count(service) == count, timeout=120, every=0.2)

    def load(self, path, duration):
        """CPU µs per request, req/s, RSS and open descriptors (client and upstream connections
        among them) of the gateway under one wrk run on `path`, as a table row's cells."""
        wrk(self.port, path, 1)  # warm-up: connections, pools
        before = cpu_seconds(self.gateway.pid)
        requests, rate = wrk(self.port, path, duration)
        cpu = cpu_seconds(self.gateway.pid) - before
        return (f"{cpu * 1e6 / max(requests, 1):.1f}", f"{rate:,.0f}",
                f"{rss_mib(self.gateway.pid):.1f}", str(open_fds(self.gateway.pid)))

    def stop(self):
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)


class Churn:
    """Replaces replicas of `service` at `per_second` joins and as many leaves a second."""

    def __init__(self, stage, service, population, per_second):
        self.stage, self.service, self.per_second = stage, service, per_second
        self.live = list(range(population))
        self.next = population
        self.stop_flag = threading.Event()
        self.events = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        interval = 1.0 / self.per_second
        due = time.monotonic()
        while not self.stop_flag.is_set():
            leaving = self.live.pop(0)
            self.stage.etcd.delete_replica(self.service, f"{self.service}-{leaving}")
            joining = self.next
            self.next += 1
            self.stage.etcd.put_replica(self.service, f"{self.service}-{joining}",
                                        f"{loopback(joining % 60000)}:{self.stage.upstream_port}")
            self.live.append(joining)
            self.events += 2
            due += interval
            self.stop_flag.wait(max(0.0, due - time.monotonic()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop_flag.set()
        self.thread.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goms-bin", default=f"{REPO}/target/release/goms")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts and 2 s runs: checks that the script works")
    args = parser.parse_args()
    for tool in ("etcd", "nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install etcd-server nginx wrk")
    if not os.path.exists(args.goms_bin):
        raise SystemExit(f"{args.goms_bin} is missing: cargo build --release --locked")
    route_counts = [10, 100, 1000] if args.quick else [10, 1000, 10000]
    replica_counts = [3, 10, 100] if args.quick else [3, 100, 1000]
    churn_population = 100 if args.quick else 1000
    duration = 2 if args.quick else args.duration

    stage = Stage(args)
    rows = []
    try:
        stage.set_replicas("bench", 3)
        for routes in route_counts:
            route_file(stage.routes, routes)
            wait_until(f"{routes} routes", lambda: get(stage.port, f"/api/bench/r{routes - 1}")[0] == 200,
                       timeout=60)
            rows.append((f"{routes:,} routes, 3 replicas",
                         *stage.load(f"/api/bench/r{routes // 2}", duration)))
            log(f"{rows[-1]}")
        route_file(stage.routes, 10)
        wait_until("10 routes", lambda: get(stage.port, "/api/bench/r10")[0] == 404, timeout=60)
        for replicas in replica_counts:
            stage.set_replicas("bench", replicas)
            rows.append((f"10 routes, {replicas:,} replicas", *stage.load("/api/bench/r1", duration)))
            log(f"{rows[-1]}")

        # 3. A route-file edit to serving, with the largest route table.
        routes = route_counts[-1]
        route_file(stage.routes, routes)
        wait_until(f"{routes} routes", lambda: get(stage.port, f"/api/bench/r{routes - 1}")[0] == 200,
                   timeout=60)
        edits = []
        for attempt in range(5):
            started = time.monotonic()
            route_file(stage.routes, routes, [f"added{attempt}"])
            wait_until("the edited route",
                       lambda: get(stage.port, f"/api/bench/added{attempt}")[0] == 200,
                       timeout=60, every=0.005)
            edits.append((time.monotonic() - started) * 1000)
        route_file(stage.routes, 10)

        # 4 and 5. Churn in another service: idle CPU, then put-to-routed for a new replica.
        stage.set_replicas("bench", churn_population)
        window = duration * 2
        before = cpu_seconds(stage.gateway.pid)
        time.sleep(window)
        idle = (cpu_seconds(stage.gateway.pid) - before) / window * 1000
        with Churn(stage, "bench", churn_population, 10) as churn:
            time.sleep(1)
            before, events_before = cpu_seconds(stage.gateway.pid), churn.events
            time.sleep(window)
            churning = (cpu_seconds(stage.gateway.pid) - before) / window * 1000
            events = churn.events - events_before
            propagation = []
            for attempt in range(10):
                stage.etcd.delete_service("probe")
                wait_until("the probe to leave", lambda: get(stage.port, "/api/probe/p")[0] == 503,
                           timeout=30, every=0.01)
                address = f"127.0.250.{2 + attempt}"
                started = time.monotonic()
                stage.etcd.put_replica("probe", f"probe-{attempt}", f"{address}:{stage.upstream_port}")
                wait_until("the probe's first routed request",
                           lambda: get(stage.port, "/api/probe/p") == (200, f"{address}\n"),
                           timeout=30, every=0.002)
                propagation.append((time.monotonic() - started) * 1000)
    finally:
        stage.stop()

    print(f"\ngoms gateway {args.goms_bin}, 2 threads; wrk -t2 -c16, {duration} s per run; "
          f"one nginx worker upstream\n")
    print("| case | CPU µs/request | req/s | RSS MiB | open fds after |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print()
    print(f"- route-file edit to serving, {routes:,} routes: median "
          f"{statistics.median(edits):.0f} ms (of {len(edits)}: "
          f"{', '.join(f'{e:.0f}' for e in edits)} ms)")
    print(f"- etcd put to first routed request, while {churn_population:,} replicas churn at "
          f"{events / window:.0f} events/s: median {statistics.median(propagation):.1f} ms, "
          f"max {max(propagation):.1f} ms (of {len(propagation)})")
    print(f"- gateway CPU with {churn_population:,} replicas and no traffic: {idle:.0f} ms/s "
          f"without churn, {churning:.0f} ms/s with it")


if __name__ == "__main__":
    main()
