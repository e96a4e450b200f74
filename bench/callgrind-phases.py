#!/usr/bin/env python3
"""Where a proxied request's instructions go, by phase of the gateway's request path.

    bench/callgrind-phases.py DUMP REQUESTS [LABEL]

DUMP is a callgrind dump of the gateway covering REQUESTS requests (bench/compare.sh
--callgrind --out DIR keeps them). Each phase is the inclusive cost of the functions that
carry it, read with `callgrind_annotate --inclusive=yes`, minus the phases nested inside it,
divided by REQUESTS. A function inlined into another counts as part of it, so each phase is
anchored on functions a release build keeps apart; what the anchors do not cover shows in the
`rest` and `other` rows, and the rows add up to the dump's total.

Prints a Markdown table: phase, instructions per request, share of the total.
"""

import re
import subprocess
import sys
from collections import defaultdict

# One row of callgrind_annotate's function list: `cost (share)  file:function [object]`. A
# function has several rows: one per file its inlined code came from, and one (the largest,
# under the function's own file) with its whole inclusive cost. The largest is taken.
ROW = re.compile(r"^\s*([\d,]+) \([ \d.]+%\)\s+([^:]*):(.*?)(?: \[(.*)\])?$")


def inclusive_costs(dump: str) -> tuple[int, dict[str, int]]:
    output = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no", dump],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = 0
    costs: dict[str, int] = defaultdict(int)
    for line in output.splitlines():
        if "PROGRAM TOTALS" in line:
            total = int(line.split()[0].replace(",", ""))
            continue
        match = ROW.match(line)
        if not match:
            continue
        cost, _file, function, _object = match.groups()
        if function.endswith("'2") or re.search(r"'\d+$", function):
            continue  # a recursive entry repeats its caller's cost
        costs[function] = max(costs[function], int(cost.replace(",", "")))
    return total, costs


def pick(costs: dict[str, int], *patterns: str) -> int:
    """The summed inclusive cost of the functions matching any of `patterns` (regexes)."""
    found = 0
    for function, cost in costs.items():
        if any(re.search(pattern, function) for pattern in patterns):
            found += cost
    return found


GATEWAY = r"<goms::gateway::proxy::GatewayProxy as pingora_proxy::proxy_trait::ProxyHttp>::"


def phases(total: int, costs: dict[str, int]) -> list[tuple[str, int]]:
    request_task = pick(costs, r"^pingora_core::services::listening::Service<A>::run_endpoint::\{\{closure\}\}::\{\{closure\}\}$")
    process = pick(costs, r"HttpServerApp>::process_new_http::\{\{closure\}\}$")
    parse = pick(costs, r"^pingora_core::protocols::http::server::Session::read_request::\{\{closure\}\}$")
    request_filter = pick(costs, "^" + re.escape(GATEWAY) + r"request_filter(::\{\{closure\}\})?$")
    limits = pick(costs, r"^goms::gateway::limits::(check_header|check_line_endings|declared_body)$")
    route = pick(costs, r"^goms::config::routes::RouteTable::resolve$", r"^goms::gateway::upstreams::Upstreams::get$")
    ids = pick(costs, r"^goms::trace::context::(request_id_or_new|TraceContext::continue_or_start)$")
    upstream_headers = pick(costs, "^" + re.escape(GATEWAY) + r"upstream_request_filter(::\{\{closure\}\})?$")
    pick_peer = pick(costs, "^" + re.escape(GATEWAY) + r"upstream_peer::\{\{closure\}\}$")
    pool = pick(costs, r"^pingora_core::connectors::http::Connector<C>::(get|release)_http_session::\{\{closure\}\}$")
    proxy = pick(costs, r"^pingora_proxy::HttpProxy<SV,C>::proxy_to_upstream::\{\{closure\}\}$")
    if proxy == 0:
        # Inlined into `process_request` since pingora-proxy's change 1 (vendor/README.md): the
        # forwarding is then what `process_request` spends besides the filter and `finish`.
        process_request = pick(costs, r"^pingora_proxy::HttpProxy<SV,C>::process_request::\{\{closure\}\}$")
        finish_inside = pick(costs, r"^pingora_proxy::HttpProxy<SV,C>::finish::\{\{closure\}\}$")
        proxy = max(process_request - request_filter - finish_inside, 0)
    response = pick(
        costs,
        r"^pingora_proxy::proxy_h1::<impl pingora_proxy::HttpProxy<SV,C>>::h1_response_filter::\{\{closure\}\}$",
        r"^pingora_proxy::Session::write_response_tasks::\{\{closure\}\}$",
    )
    finish = pick(costs, r"^pingora_proxy::HttpProxy<SV,C>::finish::\{\{closure\}\}$")
    logging = pick(costs, "^" + re.escape(GATEWAY) + r"logging::\{\{closure\}\}$")
    trace_emit = pick(costs, r"^goms::trace::publisher::sink::TraceSink::emit_with$")
    dashboard = pick(costs, r"^goms::gateway::request_log::RequestLog::record$")
    publisher = pick(costs, r"^goms::trace::publisher::in_flight::InFlight::send::\{\{closure\}\}$")

    rows = [
        ("reading and parsing the request", parse),
        ("limits", limits),
        ("route match (route table, upstream lookup)", route),
        ("request id and `traceparent` (read or made)", ids),
        ("request filter, the rest (record, client address, checks)", max(request_filter - limits - route - ids, 0)),
        ("key, ids, `traceparent`, forwarded headers on the upstream request", upstream_headers),
        ("upstream pick and pool (get and release)", pick_peer + pool),
        ("forwarding (pingora-proxy: write upstream request, read its answer)", proxy - upstream_headers - pick_peer - pool - response),
        ("the response (filters, header and body to the client)", response),
        ("end: trace emit (JSON, queue, journal)", trace_emit),
        ("end: dashboard record", dashboard),
        ("end: metrics, the rest of `logging`", logging - trace_emit - dashboard),
        ("end: pingora's finish (keep-alive, drop)", finish - logging),
        ("pingora: the rest of the request's task (set-up, boxing)", process - parse - request_filter - proxy - finish),
        ("connection task (accept, keep-alive loop)", request_task - process),
        ("trace publisher (batches, LZ4, AMQP), another thread", publisher),
        ("other threads and the runtime (timers, epoll, registry)", total - request_task - publisher),
    ]
    return rows


def main() -> None:
    dump, requests = sys.argv[1], int(sys.argv[2])
    label = sys.argv[3] if len(sys.argv) > 3 else dump
    total, costs = inclusive_costs(dump)
    rows = phases(total, costs)
    print(f"Instructions per request by phase: {label}, {requests} requests")
    print()
    print("| phase | instructions/request | share |")
    print("| --- | ---: | ---: |")
    for name, cost in rows:
        print(f"| {name} | {cost / requests:,.0f} | {100 * cost / total:.1f}% |")
    covered = sum(cost for _, cost in rows)
    print(f"| **total** | **{total / requests:,.0f}** | 100% |")
    dashboard = dict(rows)["end: dashboard record"]
    if dashboard:
        print(f"\nThe dashboard's record is {100 * dashboard / total:.1f}% of this total (target: at most 3%).")
    if abs(covered - total) > total * 0.001:
        print(f"\n(rows add up to {covered / requests:,.0f}: the nesting assumed here does not hold)")


if __name__ == "__main__":
    main()
