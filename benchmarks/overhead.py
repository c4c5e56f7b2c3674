"""Benchmark 2: warm overhead of one task, from ``connector.create`` to ``connector.get`` answering SUCCEEDED with
outputs, for a no-op task on a warm replica, one task after another; where that time goes; and the floor: a bare
in-process ``_execute_task`` of the same task plus one loopback gRPC round trip.

The split uses the scheduler's timestamps (``TaskState.submitted_at``, ``started_at``, ``finished_at``), the
driver's own clock around create and get, and a probe in the replica's executors (``benchmarks._probe``) that
records when the executor started and finished the task. All are ``time.monotonic``: CLOCK_MONOTONIC, shared by
every process of the machine.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

from . import _echo, tasks
from .common import (
    ROOT, Fleet, Results, check, cpu_delta, cpu_seconds, log, median, ms, now, percentile, python_env, runs_note,
    PROBED_REPLICA_COMMAND,
)

PARTS = ("create", "queue", "dispatch", "execution", "report", "get")


def run(results: Results, quick: bool) -> None:
    n = 100 if quick else 1000
    runs = 1 if quick else 3
    bench = "2"
    probe_dir = tempfile.mkdtemp(prefix="flyte-actors-probe-")
    os.environ["BENCH_PROBE_DIR"] = probe_dir
    # Replicas run benchmarks._probe_replica (the product worker plus a probe in its executors).
    fleet = Fleet(worker_command=PROBED_REPLICA_COMMAND)
    per_run: List[Dict[str, List[float]]] = []
    try:
        template = fleet.template(tasks.noop)
        log("[2] warming up one replica")
        asyncio.run(_sequential(fleet, template, 30))
        for i in range(runs):
            log(f"[2] {n} no-op tasks one after another, run {i + 1}/{runs}")
            before = cpu_seconds(fleet.agent._thread.native_id)
            records = asyncio.run(_sequential(fleet, template, n))
            cpu = cpu_delta(before, cpu_seconds(fleet.agent._thread.native_id))
            per_run.append(_split(fleet, records, _read_probe(probe_dir)))
        metric_mean = _metric_mean_run_seconds(fleet)
    finally:
        fleet.stop()
        shutil.rmtree(probe_dir, ignore_errors=True)

    floors, reimports, rtts = [], [], []
    for i in range(runs):
        log(f"[2] floor: {n} bare _execute_task calls, run {i + 1}/{runs}")
        floor = _floor(n)
        floors.append(floor["execute"])
        reimports.append(floor["reimport"])
        log(f"[2] floor: {n} loopback gRPC round trips, run {i + 1}/{runs}")
        rtts.append(_grpc_round_trips(n))

    def stat(samples: List[List[float]], fn) -> float:
        return median([fn(s) for s in samples])

    def p50(s):
        return percentile(s, 50)

    def p99(s):
        return percentile(s, 99)

    def mean(s):
        return sum(s) / len(s)

    totals = [r["total"] for r in per_run]
    note = runs_note(runs, f"{n:,} tasks")
    results.add(bench, "warm no-op task, connector.create -> connector.get SUCCEEDED: p50 | p99",
                f"{ms(stat(totals, p50))} | {ms(stat(totals, p99))}", note)

    def part(label: str, *names: str) -> None:
        samples = [[sum(x) for x in zip(*(r[name] for name in names))] for r in per_run]
        results.add(bench, label, f"{ms(stat(samples, p50))} (mean {ms(stat(samples, mean))})", "p50 (mean)")

    part("  queue: create -> lease (connector.create + hop onto the agent loop + scheduler)", "create", "queue")
    part("    of which connector.create until the scheduler has the task", "create")
    part("  dispatch: lease -> executor starts (stream write, replica, pipe to executor)", "dispatch")
    part("  flytekit execution in the executor (TaskStatus.run_seconds)", "execution")
    part("  result: executor done -> get answers (pipe, replica, stream, scheduler, wake-up, get)", "report", "get")
    part("    of which executor done -> scheduler has the result", "report")

    execute_p50 = stat(floors, p50)
    rtt_p50 = stat(rtts, p50)
    floor = execute_p50 + rtt_p50
    total_p50 = stat(totals, p50)
    results.add(bench, "floor: bare _execute_task of the same no-op task, in process",
                f"{ms(execute_p50)} (p99 {ms(stat(floors, p99))})", f"p50; {note}")
    results.add(bench, "floor: loopback unary gRPC echo round trip (grpc.aio both ends)",
                f"{ms(rtt_p50)} (p99 {ms(stat(rtts, p99))})", f"p50; {note}")
    results.add(bench, "overhead above the floor (p50): actor task - (_execute_task + 1 gRPC round trip)",
                f"{ms(total_p50 - floor)} ({total_p50 / floor:.1f}x the floor of {ms(floor)})", "")
    results.add(bench, "  re-import of the task's module per task (replica sandbox), benchmarks/tasks.py",
                ms(stat(reimports, p50)), "p50, inside flytekit execution above")
    used = sum(cpu.values())
    results.add(bench, "  CPU per task, all processes (last run)", ms(used / n), "")
    for role, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if seconds / used >= 0.01:
            results.add(bench, f"    {role}", ms(seconds / n), f"{seconds / used:.0%} of the CPU")
    results.data["2"] = {
        "n": n, "runs": runs,
        "per_run": [{k: {"p50": p50(v), "p99": p99(v), "mean": mean(v)} for k, v in r.items()} for r in per_run],
        "floor_execute_p50": [p50(f) for f in floors], "grpc_rtt_p50": [p50(r) for r in rtts],
        "reimport_p50": [p50(r) for r in reimports], "metric_mean_run_seconds": metric_mean, "cpu": cpu,
    }


async def _sequential(fleet: Fleet, template, n: int) -> List[Tuple[str, str, float, float]]:
    """Run ``n`` no-op tasks one after another: (key, output prefix, create called, get answered)."""
    records = []
    for _ in range(n):
        prefix = fleet.prefix()
        started = now()
        meta = await fleet.create(template, None, prefix)
        await fleet.finished(meta.key)
        resource = await fleet.connector.get(meta)
        ended = now()
        check(resource, "the no-op task")
        records.append((meta.key, prefix, started, ended))
    return records


def _read_probe(directory: str) -> Dict[str, Tuple[float, float]]:
    seen = {}
    for path in glob.glob(os.path.join(directory, "*.tsv")):
        with open(path) as f:
            for line in f:
                prefix, started, ended = line.rstrip("\n").split("\t")
                seen[prefix] = (float(started), float(ended))
    return seen


def _split(fleet: Fleet, records, probe) -> Dict[str, List[float]]:
    times = fleet.task_times([r[0] for r in records])
    parts: Dict[str, List[float]] = {name: [] for name in ("total",) + PARTS}
    for (key, prefix, started, ended), (submitted, leased, finished) in zip(records, times):
        exec_start, exec_end = probe[prefix]
        parts["total"].append(ended - started)
        parts["create"].append(submitted - started)
        parts["queue"].append(leased - submitted)
        parts["dispatch"].append(exec_start - leased)
        parts["execution"].append(exec_end - exec_start)
        parts["report"].append(finished - exec_end)
        parts["get"].append(ended - finished)
    return parts


def _metric_mean_run_seconds(fleet: Fleet) -> float:
    registry = fleet.agent.metrics.registry
    total = registry.get_sample_value("flyte_actor_task_run_seconds_sum") or 0.0
    count = registry.get_sample_value("flyte_actor_task_run_seconds_count") or 1.0
    return total / count


def _floor(n: int) -> Dict[str, List[float]]:
    tmp = tempfile.mkdtemp(prefix="flyte-actors-floor-tmp-")  # flytekit makes a temp dir per execution
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks._floor", "--n", str(n)], cwd=ROOT,
                              env=dict(python_env(), TMPDIR=tmp), capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"the floor process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _grpc_round_trips(n: int) -> List[float]:
    server = subprocess.Popen([sys.executable, "-m", "benchmarks._echo"], cwd=ROOT, env=python_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        return asyncio.run(_echo.round_trips(port, n))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
