"""The local-process launcher: each replica is a subprocess running the replica worker, as a pod would.

The default for local runs and for an agent run without Kubernetes. A replica gets this process's environment,
the environment's variables and its pod template's primary-container variables, and this process's ``sys.path``
(so it imports the same user code). It runs in its own process group, so stopping it also stops its executors.
Its token comes through a pipe, never the environment, so no other process can read it from ``/proc``.

Replicas run on this host, so a task's code bundle (``pyflyte-fast-execute --additional-distribution``) is fetched
only from a trusted place: local paths, plus the prefixes an admin configures (``trusted_bundles``,
``flyte-actor-agent serve --trusted-bundle-prefixes``).
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
#: Where code bundles are always trusted from: this host's files.
LOCAL_BUNDLE_PREFIXES = ("/", "file:///")


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
        trusted_bundles: Sequence[str] = (),
    ):
        """``worker_command`` runs a replica worker (benchmarks run an instrumented one); ``trusted_bundles``
        are URL prefixes code bundles may also come from (``s3://my-bucket/fast/``)."""
        super().__init__(on_exit)
        self.worker_command: List[str] = list(worker_command)
        self.trusted_bundles = LOCAL_BUNDLE_PREFIXES + tuple(trusted_bundles)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="flyte-actor-replicas-")
        self.reconnect_seconds = reconnect_seconds
        self.processes: Dict[str, _Process] = {}
        self._watchers: Dict[str, asyncio.Task] = {}

    async def launch(self, replica: ReplicaLaunch) -> None:
        env = dict(os.environ)
        env.update(replica_variables(replica.environment.replica))
        env.update(replica.worker_env())
        for name in ("FLYTE_ACTOR_REPLICA_TOKEN", "FLYTE_ACTOR_REPLICA_TOKEN_FILE"):
            env.pop(name, None)
        token_read, token_write = os.pipe()
        with os.fdopen(token_write, "w") as pipe:
            pipe.write(replica.token)  # far below a pipe's buffer: never blocks
        env["FLYTE_ACTOR_REPLICA_TOKEN_FD"] = str(token_read)
        env["FLYTE_ACTOR_RECONNECT_SECONDS"] = str(self.reconnect_seconds)
        env["FLYTE_ACTOR_SCRATCH_DIR"] = os.path.join(self.log_dir, replica.replica_id)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or os.getcwd()) for p in sys.path)
        log_path = os.path.join(self.log_dir, f"{replica.replica_id}.log")
        try:
            with open(log_path, "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    *self.worker_command,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    pass_fds=(token_read,),
                )
        finally:
            os.close(token_read)
        self.processes[replica.replica_id] = _Process(proc, log_path)
        self._watchers[replica.replica_id] = asyncio.ensure_future(self._watch(replica.replica_id))

    def check_bundle(self, distribution: str) -> None:
        if not distribution:
            return
        local = distribution.startswith("/") or distribution.startswith("file://")
        path = distribution[len("file://"):] if distribution.startswith("file://") else distribution
        if (local and os.path.normpath(path) != path.rstrip("/")) or "/../" in f"{path}/":
            raise ValueError(f"code bundle {distribution!r} is not a normalized location; register the task again")
        for prefix in self.trusted_bundles:
            bounded = prefix if prefix.endswith("/") else prefix + "/"
            if distribution == prefix or distribution.startswith(bounded):
                return
        raise ValueError(
            f"code bundle {distribution!r} is not in a location this agent trusts ({list(self.trusted_bundles)}); "
            "an admin adds its prefix with --trusted-bundle-prefixes"
        )

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
