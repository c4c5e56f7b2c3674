"""Benchmark 1: an actor map of hello-world elements over 25 replicas, against the same elements run as regular
tasks in fresh processes (``pyflyte-execute`` per element, as a pod per element would run them)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import List

from flyteidl.core import literals_pb2

from flytekitplugins.actor import map as actor_map

from . import tasks
from .common import (
    BIN, ROOT, Fleet, Results, check, log, median, mem_available_bytes, now, runs_note, secs, tree_memory,
)

#: Peak RSS of one pyflyte-execute process running the hello task, measured on this machine (/usr/bin/time -v);
#: used to cap "unbounded" concurrency to what memory holds.
FRESH_PROCESS_RSS = 100 * 1024 * 1024


def run(results: Results, quick: bool) -> None:
    elements = 100 if quick else 2000
    replicas = 4 if quick else 25
    cold_runs = warm_runs = 1 if quick else 3
    sample = 8 if quick else 50
    concurrency = 4 if quick else 25
    bench = "1"

    # --- actor map through the connector: on a cold fleet (a fresh agent each run), then on the warm fleet -----
    cold: List[float] = []
    warm: List[float] = []
    connects: List[float] = []
    memory = {}
    map_task = actor_map(tasks.hello)
    names = [f"world-{j}" for j in range(elements)]
    for run_index in range(cold_runs):
        fleet = Fleet()
        try:
            template = fleet.template(map_task, replica_count=replicas)
            inputs = fleet.inputs(map_task, name=names)
            log(f"[1] actor map of {elements} over {replicas} replicas, cold fleet, run {run_index + 1}/{cold_runs}")
            started = now()
            resource = asyncio.run(fleet.run_template(template, inputs))
            cold.append(now() - started)
            _check_map(resource, names)
            fleet.wait_ready(replicas)
            if run_index == 0:
                connects = sorted(t - started for t in fleet.connected_at().values())
                for i in range(warm_runs):
                    log(f"[1] actor map of {elements} over {replicas} replicas, warm fleet, run {i + 1}/{warm_runs}")
                    started = now()
                    resource = asyncio.run(fleet.run_template(template, inputs))
                    warm.append(now() - started)
                    _check_map(resource, names)
                memory = tree_memory()
        finally:
            fleet.stop()

    # --- the same elements as fresh processes -------------------------------------------------------------------
    log(f"[1] {sample} fresh pyflyte-execute processes at concurrency {concurrency}")
    matched = _fresh_processes(sample, concurrency)
    unbounded_cap = max(1, min(sample, int(0.6 * mem_available_bytes() / FRESH_PROCESS_RSS)))
    log(f"[1] {sample} fresh pyflyte-execute processes at concurrency {unbounded_cap} (unbounded)")
    unbounded = _fresh_processes(sample, unbounded_cap)
    scale = elements / sample
    matched_total = matched * scale
    unbounded_total = unbounded * scale

    cold_s, warm_s = median(cold), median(warm)
    what = f"{elements:,} hello-world elements"
    results.add(bench, f"actor map, {what}, {replicas} replicas, cold fleet (replicas start on submit)",
                secs(cold_s),
                f"{runs_note(cold_runs)}, a fresh agent each (min {secs(min(cold))}, max {secs(max(cold))})")
    results.add(bench, "  replicas connected after (first | last)", f"{secs(connects[0])} | {secs(connects[-1])}",
                f"first cold run; all {replicas} start at once and share the machine's cores")
    results.add(bench, f"actor map, {what}, {replicas} replicas, warm fleet (all {replicas} connected)",
                secs(warm_s), runs_note(warm_runs))
    results.add(bench, f"  memory of the warm fleet ({memory['processes']} processes: per replica the worker, its "
                f"fork server, resource tracker and executor)",
                f"{memory['pss'] / 2**30:.1f} GiB PSS", f"RSS summed: {memory['rss'] / 2**30:.1f} GiB")
    sample_note = (f"1 run of a {sample}-element sample ({secs(matched)}), x{scale:g} linear extrapolation"
                   if scale != 1 else "1 run")
    results.add(bench, f"fresh pyflyte-execute per element, concurrency {concurrency}", secs(matched_total), sample_note)
    unbounded_note = (
        f"all {sample} of the sample at once ({secs(unbounded)}), x{scale:g}; {elements:,} at once would need "
        f"~{elements * FRESH_PROCESS_RSS / 2**30:.0f} GiB at ~{FRESH_PROCESS_RSS / 2**20:.0f} MiB each"
        if unbounded_cap >= sample else
        f"{unbounded_cap} at once (what memory holds) over a {sample}-element sample ({secs(unbounded)}), x{scale:g}")
    results.add(bench, "fresh pyflyte-execute per element, unbounded", secs(unbounded_total), unbounded_note)
    results.add(bench, "ratio: fresh at concurrency / actor map (cold | warm)",
                f"{matched_total / cold_s:.0f}x | {matched_total / warm_s:.0f}x", "hosted: 1195/42 = 28x")
    results.add(bench, "ratio: fresh unbounded / actor map (cold | warm)",
                f"{unbounded_total / cold_s:.0f}x | {unbounded_total / warm_s:.0f}x", "hosted: 111/42 = 2.6x")
    results.add(bench, "published hosted numbers, for context", "42 s | 1,195 s | 111 s",
                "actors | pods at concurrency 25 | pods unbounded (Union's cluster)")
    results.data["1"] = {
        "elements": elements, "replicas": replicas, "cold": cold, "warm": warm, "connects": connects,
        "fleet_memory": memory, "sample": sample, "fresh_matched_sample_s": matched,
        "fresh_unbounded_sample_s": unbounded, "unbounded_cap": unbounded_cap, "concurrency": concurrency,
    }


def _check_map(resource, names: List[str]) -> None:
    check(resource, "the actor map")
    values = [lit.scalar.primitive.string_value for lit in resource.outputs.literals["o0"].collection.literals]
    if values != [f"hello {n}" for n in names]:
        raise RuntimeError("the actor map returned wrong outputs")


def _fresh_processes(count: int, concurrency: int) -> float:
    """Seconds to run ``count`` hello elements, each in a fresh ``pyflyte-execute`` process, ``concurrency`` at a
    time: write the element's inputs.pb, run the real flytekit CLI, read its outputs.pb back."""
    root = tempfile.mkdtemp(prefix="flyte-actors-pods-")
    executable = os.path.join(BIN, "pyflyte-execute")

    def element(i: int) -> None:
        work = os.path.join(root, str(i))
        os.makedirs(work)
        name = f"world-{i}"
        literals = literals_pb2.LiteralMap()
        literals.literals["name"].scalar.primitive.string_value = name
        inputs = os.path.join(work, "inputs.pb")
        with open(inputs, "wb") as f:
            f.write(literals.SerializeToString())
        out = os.path.join(work, "out")
        done = subprocess.run(
            [executable, "--inputs", inputs, "--output-prefix", out, "--raw-output-data-prefix",
             os.path.join(work, "raw"), "--resolver", "flytekit.core.python_auto_container.default_task_resolver",
             "--", "task-module", "benchmarks.tasks", "task-name", "hello_plain"],
            cwd=ROOT, env=dict(os.environ, TMPDIR=work),  # a pod's own scratch space, removed with it
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pyflyte-execute failed: {done.stdout.decode(errors='replace')[-2000:]}")
        with open(os.path.join(out, "outputs.pb"), "rb") as f:
            outputs = literals_pb2.LiteralMap.FromString(f.read())
        if outputs.literals["o0"].scalar.primitive.string_value != f"hello {name}":
            raise RuntimeError("pyflyte-execute wrote wrong outputs")

    try:
        started = now()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(element, range(count)))
        return now() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
