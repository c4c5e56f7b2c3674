"""Benchmark 6: the agent's memory with 10,000 and 100,000 queued tasks, and ``connector.get`` latency while they
are queued.

Each run is a fresh process (``python -m benchmarks.memory``) holding one agent whose launcher starts nothing, so
replicas never connect and every task stays queued. One task goes through ``connector.create``; the others are the
same ``TaskRequest`` (its ``TaskRun`` payload copied, with its own key and output prefix) submitted straight to
the agent on its loop. RSS is the process's VmRSS (the agent lives in it, as in ``flyte-actor-agent serve``),
measured after ``gc.collect()``, as a delta over the baseline of an idle agent with one queued task.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import uuid
from typing import Dict, List

from flytekitplugins.actor.protocol import lease_pb2

from .common import (
    ROOT, Fleet, NullLauncher, Results, log, median, ms, now, percentile, python_env, rss_bytes, runs_note,
)

BATCH = 5000
GETS = 1000


def run(results: Results, quick: bool) -> None:
    sizes = [1000, 10_000] if quick else [10_000, 100_000]
    runs = 1 if quick else 3
    bench = "6"
    outcomes: List[Dict] = []
    for i in range(runs):
        log(f"[6] queued tasks {sizes}, run {i + 1}/{runs}")
        done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--sizes", ",".join(map(str, sizes))],
                              cwd=ROOT, env=python_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the memory benchmark process failed:\n{done.stderr[-3000:]}")
        outcomes.append(json.loads(done.stdout.strip().splitlines()[-1]))
    note = runs_note(runs) + ", a fresh process each"

    def med(path):
        return median([path(o) for o in outcomes])

    results.add(bench, "agent RSS, baseline (idle agent, 1 queued task)", f"{med(lambda o: o['base']) / 2**20:.0f} MiB",
                note)
    results.add(bench, "connector.get latency, 1 queued task: p50 | p99",
                f"{ms(med(lambda o: o['get0']['p50']))} | {ms(med(lambda o: o['get0']['p99']))}", note)
    for size in sizes:
        key = str(size)
        delta = med(lambda o: o["sizes"][key]["delta"])
        results.add(bench, f"agent RSS with {size:,} queued tasks (delta over baseline)",
                    f"+{delta / 2**20:.0f} MiB ({delta / size / 1024:.1f} KiB per task)", note)
        results.add(bench, f"connector.get latency with {size:,} queued: p50 | p99",
                    f"{ms(med(lambda o: o['sizes'][key]['get']['p50']))} | "
                    f"{ms(med(lambda o: o['sizes'][key]['get']['p99']))}", f"{GETS:,} gets of random queued tasks")
    last = str(sizes[-1])
    results.add(bench, "  agent.submit rate (on the agent loop, no connector)",
                f"{med(lambda o: o['sizes'][last]['submit_rate']):.0f} tasks/s", "")
    results.data["6"] = outcomes


# ----------------------------------------------------------------------------------------------- child process


def child(sizes: List[int]) -> Dict:
    from . import tasks

    fleet = Fleet(launcher_factory=NullLauncher)
    agent = fleet.agent
    try:
        template = fleet.template(tasks.noop4)
        captured = []
        submit = agent.submit
        agent.submit = lambda request: (captured.append(request), submit(request))[1]
        first = asyncio.run(fleet.create(template))
        agent.submit = submit
        request = captured[0]
        out: Dict = {"get0": _get_latency(fleet, [first.key])}
        gc.collect()
        base = rss_bytes()
        out["base"] = base
        out["sizes"] = {}
        keys: List[str] = []
        for size in sizes:
            started = now()
            spent = 0.0
            added = size - len(keys)
            while len(keys) < size:
                batch = []
                for _ in range(min(BATCH, size - len(keys))):
                    key = uuid.uuid4().hex
                    task_run = lease_pb2.TaskRun.FromString(request.payload)
                    task_run.output_prefix = f"{fleet.root}/{key}"
                    batch.append(type(request)(key=key, fleet=request.fleet, payload=task_run.SerializeToString(),
                                               timeout_seconds=request.timeout_seconds, name=request.name))
                    keys.append(key)
                began = now()
                fleet.on_loop(lambda b=batch: [agent.submit(r) for r in b])
                spent += now() - began
            queued = fleet.on_loop(lambda: sum(len(f.queue) for f in agent.scheduler.fleets.values()))
            if queued != size + 1:
                raise RuntimeError(f"expected {size + 1} queued tasks, the scheduler has {queued}")
            del batch
            gc.collect()
            rss = rss_bytes()
            out["sizes"][str(size)] = {
                "rss": rss,
                "delta": rss - base,
                "submit_rate": added / spent if spent else 0.0,
                "get": _get_latency(fleet, keys),
                "seconds": now() - started,
            }
        return out
    finally:
        fleet.stop()


def _get_latency(fleet: Fleet, keys: List[str]) -> Dict[str, float]:
    from flyteidl.core.execution_pb2 import TaskExecution

    from flyte_actor_agent.connector import ActorMetadata

    rng = random.Random(0)
    metas = [ActorMetadata(key=rng.choice(keys)) for _ in range(GETS + 100)]

    async def gets():
        times = []
        for i, meta in enumerate(metas):
            started = now()
            resource = await fleet.connector.get(meta)
            elapsed = now() - started
            if resource.phase not in (TaskExecution.QUEUED, TaskExecution.WAITING_FOR_RESOURCES):
                raise RuntimeError(f"a queued task reads as phase {resource.phase}")
            if i >= 100:  # the first 100 warm up
                times.append(elapsed)
        return times

    times = asyncio.run(gets())
    return {"p50": percentile(times, 50), "p99": percentile(times, 99)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    print(json.dumps(child([int(s) for s in args.sizes.split(",")])))
