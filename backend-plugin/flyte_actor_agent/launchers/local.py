"""The local-process launcher: each replica is a subprocess running the replica worker, as a pod would.

The default for local runs and for an agent run without Kubernetes. A replica gets this process's environment,
the environment's variables and its pod template's primary-container variables, and this process's ``sys.path``
(so it imports the same user code). It runs in its own process group, so stopping it also stops its executors.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from typing import Dict, List, Optional, Sequence

from flytekitplugins.actor.contract import replica_variables

from . import ExitReason, Launcher, OnExit, ReplicaExit, ReplicaLaunch

#: Seconds a replica gets to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 5.0
#: The replica worker, run with this interpreter.
REPLICA_WORKER_COMMAND = (sys.executable, "-m", "flytekitplugins.actor.worker.replica")


class _Process:
    def __init__(self, proc: asyncio.subprocess.Process, log_path: str):
        self.proc = proc
        self.log_path = log_path
        self.stop_reason: Optional[str] = None


class LocalProcessLauncher(Launcher):
    def __init__(
        self,
        on_exit: OnExit,
        log_dir: Optional[str] = None,
        reconnect_seconds: float = 5.0,
        worker_command: Sequence[str] = REPLICA_WORKER_COMMAND,
    ):
        """``worker_command`` runs a replica worker (benchmarks run an instrumented one)."""
        super().__init__(on_exit)
        self.worker_command: List[str] = list(worker_command)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="flyte-actor-replicas-")
        self.reconnect_seconds = reconnect_seconds
        self.processes: Dict[str, _Process] = {}
        self._watchers: Dict[str, asyncio.Task] = {}

    async def launch(self, replica: ReplicaLaunch) -> None:
        env = dict(os.environ)
        env.update(replica_variables(replica.environment.replica))
        env.update(replica.worker_env())
        env["FLYTE_ACTOR_REPLICA_TOKEN"] = replica.token
        env["FLYTE_ACTOR_RECONNECT_SECONDS"] = str(self.reconnect_seconds)
        env["FLYTE_ACTOR_SCRATCH_DIR"] = os.path.join(self.log_dir, replica.replica_id)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or os.getcwd()) for p in sys.path)
        log_path = os.path.join(self.log_dir, f"{replica.replica_id}.log")
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *self.worker_command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.processes[replica.replica_id] = _Process(proc, log_path)
        self._watchers[replica.replica_id] = asyncio.ensure_future(self._watch(replica.replica_id))

    async def _watch(self, replica_id: str) -> None:
        process = self.processes[replica_id]
        code = await process.proc.wait()
        _kill_group(process.proc.pid, signal.SIGKILL)  # executors and the fork server go with it
        del self.processes[replica_id]
        self._watchers.pop(replica_id, None)
        if process.stop_reason is not None:
            exit = ReplicaExit(ExitReason.STOPPED, f"stopped: {process.stop_reason}")
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            exit = ReplicaExit(ExitReason.KILLED if code < 0 else ExitReason.EXITED,
                               f"replica process {how}; last output:\n{_tail(process.log_path)}")
        self.on_exit(replica_id, exit)

    async def stop(self, replica_id: str, reason: str) -> None:
        process = self.processes.get(replica_id)
        if process is None:
            return
        process.stop_reason = reason
        _kill_group(process.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.proc.wait()), STOP_GRACE_SECONDS)
        except asyncio.TimeoutError:
            _kill_group(process.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(r, "the agent is shutting down") for r in list(self.processes)))
        watchers = list(self._watchers.values())
        if watchers:
            await asyncio.gather(*watchers, return_exceptions=True)
        # Replica logs and scratch space go too; a replica that failed left its log's tail in the task's error.
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def pid(self, replica_id: str) -> Optional[int]:
        process = self.processes.get(replica_id)
        return process.proc.pid if process else None


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip() or "(no output)"
    except OSError:
        return "(no log)"
