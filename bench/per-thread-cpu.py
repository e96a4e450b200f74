#!/usr/bin/env python3
"""CPU per request of each thread of one process, around one wrk run.

Reads utime+stime and context switches of every thread in /proc/PID/task before and after
`wrk -t2 -cCONNS -dSECONDSs URL`, sums them by thread name and divides by the requests wrk
made. Prints figures, asserts nothing. Get PIDs and URLs from
`bench/compare.sh --smoke --tracing --hold 900 --keep` (docs/benchmarks.md, eighth round).

usage: bench/per-thread-cpu.py PID URL [SECONDS=8] [CONNS=16]
"""
import collections
import os
import re
import subprocess
import sys

TICKS = os.sysconf("SC_CLK_TCK")


def snapshot(pid):
    """{tid: (name, cpu ticks, voluntary switches, involuntary switches)}"""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
        except OSError:  # the thread ended between listdir and open
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = dict(re.findall(r"^(\w*ctxt_switches):\s+(\d+)", status, re.M))
        threads[tid] = (
            name,
            int(fields[11]) + int(fields[12]),
            int(switches.get("voluntary_ctxt_switches", 0)),
            int(switches.get("nonvoluntary_ctxt_switches", 0)),
        )
    return threads


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    pid, url = sys.argv[1], sys.argv[2]
    seconds = sys.argv[3] if len(sys.argv) > 3 else "8"
    conns = sys.argv[4] if len(sys.argv) > 4 else "16"
    before = snapshot(pid)
    wrk = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", url], capture_output=True, text=True
    ).stdout
    after = snapshot(pid)
    requests = int(re.search(r"(\d+) requests in", wrk).group(1))
    cpu, voluntary, involuntary = (collections.Counter() for _ in range(3))
    for tid, (name, ticks, vol, invol) in after.items():
        _, ticks0, vol0, invol0 = before.get(tid, (name, 0, 0, 0))
        cpu[name] += ticks - ticks0
        voluntary[name] += vol - vol0
        involuntary[name] += invol - invol0
    per_request = lambda ticks: ticks / TICKS / requests * 1e6
    print(
        f"{requests} requests, {requests / float(seconds):.0f} req/s, "
        f"{per_request(sum(cpu.values())):.1f} µs CPU per request in all threads"
    )
    print(f"  {'thread':16} {'µs/req':>8} {'voluntary':>10} {'involuntary':>12}  (switches per 1,000 requests)")
    for name, ticks in cpu.most_common():
        if ticks:
            print(
                f"  {name:16} {per_request(ticks):8.2f} {voluntary[name] * 1000 / requests:10.1f}"
                f" {involuntary[name] * 1000 / requests:12.1f}"
            )


if __name__ == "__main__":
    main()
