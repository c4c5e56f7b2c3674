"""``python -m benchmarks [--quick] [--only N] [--json PATH]``: run the benchmarks and print one table.

Each benchmark runs in a fresh process of its own (so one's replicas, threads and garbage cannot slow the next);
progress goes to stderr, the table to stdout. See docs/performance.md.

  1  actor map of 2,000 hello-world elements on 25 replicas vs a fresh pyflyte-execute process per element
  2  warm overhead of one no-op task (create -> get SUCCEEDED), its split, and the floor
  3  throughput: 10,000 no-op tasks through one agent with 4 replicas
  4  cold start: submit to an empty fleet -> first lease
  5  @actor_cache: map of 200 elements with a 1 s model load, 4 replicas, with and without the cache
  6  agent memory with 10,000 and 100,000 queued tasks, and GetTask latency meanwhile
  7  actor map of 100,000 tiny elements through the agent server: CreateTask latency, wall time, agent RSS
  8  the map of benchmark 1 on actors, on a Ray ActorPool and on Dask actors, side by side (needs the bench extra)
  9  scale of one agent: 2,000 simulated replicas, dispatch rate, GetTask latency with 10,000 tasks in flight
 10  failover: time to recover when the leading agent pod is killed mid-map (needs the kube-apiserver binary)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import List

from .common import ROOT, Results, Row, log, python_env

BENCHMARKS = {
    "1": ("map_vs_pods", "actor map vs a fresh process per element"),
    "2": ("overhead", "warm overhead of one task"),
    "3": ("throughput", "throughput"),
    "4": ("cold_start", "cold start"),
    "5": ("actor_cache", "@actor_cache"),
    "6": ("memory", "agent memory with queued tasks"),
    "7": ("large_map", "actor map of 100,000 elements through the agent server"),
    "8": ("peers", "actor map vs Ray ActorPool and Dask actors"),
    "9": ("scale", "scale of one agent, simulated replicas"),
    "10": ("failover", "failover time to recover"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one run each: a smoke run")
    parser.add_argument("--only", choices=sorted(BENCHMARKS, key=int), help="run one benchmark")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    parser.add_argument("--child", choices=sorted(BENCHMARKS, key=int), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.result)

    selected = [args.only] if args.only else sorted(BENCHMARKS, key=int)
    rows: List[Row] = []
    data = {}
    durations = {}
    failed = False
    suite_started = time.monotonic()
    for number in selected:
        started = time.monotonic()
        log(f"== benchmark {number}: {BENCHMARKS[number][1]}")
        fd, result_path = tempfile.mkstemp(prefix="flyte-actors-bench-", suffix=".json")
        os.close(fd)
        command = [sys.executable, "-m", "benchmarks", "--child", number, "--result", result_path]
        if args.quick:
            command.append("--quick")
        code = subprocess.run(command, cwd=ROOT, env=python_env()).returncode
        durations[number] = time.monotonic() - started
        try:
            with open(result_path) as f:
                outcome = json.load(f)
        except (OSError, ValueError):
            outcome = {"rows": [], "data": {}}
        finally:
            os.unlink(result_path)
        rows += [Row(**r) for r in outcome["rows"]]
        data.update(outcome["data"])
        if code != 0:
            failed = True
            rows.append(Row(number, "FAILED", f"exit code {code}", "see the output above"))
    total = time.monotonic() - suite_started

    print(_table(rows, args.quick))
    print()
    print("Wall time per benchmark: " + ", ".join(f"{n}: {d:.0f} s" for n, d in durations.items())
          + f"; in all {total / 60:.1f} min.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "quick": args.quick, "rows": [r.__dict__ for r in rows], "data": data,
                       "durations": durations}, f, indent=1)
    return 1 if failed else 0


def _child(number: str, quick: bool, result_path: str) -> int:
    import importlib

    results = Results()
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[number][0]}")
    try:
        module.run(results, quick)
        return 0
    finally:
        with open(result_path, "w") as f:
            json.dump(results.to_json(), f)


def machine() -> dict:
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    try:
        flytekit = metadata.version("flytekit")
    except metadata.PackageNotFoundError:
        flytekit = "?"
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1), "python": platform.python_version(),
            "flytekit": flytekit, "platform": platform.platform()}


def _table(rows: List[Row], quick: bool) -> str:
    m = machine()
    header = (f"flyte-actors benchmarks{' (--quick: smaller sizes, 1 run each)' if quick else ''}: {m['cores']} cores, "
              f"{m['memory_gib']} GiB, Python {m['python']}, flytekit {m['flytekit']}")
    columns = ("#", "measure", "value", "runs / notes")
    cells = [columns] + [(r.bench, r.label, r.value, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [header, ""]
    for i, (bench, label, value, note) in enumerate(cells):
        lines.append(f"{bench:<{widths[0]}}  {label:<{widths[1]}}  {value:>{widths[2]}}  {note}".rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 6 + max(len(c[3]) for c in cells)))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
