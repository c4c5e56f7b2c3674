"""What the benchmarks share: a real agent with a local-process fleet driven through the connector (the approach of
tests/integration/harness.py), launchers for special cases, timing statistics and result rows."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

from flytekit.extend.backend.base_connector import Resource

from flyte_actor_agent.launchers import ExitReason, Launcher, ReplicaExit, ReplicaLaunch
from flyte_actor_agent.local_fleet import LocalFleet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
now = time.monotonic  # CLOCK_MONOTONIC: the scheduler's clock, and the same in every process of the machine


# ------------------------------------------------------------------------------------------------------ results


@dataclass
class Row:
    bench: str
    label: str
    value: str
    note: str = ""


class Results:
    def __init__(self):
        self.rows: List[Row] = []
        self.data: Dict[str, Any] = {}

    def add(self, bench: str, label: str, value: str, note: str = "") -> None:
        self.rows.append(Row(bench, label, value, note))
        log(f"  [{bench}] {label}: {value} {note}")

    def to_json(self) -> Dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "data": self.data}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def secs(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


def runs_note(runs: int, of: str = "") -> str:
    """'median of 3 runs of 1,000 tasks' or '1 run of 1,000 tasks'."""
    suffix = f" of {of}" if of else ""
    return f"median of {runs} runs{suffix}" if runs > 1 else f"1 run{suffix}"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------------- launchers


class NullLauncher(Launcher):
    """Launches nothing: replicas stay 'starting' and tasks stay queued (benchmark 6)."""

    async def launch(self, replica: ReplicaLaunch) -> None:
        return None

    async def stop(self, replica_id: str, reason: str) -> None:
        self.on_exit(replica_id, ReplicaExit(ExitReason.STOPPED, f"stopped: {reason}"))

    async def close(self) -> None:
        return None


#: The product's replica worker plus a probe in its executors that records when each task starts and ends.
PROBED_REPLICA_COMMAND = (sys.executable, "-m", "benchmarks._probe_replica")


class Fleet(LocalFleet):
    """The shared local fleet, plus what only the benchmarks read: replicas ready, and task times."""

    def wait_ready(self, count: int, timeout: float = 300) -> None:
        self.wait_until(lambda: self.ready_replicas() >= count, timeout, f"{count} replicas to connect")

    def task_times(self, keys: Sequence[str]) -> List[tuple]:
        """(submitted_at, started_at, finished_at) of tasks the scheduler still holds."""

        def read():
            tasks = self.agent.scheduler.tasks
            return [(tasks[k].submitted_at, tasks[k].started_at, tasks[k].finished_at) for k in keys]

        return self.on_loop(read)


def succeeded(resource: Resource) -> bool:
    from flyteidl.core.execution_pb2 import TaskExecution

    return resource.phase == TaskExecution.SUCCEEDED and resource.outputs is not None


def check(resource: Resource, what: str) -> Resource:
    if not succeeded(resource):
        raise RuntimeError(f"{what} did not succeed: phase {resource.phase}: {resource.message}")
    return resource


def tree_memory(pid: Optional[int] = None) -> Dict[str, float]:
    """Memory of the processes descending from ``pid`` (default: this one), e.g. a local fleet's replicas, fork
    servers and executors: the sum of their RSS, and of their PSS (shared pages split between sharers)."""
    pid = pid or os.getpid()
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    rss = pss = 0
    for child in found:
        try:
            with open(f"/proc/{child}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {"processes": len(found), "rss": rss, "pss": pss}


def cpu_seconds(agent_thread_id: int) -> Dict[str, float]:
    """CPU seconds (user + system) used so far, by role: this process's main thread (the connector's caller), the
    agent loop thread, this process's other threads (gRPC's), and the local fleet's processes: replica workers,
    executors, and their fork servers and resource trackers. Processes that exited are not counted."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path: str):
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick  # ppid, utime + stime

    me = os.getpid()
    out = {"connector caller (main thread)": 0.0, "agent loop thread": 0.0, "agent process, other threads": 0.0}
    for tid in os.listdir(f"/proc/{me}/task"):
        try:
            seconds = stat(f"/proc/{me}/task/{tid}/stat")[1]
        except OSError:
            continue
        role = ("connector caller (main thread)" if int(tid) == me else
                "agent loop thread" if int(tid) == agent_thread_id else "agent process, other threads")
        out[role] += seconds
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, seconds = stat(f"/proc/{entry}/stat")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            processes[int(entry)] = (ppid, seconds, cmdline)
    for pid, (ppid, seconds, cmdline) in processes.items():
        if "actor.worker.replica" in cmdline or "benchmarks._probe_replica" in cmdline:
            role = "replica workers"
        elif "multiprocessing.forkserver" in cmdline:
            parent = processes.get(ppid, (0, 0.0, ""))[2]
            role = "executors" if "multiprocessing.forkserver" in parent else "fork servers, resource trackers"
        elif "multiprocessing.resource_tracker" in cmdline:
            role = "fork servers, resource trackers"
        else:
            continue
        if _descends(pid, me, processes):
            out[role] = out.get(role, 0.0) + seconds
    return out


def _descends(pid: int, ancestor: int, processes) -> bool:
    while pid in processes:
        pid = processes[pid][0]
        if pid == ancestor:
            return True
    return False


def cpu_delta(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def python_env() -> Dict[str, str]:
    """This process's environment, with the repository importable (for child processes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
