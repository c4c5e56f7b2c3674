"""Profile the hot path of benchmarks 2 and 3 in every process it crosses:
``python -m benchmarks.profile [--throughput] [--tasks N] [--executor-tasks M] [--out DIR]``.

Needs py-spy and pyinstrument in the venv (``.venv/bin/pip install py-spy pyinstrument``; they are not project
dependencies). Three recordings:

1. **agent process** (py-spy, which starts it): ``--tasks`` no-op tasks through the connector, one after another
   on one warm replica (benchmark 2's workload), or with ``--throughput`` all at once on 4 (benchmark 3's; on a
   saturated machine, time waiting for a core is attributed to whatever was running, so prefer the default).
   Samples are split into the connector's caller (main thread: create, wait, get) and the agent loop thread
   (scheduler, lease streams).
2. **replica workers** (pyinstrument inside each replica, from its first assignment until it exits; py-spy cannot
   follow the replicas here, which run in sessions of their own): the stream, slots and pipes.
3. **executor** (py-spy, which starts it): ``executor.run_task`` with its ``TaskSandbox``, as ``executor.serve``
   runs it, in a process that imported what a replica's fork server preloads, for ``--executor-tasks`` copies of
   the TaskRun the connector builds for the no-op task.

Prints, per role, busy time per task (samples of waiting threads left out) and the functions with the most time,
inclusive and own (by function, summed over lines). Raw data stays in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Iterable, List, Tuple

WARMUP = 116
RATE = 200  # py-spy samples per second
#: Leaf functions of a thread that waits rather than works (pyinstrument attributes C waits to them).
IDLE = {"select", "poll", "epoll", "sleep", "read_signed", "_recv", "_recv_bytes", "recv", "wait", "accept"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--throughput", action="store_true", help="benchmark 3's workload instead of benchmark 2's")
    parser.add_argument("--executor-tasks", type=int, default=2000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="flyte-actors-profile-")
    os.makedirs(out, exist_ok=True)
    if args.workload:
        return _workload(args.tasks, out, args.throughput)

    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    import importlib.util

    if importlib.util.find_spec("pyinstrument") is None:
        py_spy = None
    if py_spy is None:
        print("needs py-spy and pyinstrument: .venv/bin/pip install py-spy pyinstrument", file=sys.stderr)
        return 2
    from .common import ROOT, log, python_env

    env = python_env()
    env["BENCH_PROFILE_DIR"] = out
    how = "all at once on 4 replicas" if args.throughput else "one after another on 1 replica"
    log(f"[profile] agent process: {args.tasks} no-op tasks {how}, under py-spy")
    subprocess.run([py_spy, "record", "--nonblocking", "-r", str(RATE), "-f", "raw", "-o", os.path.join(out, "agent.txt"),
                    "--", sys.executable, "-m", "benchmarks.profile", "--workload", "--tasks", str(args.tasks),
                    "--out", out] + (["--throughput"] if args.throughput else []), cwd=ROOT, env=env, check=True)
    log(f"[profile] executor: {args.executor_tasks} run_task calls, under py-spy")
    executor = subprocess.run(
        [py_spy, "record", "--nonblocking", "-r", str(RATE), "-f", "raw", "-o", os.path.join(out, "executor.txt"),
         "--", sys.executable, "-m", "benchmarks._executor_loop", "--spec", os.path.join(out, "spec.pb"),
         "--n", str(args.executor_tasks)], cwd=ROOT, env=python_env(), check=True, capture_output=True, text=True)
    report(out, args.tasks, args.executor_tasks, args.top)
    print(f"\nexecutor loop under py-spy: {executor.stdout.strip()}")
    print(f"Raw profiles in {out}")
    return 0


def _workload(tasks_count: int, out: str, throughput: bool) -> int:
    from . import tasks
    from .common import PROBED_REPLICA_COMMAND, Fleet, check, log, now

    # Replicas run benchmarks._probe_replica (the product worker plus a probe in its executors).
    fleet = Fleet(worker_command=PROBED_REPLICA_COMMAND)
    try:
        template = fleet.template(tasks.noop4 if throughput else tasks.noop)
        replicas = 4 if throughput else 1
        captured = []
        submit = fleet.agent.submit
        fleet.agent.submit = lambda request: (captured.append(request), submit(request))[1]

        async def one_by_one(n: int) -> float:
            started = now()
            for _ in range(n):
                meta = await fleet.create(template)
                await fleet.finished(meta.key)
                check(await fleet.connector.get(meta), "a no-op task")
            return now() - started

        async def all_at_once(n: int) -> float:
            started = now()
            metas = [await fleet.create(template) for _ in range(n)]
            await asyncio.gather(*(fleet.finished(m.key) for m in metas))
            for meta in metas:
                check(await fleet.connector.get(meta), "a no-op task")
            return now() - started

        batch = all_at_once if throughput else one_by_one

        async def profiled_batch(n: int) -> float:  # its name marks the samples that count
            return await batch(n)

        log(f"[profile] warming up {replicas} replica(s)")
        asyncio.run(batch(16))
        fleet.agent.submit = submit
        with open(os.path.join(out, "spec.pb"), "wb") as f:
            f.write(captured[0].payload)  # the serialized TaskRun the connector built, for the executor
        fleet.wait_ready(replicas)
        asyncio.run(batch(WARMUP - 16))
        seconds = asyncio.run(profiled_batch(tasks_count))
        log(f"[profile] {tasks_count / seconds:.0f} tasks/s while profiled")
    finally:
        fleet.stop()  # replicas save their profiles as they exit
    return 0


# -------------------------------------------------------------------------------------------------------- report


def report(directory: str, tasks: int, executor_tasks: int, top: int) -> None:
    agent = list(_py_spy_stacks(os.path.join(directory, "agent.txt")))
    driver = [(s, n / RATE) for s, n in agent if any(_function(f) == "profiled_batch" for f in s)]
    loop = [(s, n / RATE) for s, n in agent if _in_agent_thread(s)]
    _print_role("connector caller (main thread: create, wait, get), py-spy", driver, tasks, top)
    _print_role("agent loop thread (scheduler, lease streams), py-spy", loop, tasks, top,
                note="includes the warm-up's share (~4%)")
    replica_records = []
    for path in glob.glob(os.path.join(directory, "replica-*.pyisession")):
        replica_records += _pyinstrument_stacks(path)
    _print_role("replica worker process(es), from their first task, pyinstrument", replica_records,
                tasks + WARMUP, top)
    executor = [(s, n / RATE) for s, n in _py_spy_stacks(os.path.join(directory, "executor.txt"))
                if any(_function(f) == "run_task" for f in s)]
    _print_role("executor: run_task (sandbox + flytekit), py-spy", executor, executor_tasks, top)


def _function(frame: str) -> str:
    """'Class.method (path)' or 'outer.<locals>.inner (path)' -> 'method' / 'inner'."""
    return frame.split(" ", 1)[0].rsplit(".", 1)[-1]


def _in_agent_thread(stack: List[str]) -> bool:
    names = {_function(f) for f in stack}
    return "_bootstrap_inner" in names and "run_forever" in names


def _py_spy_stacks(path: str) -> Iterable[Tuple[List[str], int]]:
    """py-spy's raw (collapsed) format: 'frame;frame;... count', frames 'function (file:line)'."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            yield [_shorten(frame) for frame in stack.split(";")], int(count)


