#!/usr/bin/env python3
"""Calls goms.echo.v1.Echo/Unary through a gateway with grpcio (gRPC's C core), a client
that is not goms's own: stack-check's proof that the appliance routes gRPC.

    grpc-echo-call.py HOST:PORT MESSAGE [--ca CERT]   # --ca: over TLS (ALPN h2), else h2c

Prints `message served_by` and exits 0, or prints the gRPC status and exits 1. The messages
are encoded by hand (proto/goms/echo/v1/echo.proto has three scalar fields of interest), so
no generated code or protobuf package is needed. `pip install grpcio` provides `grpc`.
"""
import argparse
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data, i):
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def echo_request(message):
    text = message.encode()
    return b"\x0a" + varint(len(text)) + text  # field 1, `message`


def strings_of(reply):
    """The length-delimited fields of an EchoReply, by field number (repeated ones listed)."""
    fields, i = {}, 0
    while i < len(reply):
        key, i = read_varint(reply, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, i = read_varint(reply, i)
        elif wire_type == 2:
            length, i = read_varint(reply, i)
            fields.setdefault(number, []).append(reply[i : i + length].decode())
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return fields


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the gateway, HOST:PORT")
    parser.add_argument("message")
    parser.add_argument("--ca", help="the gateway certificate's CA: call over TLS")
    parser.add_argument("--server-name", default="localhost", help="SNI and the name checked, with --ca")
    args = parser.parse_args()
    if args.ca:
        with open(args.ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
        options = [("grpc.ssl_target_name_override", args.server_name)]
        channel = grpc.secure_channel(args.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.target)
    call = channel.unary_unary("/goms.echo.v1.Echo/Unary")
    try:
        reply = call(echo_request(args.message), timeout=10)
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}")
        return 1
    fields = strings_of(reply)
    print(fields.get(1, [""])[0], fields.get(2, [""])[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
