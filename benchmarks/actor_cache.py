"""Benchmark 5: ``@actor_cache``: an actor map over 200 elements on 4 replicas whose model load takes 1 s
(``time.sleep(1)``), with the load behind ``@actor_cache`` and without it. Loads are counted in a file the loader
appends to. Every run starts from an empty fleet (a fresh agent), so the cache starts empty."""

from __future__ import annotations

import asyncio
import functools
import math
import os
import tempfile
from typing import List

from flytekitplugins.actor import map as actor_map

from . import tasks
from .common import Fleet, Results, check, log, median, now, runs_note, secs


def run(results: Results, quick: bool) -> None:
    elements = 20 if quick else 200
    cached_runs = 1 if quick else 3
    uncached_runs = 1
    replicas = 4
    bench = "5"
    cached_times, cached_loads = _runs(tasks.predict_cached, elements, cached_runs)
    uncached_times, uncached_loads = _runs(tasks.predict_uncached, elements, uncached_runs)
    expected_uncached = math.ceil(elements / replicas) * tasks.LOAD_SECONDS
    results.add(bench, f"@actor_cache: map of {elements} elements, 1 s load, {replicas} replicas (cold fleet)",
                f"{secs(median(cached_times))}, {median(cached_loads):.0f} loads", runs_note(cached_runs))
    results.add(bench, "  same without @actor_cache",
                f"{secs(median(uncached_times))}, {median(uncached_loads):.0f} loads",
                f"{runs_note(uncached_runs)}; expected >= {elements} loads / {replicas} replicas x 1 s = "
                f"{secs(expected_uncached)} + cold start")
    results.add(bench, "  speed-up from @actor_cache", f"{median(uncached_times) / median(cached_times):.1f}x", "")
    results.data["5"] = {"cached": cached_times, "cached_loads": cached_loads, "uncached": uncached_times,
                         "uncached_loads": uncached_loads}


def _runs(task, elements: int, runs: int):
    times: List[float] = []
    loads: List[int] = []
    for i in range(runs):
        log(f"[5] {task.name}: map of {elements}, run {i + 1}/{runs}")
        fd, load_log = tempfile.mkstemp(prefix="flyte-actors-loads-")
        os.close(fd)
        fleet = Fleet()
        try:
            map_task = actor_map(functools.partial(task, log=load_log))
            template = fleet.template(map_task)
            inputs = fleet.inputs(map_task, x=list(range(elements)), log=load_log)
            started = now()
            resource = asyncio.run(fleet.run_template(template, inputs))
            times.append(now() - started)
            check(resource, f"the map over {task.name}")
            values = [lit.scalar.primitive.integer for lit in resource.outputs.literals["o0"].collection.literals]
            if values != list(range(elements)):
                raise RuntimeError("the map returned wrong outputs")
        finally:
            fleet.stop()
        with open(load_log) as f:
            loads.append(sum(1 for _ in f))
        os.unlink(load_log)
    return times, loads
