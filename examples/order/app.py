#!/usr/bin/env python3
"""The `order` service of the goms stack: a plain HTTP app, Python standard library only,
that knows nothing of goms. `goms sidecar` beside it registers it, checks the shared key
and traces its requests.

    python3 examples/order/app.py --port 3000 [--replica NAME]

Routes:
    POST|GET /order/submit   {"code":0,"data":{"replica","item","requestId"},...}
    GET      /healthz        200 while the app runs (the sidecar's --health check)
    GET      /slow?ms=N      answers after N milliseconds (for drain tests)
    GET      /_seen          what the app has received: request count and every header
                             name it saw (tests check that Call-Service-Key never arrives)
"""

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Seen:
    """Requests and header names the app received, for /_seen."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.header_names = set()

    def record(self, headers):
        with self.lock:
            self.requests += 1
            self.header_names.update(name.lower() for name in headers.keys())

    def document(self):
        with self.lock:
            return {"requests": self.requests, "headerNames": sorted(self.header_names)}


def handler(replica, seen):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar's connection pool expects

        def log_message(self, *args):
            pass

        def answer(self, status, document):
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def body(self):
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def route(self):
            url = urlsplit(self.path)
            if url.path == "/_seen":
                return self.answer(200, seen.document())
            if url.path == "/healthz":
                return self.answer(200, {"status": True})
            seen.record(self.headers)
            payload = self.body()
            if url.path == "/order/submit":
                form = parse_qs(payload.decode(errors="replace")) if payload else {}
                item = (form.get("item") or parse_qs(url.query).get("item") or [None])[0]
                return self.answer(200, {
                    "code": 0,
                    "data": {
                        "replica": replica,
                        "item": item,
                        "requestId": self.headers.get("X-Request-Id"),
                    },
                    "msg": "success",
                    "status": True,
                })
            if url.path == "/slow":
                millis = int((parse_qs(url.query).get("ms") or ["1000"])[0])
                time.sleep(millis / 1000)
                return self.answer(200, {"code": 0, "data": {"replica": replica, "sleptMs": millis},
                                         "msg": "success", "status": True})
            return self.answer(404, {"code": 404, "msg": f"no route {url.path}", "status": False})

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = route

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--replica", default=socket.gethostname())
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), handler(args.replica, Seen()))
    server.daemon_threads = True
    print(f"order app {args.replica} listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
