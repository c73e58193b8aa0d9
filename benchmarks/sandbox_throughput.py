"""Sandbox throughput: candidates per second with the worker pool vs one at a time, and the fixed
overhead of one execution (a trivial candidate with one trivial test), measured in the same run.

    python benchmarks/sandbox_throughput.py [--candidates 96] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from envs.code_tasks import humaneval_tasks  # noqa: E402
from envs.sandbox import Job, Sandbox  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=96)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    tasks = humaneval_tasks()
    jobs = [Job(t["prompt"] + t["canonical_solution"], t["tests"], t["entry_point"], context=t["context"])
            for t in (tasks * (1 + args.candidates // len(tasks)))[: args.candidates]]
    # distinct cache keys per run, so that nothing is served from the cache
    tag = iter(range(10**9))

    def fresh(js):
        return [Job(j.code + f"\n# {next(tag)}\n", j.tests, j.entry_point, context=j.context) for j in js]

    with Sandbox(workers=args.workers) as sb:
        mech = sb.describe()
        trivial = [sb.run(Job(f"def f():\n    return {i}\n", ("assert f() is not None",), "f")).wall_s
                   for i in range(20)]
        t = time.perf_counter()
        serial = [sb.run(j) for j in fresh(jobs)]
        serial_s = time.perf_counter() - t
        t = time.perf_counter()
        pooled = sb.run_many(fresh(jobs))
        pool_s = time.perf_counter() - t
    assert all(r.all_passed for r in serial + pooled)
    out = {"isolation": mech["isolation"], "cgroup": mech["cgroup"], "workers": args.workers,
           "candidates": len(jobs), "serial_per_s": len(jobs) / serial_s, "pool_per_s": len(jobs) / pool_s,
           "speedup": serial_s / pool_s, "overhead_ms_median": 1000 * statistics.median(trivial),
           "overhead_ms_p90": 1000 * sorted(trivial)[int(0.9 * len(trivial))]}
    print(f"{mech['isolation']} ({mech['cgroup']}), {len(jobs)} HumanEval canonical solutions:")
    print(f"  one at a time : {out['serial_per_s']:6.1f} candidates/s")
    print(f"  pool of {args.workers:2d}    : {out['pool_per_s']:6.1f} candidates/s  ({out['speedup']:.2f}x)")
    print(f"  fixed overhead of one execution: median {out['overhead_ms_median']:.0f} ms, "
          f"p90 {out['overhead_ms_p90']:.0f} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
