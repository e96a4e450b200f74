#!/usr/bin/env python3
"""Prints the trace events waiting in a RabbitMQ queue, one JSON document per line.

    scripts/trace-queue-events.py http://127.0.0.1:15672 [goms.trace] > events.ndjson

For checks where no Elasticsearch exists (scripts/stack-check.sh): it reads every ready
message through the management API and puts each back (`ack_requeue_true`), so the queue is
left as it was. Stop the consumers first: messages they hold unacknowledged are not ready.
Bodies are NDJSON, or LZ4 blocks with a 4-byte little-endian size in front when the
message's `content_encoding` is `lz4` (src/trace/framing.rs). Standard library only.
"""

import base64
import json
import sys
import urllib.parse
import urllib.request


def lz4_block_decode(data: bytes, size: int) -> bytes:
    """Decodes one LZ4 block (no frame) of `size` decoded bytes."""
    out = bytearray()
    i = 0

    def length(nibble: int) -> int:
        """A length from a token's nibble, with its extra bytes when the nibble is 15."""
        nonlocal i
        if nibble == 15:
            while True:
                extra = data[i]
                i += 1
                nibble += extra
                if extra != 255:
                    break
        return nibble

    while i < len(data):
        token = data[i]
        i += 1
        literals = length(token >> 4)
        out += data[i:i + literals]
        i += literals
        if i >= len(data):
            break
        offset = data[i] | (data[i + 1] << 8)
        i += 2
        match = length(token & 15) + 4
        start = len(out) - offset
        for k in range(match):
            out.append(out[start + k])
    if len(out) != size:
        raise ValueError(f"LZ4 block decoded to {len(out)} bytes, its header says {size}")
    return bytes(out)


def messages(api: str, queue: str):
    request = urllib.request.Request(
        f"{api}/api/queues/%2F/{urllib.parse.quote(queue, safe='')}/get",
        data=json.dumps(
            {"count": 1_000_000, "ackmode": "ack_requeue_true", "encoding": "base64"}
        ).encode(),
        headers={"content-type": "application/json"},
    )
    credentials = base64.b64encode(b"guest:guest").decode()
    request.add_header("authorization", f"Basic {credentials}")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def main() -> None:
    api = sys.argv[1].rstrip("/")
    queue = sys.argv[2] if len(sys.argv) > 2 else "goms.trace"
    for message in messages(api, queue):
        body = base64.b64decode(message["payload"])
        encoding = message.get("properties", {}).get("content_encoding")
        if encoding == "lz4":
            body = lz4_block_decode(body[4:], int.from_bytes(body[:4], "little"))
        elif encoding:
            raise SystemExit(f"unknown content_encoding {encoding!r}")
        for line in body.splitlines():
            if line.strip():
                sys.stdout.write(line.decode() + "\n")


if __name__ == "__main__":
    main()
