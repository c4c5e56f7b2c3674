"""The local-process launcher: each replica is a subprocess running the replica worker, as a pod would.

The default for local runs and for an agent run without Kubernetes. A replica gets this process's environment,
the environment's variables and its pod template's primary-container variables, and this process's ``sys.path``
(so it imports the same user code). It runs in its own process group, so stopping it also stops its executors.
Its token comes through a pipe, never the environment, so no other process can read it from ``/proc``.

Replicas run on this host, so a task's code bundle (``pyflyte-fast-execute --additional-distribution``) is fetched
only from a trusted place: local paths, plus the prefixes an admin configures (``trusted_bundles``,
``flyte-actor-agent serve --trusted-bundle-prefixes``).

No container enforces the environment's ``limits.mem`` here: each executor caps its own data memory at it
(RLIMIT_DATA: heap and private mappings), so a task that allocates past it gets a MemoryError instead of taking
the machine's memory. It is per executor, not shared by a replica's ``parallelism`` executors as a pod's is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from typing import Dict, List, Optional, Sequence

from flytekitplugins.actor.contract import replica_variables

from . import ExitReason, Launcher, OnExit, ReplicaExit, ReplicaLaunch

log = logging.getLogger(__name__)

#: Most zygotes one launcher keeps (one per distinct replica environment); replicas of further environments start
#: as fresh processes.
MAX_ZYGOTES = 4
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


class _ZygoteChild:
    """A replica forked by the zygote: the part of ``asyncio.subprocess.Process`` the launcher uses."""

    def __init__(self, pid: int, exited: "asyncio.Future[int]"):
        self.pid = pid
        self._exited = exited

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class _Zygote:
    """The launcher's end of ``flytekitplugins.actor.worker.zygote``: one warm process that forks replicas."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self._answers: Dict[str, asyncio.Future] = {}
        self._exits: Dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, worker_module: str, env: Dict[str, str]) -> "_Zygote":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flytekitplugins.actor.worker.zygote", worker_module,
            env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )
        ready = json.loads(await proc.stdout.readline() or b"{}")
        if "ready" not in ready:
            raise RuntimeError(f"the replica zygote exited with code {await proc.wait()} before it was ready")
        return cls(proc)

    async def fork(self, replica_id: str, env: Dict[str, str], log_path: str) -> _ZygoteChild:
        answer = self._answers[replica_id] = asyncio.get_running_loop().create_future()
        self.proc.stdin.write((json.dumps({"id": replica_id, "env": env, "log": log_path}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await answer
        if "error" in reply:
            raise RuntimeError(reply["error"])
        exited = self._exits.setdefault(reply["pid"], asyncio.get_running_loop().create_future())
        return _ZygoteChild(reply["pid"], exited)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self._reader.done()

    async def _read(self) -> None:
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                message = json.loads(line)
                if "exit" in message:
                    exited = self._exits.setdefault(message["pid"], asyncio.get_running_loop().create_future())
                    if not exited.done():
                        exited.set_result(message["exit"])
                elif message.get("id") in self._answers:
                    self._answers.pop(message["id"]).set_result(message)
        finally:
            # The zygote is gone: its replicas' exits will never be reported; they count as killed.
            for future in list(self._answers.values()) + list(self._exits.values()):
                if not future.done():
                    if future in self._answers.values():
                        future.set_result({"error": "the replica zygote exited"})
                    else:
                        future.set_result(-signal.SIGKILL)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.stdin.close()  # the zygote kills its replicas' groups and exits
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE_SECONDS)
            except asyncio.TimeoutError:
                _kill_group(self.proc.pid, signal.SIGKILL)
        await asyncio.gather(self._reader, return_exceptions=True)


class LocalProcessLauncher(Launcher):
    """``worker_command`` runs a replica worker (benchmarks run an instrumented one); ``trusted_bundles`` are URL
    prefixes code bundles may also come from (``s3://my-bucket/fast/``). ``zygote`` (default on): fork replicas
    from one warm process that imported flytekit once, instead of starting each as a fresh interpreter (see
    ``flytekitplugins.actor.worker.zygote``); if the zygote cannot start, replicas start as fresh processes. A
    worker command other than ``python -m MODULE`` starts fresh processes."""

    def __init__(
        self,
        on_exit: OnExit,
        log_dir: Optional[str] = None,
        reconnect_seconds: float = 5.0,
        worker_command: Sequence[str] = REPLICA_WORKER_COMMAND,
        trusted_bundles: Sequence[str] = (),
        zygote: bool = True,
    ):
        super().__init__(on_exit)
        self.worker_command: List[str] = list(worker_command)
        self.trusted_bundles = LOCAL_BUNDLE_PREFIXES + tuple(trusted_bundles)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="flyte-actor-replicas-")
        self.reconnect_seconds = reconnect_seconds
        self.processes: Dict[str, _Process] = {}
        self._watchers: Dict[str, asyncio.Task] = {}
        command = self.worker_command
        self._worker_module = command[2] if len(command) == 3 and command[:2] == [sys.executable, "-m"] else None
        self._use_zygote = zygote and self._worker_module is not None
        #: Zygotes by environment; None where one could not start (its replicas start as fresh processes).
        self._zygotes: Dict[frozenset, Optional[_Zygote]] = {}
        self._zygote_lock = asyncio.Lock()

    async def _warm_parent(self, env: Dict[str, str]) -> Optional[_Zygote]:
        """The zygote for replicas with this environment (one per distinct environment, as variables such as
        ``PYTHONPATH`` or flytekit's logging level act when the interpreter starts or flytekit is imported), or
        None where there is none: then the replica starts as a fresh process."""
        if not self._use_zygote:
            return None
        key = frozenset(env.items())
        async with self._zygote_lock:
            zygote = self._zygotes.get(key)
            if zygote is not None and not zygote.alive:
                zygote = None
            if zygote is None and (key not in self._zygotes or self._zygotes[key] is not None):
                if sum(1 for z in self._zygotes.values() if z is not None) >= MAX_ZYGOTES:
                    return None
                try:
                    zygote = await _Zygote.start(self._worker_module, env)
                except (OSError, RuntimeError, ValueError) as e:
                    log.warning("replica zygote unavailable (%s); starting replicas as fresh processes", e)
                    zygote = None
                self._zygotes[key] = zygote
            return zygote

    async def launch(self, replica: ReplicaLaunch) -> None:
        env = dict(os.environ)
        env.update(replica_variables(replica.environment.replica))
        env.update(replica.worker_env())
        for name in ("FLYTE_ACTOR_REPLICA_TOKEN", "FLYTE_ACTOR_REPLICA_TOKEN_FILE"):
            env.pop(name, None)
        env["FLYTE_ACTOR_RECONNECT_SECONDS"] = str(self.reconnect_seconds)
        env["FLYTE_ACTOR_SCRATCH_DIR"] = os.path.join(self.log_dir, replica.replica_id)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or os.getcwd()) for p in sys.path)
        memory = (replica.environment.replica.get("limits") or {}).get("mem")
        if memory:
            env["FLYTE_ACTOR_MEMORY_LIMIT_BYTES"] = str(quantity_bytes(memory))
        log_path = os.path.join(self.log_dir, f"{replica.replica_id}.log")
        zygote = await self._warm_parent(_zygote_env(env))
        proc = None
        if zygote is not None:
            try:
                # The token rides the zygote's private request pipe into the forked replica's os.environ (not the
                # /proc environ of any process), and the replica takes it out before its executors start.
                proc = await zygote.fork(replica.replica_id, {**env, "FLYTE_ACTOR_REPLICA_TOKEN": replica.token},
                                         log_path)
            except RuntimeError as e:
                log.warning("replica zygote could not fork %s (%s); starting it as a fresh process",
                            replica.replica_id, e)
        if proc is None:
            proc = await self._start_process(env, replica.token, log_path)
        self.processes[replica.replica_id] = _Process(proc, log_path)
        self._watchers[replica.replica_id] = asyncio.ensure_future(self._watch(replica.replica_id))

    async def _start_process(self, env: Dict[str, str], token: str, log_path: str) -> asyncio.subprocess.Process:
        """A replica as a fresh interpreter running the worker command; its token comes through a pipe, never
        its environment (other processes of the user could read that in /proc)."""
        token_read, token_write = os.pipe()
        with os.fdopen(token_write, "w") as pipe:
            pipe.write(token)  # far below a pipe's buffer: never blocks
        try:
            with open(log_path, "wb") as log_file:
                return await asyncio.create_subprocess_exec(
                    *self.worker_command,
                    env={**env, "FLYTE_ACTOR_REPLICA_TOKEN_FD": str(token_read)},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                    pass_fds=(token_read,),
                )
        finally:
            os.close(token_read)

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
        await asyncio.gather(*(z.close() for z in self._zygotes.values() if z is not None))
        self._zygotes.clear()
        # Replica logs and scratch space go too; a replica that failed left its log's tail in the task's error.
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def where(self, replica_id: str) -> str:
        pid = self.pid(replica_id)
        return f"pid {pid}" if pid is not None else ""

    def pid(self, replica_id: str) -> Optional[int]:
        process = self.processes.get(replica_id)
        return process.proc.pid if process else None


def _zygote_env(replica_env: Dict[str, str]) -> Dict[str, str]:
    """The zygote's environment: a replica's, less what names one replica (each fork gets its own)."""
    return {k: v for k, v in replica_env.items() if not k.startswith("FLYTE_ACTOR_")}


_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity ("512Mi", "1G", "1.5Gi", "1e9", "1000")."""
    text = str(quantity).strip()
    number = text.rstrip("kKMGTPi")
    suffix = text[len(number):]
    try:
        if suffix not in _SUFFIXES:
            raise ValueError(suffix)
        return int(float(number) * _SUFFIXES[suffix])
    except ValueError:
        raise ValueError(f"limits.mem {quantity!r} is not a memory quantity; write it as 512Mi, 2Gi or 1G") from None


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
