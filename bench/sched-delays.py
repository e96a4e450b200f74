#!/usr/bin/env python3
"""Where a proxy's tail latency goes: its threads' scheduling delays, and who held the CPU.

Runs `wrk -t2 -cCONNS -dSECONDSs --latency URL` and, during it, `perf sched record` for
SECONDS-2 seconds. Then, from `perf sched timehist`, it takes every time a thread of PID waited
more than THRESHOLD ms between being woken and running, and looks at that CPU during the wait:
  - idle: the CPU ran nothing, so the wait was the hypervisor's (a halted vCPU woken late);
  - busy: something else ran; the time each other task held the CPU is summed by thread name.
Prints wrk's req/s and p50/p99, the count of such waits per 10,000 requests, and the tasks
that held the CPU, with the longest stretch each ran without a break. Prints figures, asserts
nothing. Get PIDs and URLs from `bench/compare.sh --smoke --tracing --hold 900 --keep`
(docs/benchmarks.md, eleventh round).
Needs perf (Debian: linux-perf) and root.

usage: bench/sched-delays.py PID URL [SECONDS=8] [CONNS=16] [THRESHOLD_MS=1.0]
"""
import bisect
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROW = re.compile(r"\s*([\d.]+)\s+\[(\d+)\]\s+(.*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def timehist(data):
    """[(end s, cpu, task, name, sch delay ms, run ms)] from `perf sched timehist`, in time
    order; `task` is `name[tid/pid]` as perf prints it."""
    text = subprocess.run(
        ["perf", "sched", "timehist", "-i", data], capture_output=True, text=True
    ).stdout
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            task = m[3]
            name = task.split("[", 1)[0]
            rows.append((float(m[1]), int(m[2]), task, name, float(m[5]), float(m[6])))
    return rows


def waits_of(rows, pid, threshold_ms):
    """Each long wait of the process's threads: (cpu, start s, end s, delay ms)."""
    tag = f"/{pid}]"
    for end, cpu, task, _name, delay, run in rows:
        if tag in task and delay > threshold_ms:
            started = end - run / 1000
            yield cpu, started - delay / 1000, started, delay


def who_ran(rows_on_cpu, ends_on_cpu, start, end):
    """{task name: ms on the CPU between start and end}; idle counts as `<idle>`. A CPU's
    rows follow one another without overlapping, so only those from the first that ends
    after `start` to the last that starts before `end` are looked at."""
    held = collections.Counter()
    for i in range(bisect.bisect_right(ends_on_cpu, start), len(rows_on_cpu)):
        t_end, _cpu, _task, name, _delay, run = rows_on_cpu[i]
        t_start = t_end - run / 1000
        if t_start >= end:
            break
        held[name] += (min(t_end, end) - max(t_start, start)) * 1000
    return held


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quietly, when piped into `head`
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    pid, url = sys.argv[1], sys.argv[2]
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    conns = sys.argv[4] if len(sys.argv) > 4 else "16"
    threshold = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    with tempfile.TemporaryDirectory() as scratch:
        data = os.path.join(scratch, "sched.data")
        wrk = subprocess.Popen(
            ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1)  # past wrk's connection set-up
        subprocess.run(
            ["perf", "sched", "record", "-o", data, "--", "sleep", str(max(seconds - 2, 1))],
            capture_output=True,
            check=True,
        )
        report = wrk.communicate()[0]
        rows = timehist(data)
    requests = int(re.search(r"(\d+) requests in", report).group(1))
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", report, re.M))
    rps = re.search(r"Requests/sec:\s+(\S+)", report).group(1)
    by_cpu = collections.defaultdict(list)
    for row in rows:
        by_cpu[row[1]].append(row)
    ends_by_cpu = {cpu: [row[0] for row in on_cpu] for cpu, on_cpu in by_cpu.items()}
    idle_waits, busy_waits, holders = 0, 0, collections.Counter()
    for cpu, start, end, delay in waits_of(rows, pid, threshold):
        held = who_ran(by_cpu[cpu], ends_by_cpu[cpu], start, end)
        if held.pop("<idle>", 0) > delay / 2:
            idle_waits += 1
        else:
            busy_waits += 1
            holders.update(held)
    # perf records for SECONDS-2 of wrk's SECONDS: scale the requests to that window.
    recorded = requests * (seconds - 2) / seconds
    p50, p99 = latency.get("50"), latency.get("99")
    print(f"wrk -c{conns} {seconds}s: {rps} req/s, p50 {p50}, p99 {p99}")
    print(
        f"waits over {threshold} ms of PID {pid}'s threads: {busy_waits} on a busy CPU, "
        f"{idle_waits} on an idle one (hypervisor); "
        f"{(busy_waits + idle_waits) * 10_000 / recorded:.1f} per 10,000 requests"
    )
    longest = collections.Counter()
    for _end, _cpu, _task, name, _delay, run in rows:
        longest[name] = max(longest[name], run)
    print("CPU time held by others during the busy waits, and each one's longest run, ms:")
    for task, ms in holders.most_common(10):
        print(f"  {task:20} {ms:8.1f}   longest run {longest[task]:.2f}")


if __name__ == "__main__":
    main()
