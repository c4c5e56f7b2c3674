"""Benchmark 4: cold start: from submitting a task to an empty fleet to a replica taking it (its first lease), and
where that time goes: the replica process starting and connecting, and its first task."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Dict, List

from . import tasks
from .common import ROOT, Fleet, Results, check, log, median, ms, now, python_env, secs


def run(results: Results, quick: bool) -> None:
    samples = 2 if quick else 5
    bench = "4"
    parts: Dict[str, List[float]] = {k: [] for k in ("lease", "launch", "connect", "assign", "first_task", "total")}
    for i in range(samples):
        log(f"[4] cold start {i + 1}/{samples}")
        fleet = Fleet()
        scheduler = fleet.agent.scheduler
        try:
            template = fleet.template(tasks.noop)

            async def one():
                started = now()
                meta = await fleet.create(template)
                await fleet.finished(meta.key)
                check(await fleet.connector.get(meta), "the first task")
                return meta.key, started, now()

            key, started, ended = asyncio.run(one())

            def read():
                task = scheduler.tasks[key]
                replica = next(iter(scheduler.replicas.values()))
                return task.submitted_at, task.started_at, task.finished_at, replica.connected_at, replica.launched_at

            submitted, leased, finished, connected, launched = fleet.on_loop(read)
        finally:
            fleet.stop()
        parts["lease"].append(leased - submitted)
        parts["launch"].append(launched - submitted)
        parts["connect"].append(connected - launched)
        parts["assign"].append(leased - connected)
        parts["first_task"].append(finished - leased)
        parts["total"].append(ended - started)

    log("[4] import times of the replica's processes")
    bare = _python_seconds("pass")
    replica_import = _python_seconds("import flytekitplugins.actor.worker.replica")
    executor_import = _python_seconds("import flytekitplugins.actor.worker.executor")
    slot_start = median([_slot_start_seconds() for _ in range(3)])
    note = f"median of {samples} fresh agents"
    results.add(bench, "cold start: submit to an empty fleet -> the replica's first lease",
                secs(median(parts["lease"])), note)
    results.add(bench, "  replica launched -> connected (process start, imports, fork server, Hello)",
                secs(median(parts["connect"])), "")
    results.add(bench, "  connected -> lease", ms(median(parts["assign"])), "")
    results.add(bench, "  first task: lease -> result in the scheduler (fresh executor, first import of the task)",
                ms(median(parts["first_task"])), "")
    results.add(bench, "  submit -> get SUCCEEDED, first task on a cold fleet", secs(median(parts["total"])), "")
    results.add(bench, "  for scale: python start | + import replica module | + import executor module",
                f"{secs(bare)} | {secs(replica_import)} | {secs(executor_import)}",
                "median of 3; the replica imports the replica module, then its fork server the executor module")
    results.add(bench, "  the replica's first executor start (fork server preloads flytekit), before it connects",
                secs(slot_start), "median of 3; Slot.start() blocks ReplicaWorker.run() until the executor forked")
    results.data["4"] = {k: v for k, v in parts.items()}
    results.data["4"].update(python=bare, replica_import=replica_import, executor_import=executor_import,
                             slot_start=slot_start)


SLOT_START = """
import multiprocessing, tempfile, time
from flytekitplugins.actor.worker.replica import Slot
mp = multiprocessing.get_context("forkserver")
mp.set_forkserver_preload(["flytekitplugins.actor.worker.executor"])
slot = Slot(0, mp, tempfile.mkdtemp())
started = time.monotonic()
slot.start()
print(time.monotonic() - started)
slot.kill()
"""


def _slot_start_seconds() -> float:
    """How long the replica worker's first ``Slot.start()`` takes (it runs before the replica connects)."""
    done = subprocess.run([sys.executable, "-c", SLOT_START], cwd=ROOT, env=python_env(), check=True,
                          capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def _python_seconds(code: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = now()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=python_env(), check=True)
        times.append(now() - started)
    return median(times)