def _pyinstrument_stacks(path: str) -> List[Tuple[List[str], float]]:
    from pyinstrument.session import Session

    records = []
    for stack, seconds in Session.load(path).frame_records:
        frames = []
        for info in stack:
            function, file, line = (info.split("\x01")[0].split("\x00") + ["", ""])[:3]
            if file != "<thread>":
                frames.append(_shorten(f"{function} ({file}:{line})"))
        records.append((frames, seconds))
    return records


def _shorten(frame: str) -> str:
    """'function (path:line)' -> 'function (short path)': by function, lines summed; paths from the package."""
    function, _, rest = frame.partition(" (")
    path = rest.rsplit(":", 1)[0] if ":" in rest else rest.rstrip(")")
    for marker in ("site-packages/", "lib/python3.11/", "flytekitplugins-actor/", "backend-plugin/", os.getcwd() + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{function} ({path})"


def _print_role(title: str, records, tasks: int, top: int, note: str = "") -> None:
    inclusive: Counter = Counter()
    own: Counter = Counter()
    busy = 0.0
    for stack, seconds in records:
        if not stack or _function(stack[-1]) in IDLE:
            continue
        busy += seconds
        own[stack[-1]] += seconds
        for frame in set(stack):
            inclusive[frame] += seconds
    print(f"\n== {title}: {busy:.2f} s busy, {busy / max(1, tasks) * 1000:.2f} ms per task ({tasks} tasks)"
          + (f"; {note}" if note else ""))
    if not busy:
        return
    print(f"   {'inclusive':>9}  {'own':>5}  function")
    shown = 0
    for frame, seconds in inclusive.most_common():
        if seconds / busy < 0.03 or shown >= top * 2:
            break
        if seconds / busy > 0.88 and own.get(frame, 0) / busy < 0.01:
            continue  # the thread's entry frames: no information
        print(f"   {seconds / busy:9.0%}  {own.get(frame, 0) / busy:5.0%}  {frame}")
        shown += 1
    print("   most own time:")
    for frame, seconds in own.most_common(top):
        print(f"   {'':>9}  {seconds / busy:5.0%}  {frame}")


if __name__ == "__main__":
    sys.exit(main())
