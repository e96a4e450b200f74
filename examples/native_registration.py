#!/usr/bin/env python3
"""A goms service without the SDK and without a sidecar: Python standard library only.

It registers itself through etcd's HTTP/JSON gateway (no etcd client library), keeps its
lease alive, checks the shared Call-Service-Key in constant time, and propagates the request
id. docs/services.md ("Native registration") explains each rule.

    python3 examples/native_registration.py --name stock --port 9300 \
        --etcd http://127.0.0.1:2379 --key "$GOMS__CALL_SERVICE_KEY"

Signals: SIGTERM or SIGINT revoke the lease (every gateway drops the node at once) and stop.
SIGUSR1 stops the keep-alives but keeps serving, as a hung process would: the node then leaves
the registry when its lease expires (tests use it).
"""

import argparse
import base64
import hmac
import json
import os
import signal
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def b64(text):
    return base64.b64encode(text.encode()).decode()


class Registration:
    """The node's key under a lease: grant, put, keep alive every TTL/3, re-grant when lost."""

    def __init__(self, etcd, key, value, ttl):
        self.etcd, self.key, self.value, self.ttl = etcd.rstrip("/"), key, value, ttl
        self.lease = None
        self.keepalive = threading.Event()
        self.keepalive.set()
        self.stopped = threading.Event()

    def call(self, path, body):
        request = urllib.request.Request(
            self.etcd + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"{}")

    def register(self):
        granted = self.call("/v3/lease/grant", {"TTL": self.ttl})
        self.lease = granted["ID"]
        self.call("/v3/kv/put", {"key": b64(self.key), "value": b64(self.value),
                                 "lease": self.lease})
        print(f"registered {self.key} (lease {self.lease}, ttl {self.ttl}s)", flush=True)

    def run(self):
        while not self.stopped.is_set():
            try:
                if self.lease is None:
                    self.register()
                elif self.keepalive.is_set():
                    answer = self.call("/v3/lease/keepalive", {"ID": self.lease})
                    # etcd answers TTL 0 (or no TTL) for a lease it no longer has.
                    if int(answer.get("result", {}).get("TTL", 0)) <= 0:
                        print("lease lost; registering again", flush=True)
                        self.lease = None
                        continue
            except OSError as error:
                print(f"etcd: {error}; retrying", flush=True)
                self.lease = None
            self.stopped.wait(self.ttl / 3)

    def revoke(self):
        self.stopped.set()
        if self.lease is not None:
            try:
                self.call("/v3/lease/revoke", {"ID": self.lease})
                print("lease revoked", flush=True)
            except urllib.error.HTTPError as error:
                if error.code == 404:  # etcd no longer has the lease: it expired already
                    print("lease already expired; nothing to revoke", flush=True)
                else:
                    print(f"revoke failed ({error}); the key expires by TTL", flush=True)
            except OSError as error:
                print(f"revoke failed ({error}); the key expires by TTL", flush=True)


def handler(name, node_id, key):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, document):
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Served-By", node_id)
            request_id = self.headers.get("X-Request-Id")
            if request_id:
                self.send_header("X-Request-Id", request_id)
            self.end_headers()
            self.wfile.write(body)

        def route(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            presented = (self.headers.get("Call-Service-Key") or "").encode()
            # Constant time: the answer's timing tells nothing of how much of a guess was right.
            if not key or not hmac.compare_digest(presented, key.encode()):
                return self.answer(401, {
                    "code": 401, "msg": "Call-Service-Key is missing or wrong", "status": False,
                    "requestId": self.headers.get("X-Request-Id") or ""})
            self.answer(200, {"code": 0, "msg": "success", "status": True,
                              "data": {"service": name, "node": node_id, "path": self.path,
                                       "requestId": self.headers.get("X-Request-Id")}})

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = route

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="service name, the {service} of /api/{service}/...")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd's HTTP endpoint")
    parser.add_argument("--key", default=os.environ.get("GOMS__CALL_SERVICE_KEY", ""),
                        help="the shared Call-Service-Key (default: $GOMS__CALL_SERVICE_KEY)")
    parser.add_argument("--advertise-host", default="127.0.0.1")
    parser.add_argument("--ttl", type=int, default=10, help="lease TTL in seconds")
    args = parser.parse_args()
    if not args.key:
        # With no key every call would be refused (401) and nothing would say why.
        parser.error("no Call-Service-Key: pass --key or set GOMS__CALL_SERVICE_KEY "
                     "to the gateways' callServiceKey")

    node_id = f"{args.advertise_host}:{args.port}"
    value = json.dumps({
        "id": node_id, "service": args.name, "http": node_id, "version": "1.0.0",
        "weight": 1, "zone": "", "started_at":
            datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
    })
    registration = Registration(args.etcd, f"/goms/services/{args.name}/{node_id}", value, args.ttl)
    server = ThreadingHTTPServer(("0.0.0.0", args.port), handler(args.name, node_id, args.key))
    server.daemon_threads = True

    def stop(*_):
        registration.revoke()
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda *_: registration.keepalive.clear())
    # Register only once the port listens, so a gateway never routes to a closed socket.
    threading.Thread(target=registration.run, daemon=True).start()
    print(f"{args.name} listening on :{args.port} as {node_id}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
