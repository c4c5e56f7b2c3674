"""Benchmark 3: no-op tasks completed per second through one agent with 4 warm replicas: submit all through
``connector.create``, wait for all, read every result with ``connector.get``."""

from __future__ import annotations

import asyncio
import os
from typing import List

from . import tasks
from .common import Fleet, Results, check, cpu_delta, cpu_seconds, log, median, now, runs_note, secs


def run(results: Results, quick: bool) -> None:
    n = 1000 if quick else 10_000
    runs = 1  # a full run of 10,000 tasks takes minutes on 2 cores
    replicas = 4
    bench = "3"
    fleet = Fleet()
    rates: List[float] = []
    submit_rates: List[float] = []
    durations: List[float] = []
    try:
        template = fleet.template(tasks.noop4)
        log(f"[3] warming up {replicas} replicas")
        asyncio.run(_batch(fleet, template, 4 * replicas))
        fleet.wait_ready(replicas)
        asyncio.run(_batch(fleet, template, 10 * replicas))
        for i in range(runs):
            log(f"[3] {n:,} no-op tasks on {replicas} replicas, run {i + 1}/{runs}")
            before = cpu_seconds(fleet.agent._thread.native_id)
            submitted, total = asyncio.run(_batch(fleet, template, n))
            cpu = cpu_delta(before, cpu_seconds(fleet.agent._thread.native_id))
            durations.append(total)
            rates.append(n / total)
            submit_rates.append(n / submitted)
    finally:
        fleet.stop()
    note = runs_note(runs) + (" (a run takes minutes on 2 cores)" if runs == 1 and not quick else "")
    results.add(bench, f"throughput, {n:,} no-op tasks, {replicas} warm replicas (submit all, wait all)",
                f"{median(rates):.0f} tasks/s", f"{note}; {secs(median(durations))} in all")
    results.add(bench, "  connector.create rate while submitting them", f"{median(submit_rates):.0f} tasks/s",
                "creates complete before most tasks run")
    used = sum(cpu.values())
    results.add(bench, "  CPU per task, all processes (last run)", f"{used / n * 1000:.1f} ms",
                f"{used / durations[-1]:.2f} of {os.cpu_count()} cores busy on average")
    for role, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        results.add(bench, f"    {role}", f"{seconds / n * 1000:.2f} ms", f"{seconds / used:.0%} of the CPU")
    results.data["3"] = {"n": n, "rates": rates, "submit_rates": submit_rates, "durations": durations, "cpu": cpu}


async def _batch(fleet: Fleet, template, n: int):
    """Submit ``n`` tasks, wait for all, get all; returns (seconds to submit, seconds in all)."""
    started = now()
    metas = [await fleet.create(template) for _ in range(n)]
    submitted = now() - started
    await asyncio.gather(*(fleet.finished(m.key) for m in metas))
    for meta in metas:
        check(await fleet.connector.get(meta), "a no-op task")
    return submitted, now() - started
