"""Peak memory of a command and all its child processes together (Linux), for issue 6's budget (< 3 GB).

    python benchmarks/tree_memory.py [--every 0.25] [--out FILE.jsonl] -- python -m miniflamingo demo

Why not `/usr/bin/time -v`: its "maximum resident set size" is the largest of the processes, not their
sum, and the demo runs its LM stage in a second process beside the vision stage. This samples, every
`--every` seconds, the proportional set size (PSS, /proc/PID/smaps_rollup) of the command's process and
of every process below it, and sums it: PSS splits pages that processes share (torch's libraries are
mapped by both) among them, so the sum counts each page once. It prints the peak sum, when it happened
and each process's share then, and the peak RSS of each process for comparison with `time -v`. A
sample is a moment: memory allocated and freed between two samples is missed, so the peak is a lower
bound (at 0.25 s, allocations that live for seconds, such as rendered datasets, are caught).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/PID/task/*/children (every thread's children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended meanwhile
            pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def kib(path: str, field: str) -> int | None:
    """A `Field:   123 kB` line of a /proc file, in KiB; None if the process is gone."""
    try:
        for line in open(path):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return 0


def command_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(" ".join(a.decode(errors="replace").split()) for a in argv[:5] if a)[:80]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("--out", default=None, help="write every sample here (JSON lines)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to measure after --")
    if not Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("tree_memory: needs Linux's /proc/PID/smaps_rollup (kernel 4.14 or later)")
    log = open(args.out, "w") if args.out else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    peak, peak_at, peak_parts, peak_rss = 0, 0.0, {}, {}
    while proc.poll() is None:
        parts = {}
        for pid in tree(proc.pid):
            pss = kib(f"/proc/{pid}/smaps_rollup", "Pss")
            rss = kib(f"/proc/{pid}/status", "VmRSS")
            if pss is None or rss is None:
                continue
            name = command_name(pid)
            parts[f"{pid} {name}"] = pss
            peak_rss[name] = max(peak_rss.get(name, 0), rss)
        total, now = sum(parts.values()), time.perf_counter() - t0
        if log:
            log.write(json.dumps({"t": round(now, 2), "pss_kib": total, "parts": parts}) + "\n")
        if total > peak:
            peak, peak_at, peak_parts = total, now, parts
        time.sleep(args.every)
    rc = proc.returncode
    wall = time.perf_counter() - t0
    if log:
        log.close()
    print(f"\ntree_memory: exit {rc} after {wall:.0f} s; peak PSS of the process tree {peak / 2**20:.2f} GiB "
          f"at {peak_at:.0f} s:", file=sys.stderr)
    for name, pss in sorted(peak_parts.items(), key=lambda kv: -kv[1]):
        print(f"  {pss / 2**20:6.2f} GiB  {name}", file=sys.stderr)
    print("peak RSS of each process (/usr/bin/time -v reports the largest of these):", file=sys.stderr)
    for name, rss in sorted(peak_rss.items(), key=lambda kv: -kv[1]):
        print(f"  {rss / 2**20:6.2f} GiB  {name}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
