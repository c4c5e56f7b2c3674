"""The replica worker: the entrypoint (``flyte-actor-replica``) of every replica process or pod.

It connects to the agent's lease service, says who it is, and runs the tasks it is leased in ``parallelism``
executor processes (see :mod:`.executor`), reporting each result until the agent acknowledges it. This process
never runs user code, so it keeps heartbeating while tasks run and survives whatever a task does to its executor.

Configured by environment variables (set by the agent's launcher):

==================================  =====================================================================
``FLYTE_ACTOR_AGENT_ADDRESS``       ``host:port`` of the agent's lease service
``FLYTE_ACTOR_ENVIRONMENT_KEY``     fleet this replica belongs to (``<name>-<version>``)
``FLYTE_ACTOR_REPLICA_ID``          id the agent gave this replica
``FLYTE_ACTOR_REPLICA_TOKEN``       secret the agent gave this replica; or ``..._TOKEN_FD``: a pipe to read it from
                                    (the local launcher's way); or ``..._TOKEN_FILE``: a file, deleted once read
``FLYTE_ACTOR_AGENT_CA``            PEM of the CA of the lease service's TLS certificate (unset: plain gRPC)
``FLYTE_ACTOR_PARALLELISM``         tasks run at once (default 1)
``FLYTE_ACTOR_SCRATCH_DIR``         where task temp dirs and code bundles go (default: a temp dir)
``FLYTE_ACTOR_RECONNECT_SECONDS``   how long to keep trying to reach a lost agent before exiting (default 60)
==================================  =====================================================================

The token never reaches task code: it is read once and removed from this process's environment before any
executor starts (executors inherit the environment), and the process makes itself non-dumpable, so processes of
the same user (task code in executors, other replicas) cannot read it from ``/proc/<pid>/environ`` or memory.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import grpc

from ..protocol import GRPC_OPTIONS, PROTOCOL_VERSION, lease_pb2, lease_pb2_grpc

#: Exit code of a replica the agent refused (wrong token, unknown replica): restarting it cannot help.
EXIT_REFUSED = 3
log = logging.getLogger("flyte-actor-replica")


@dataclass
class Config:
    agent_address: str
    environment_key: str
    replica_id: str
    token: str
    parallelism: int = 1
    scratch_dir: str = ""
    reconnect_seconds: float = 60.0
    agent_ca: str = ""

    @classmethod
    def from_env(cls, env=os.environ) -> "Config":
        missing = [
            k
            for k in ("FLYTE_ACTOR_AGENT_ADDRESS", "FLYTE_ACTOR_ENVIRONMENT_KEY", "FLYTE_ACTOR_REPLICA_ID")
            if not env.get(k)
        ]
        token = _take_token(env)
        if not token:
            missing.append("FLYTE_ACTOR_REPLICA_TOKEN")
        if missing:
            raise SystemExit(
                f"flyte-actor-replica: {', '.join(missing)} not set. Replicas are started by the actor agent, "
                "which sets them; to run one by hand, set them as the agent would (see the module docstring)."
            )
        return cls(
            agent_address=env["FLYTE_ACTOR_AGENT_ADDRESS"],
            environment_key=env["FLYTE_ACTOR_ENVIRONMENT_KEY"],
            replica_id=env["FLYTE_ACTOR_REPLICA_ID"],
            token=token,
            parallelism=int(env.get("FLYTE_ACTOR_PARALLELISM", "1")),
            scratch_dir=env.get("FLYTE_ACTOR_SCRATCH_DIR") or tempfile.mkdtemp(prefix="flyte-actor-"),
            reconnect_seconds=float(env.get("FLYTE_ACTOR_RECONNECT_SECONDS", "60")),
            agent_ca=env.get("FLYTE_ACTOR_AGENT_CA", ""),
        )


def _take_token(env) -> str:
    """Read the replica token and remove every trace of it from ``env`` (``os.environ``: also the C environment
    that executors inherit); a token file is deleted once read."""
    token = env.pop("FLYTE_ACTOR_REPLICA_TOKEN", "")
    fd = env.pop("FLYTE_ACTOR_REPLICA_TOKEN_FD", "")
    path = env.pop("FLYTE_ACTOR_REPLICA_TOKEN_FILE", "")
    if not token and fd:
        with os.fdopen(int(fd), "r") as pipe:
            token = pipe.read().strip()
    elif not token and path:
        with open(path) as f:
            token = f.read().strip()
        os.unlink(path)
    return token


def _not_dumpable() -> None:
    """Close /proc/<pid>/environ (which keeps the variables this process started with, token included) and
    /proc/<pid>/mem to other processes of the same user. Reset by exec, so the fork server and executors, which
    hold no token, stay debuggable."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_DUMPABLE = 4
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0)


class Refused(Exception):
    pass


class Slot:
    """One executor process and the lease it runs, if any."""

    def __init__(self, index: int, mp: multiprocessing.context.BaseContext, scratch_dir: str):
        self.index = index
        self._mp = mp
        self._scratch = os.path.join(scratch_dir, f"executor-{index}")
        self.process: Optional[multiprocessing.process.BaseProcess] = None
        self.conn = None
        self.lease_id: Optional[str] = None
        self.kill_reason: Optional[lease_pb2.TaskStatus] = None
        self.timer: Optional[asyncio.TimerHandle] = None

    def start(self) -> None:
        parent, child = self._mp.Pipe()
        self.process = self._mp.Process(target=_executor_main, args=(child, self._scratch), daemon=True)
        self.process.start()
        child.close()
        self.conn = parent

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    @property
    def free(self) -> bool:
        return self.lease_id is None


def _executor_main(conn, scratch_dir: str) -> None:
    """An executor's entry point, named here so that this process never imports flytekit (the fork server that
    forks executors has it preloaded)."""
    from .executor import serve

    serve(conn, scratch_dir)


class ReplicaWorker:
    def __init__(self, config: Config):
        self.config = config
        self.loop = asyncio.get_running_loop()
        mp = multiprocessing.get_context("forkserver")
        # Executors fork from a server that has flytekit imported already, so a replacement starts in milliseconds.
        mp.set_forkserver_preload(["flytekitplugins.actor.worker.executor"])
        self.slots = [Slot(i, mp, config.scratch_dir) for i in range(config.parallelism)]
        self.unacked: Dict[str, lease_pb2.TaskStatus] = {}
        self.outbox: Optional[asyncio.Queue] = None
        self.draining = False
        self.stopped = asyncio.Event()

    # -------------------------------------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        for slot in self.slots:
            self._start_slot(slot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._drain, f"signal {sig.name}")
        lost_since: Optional[float] = None
        try:
            while not self.stopped.is_set():
                try:
                    await self._session()
                    lost_since = None
                except Refused as e:
                    log.error("the agent refused this replica: %s", e)
                    return EXIT_REFUSED
                except grpc.aio.AioRpcError as e:
                    now = self.loop.time()
                    lost_since = lost_since or now
                    if now - lost_since > self.config.reconnect_seconds:
                        log.error("agent unreachable for %.0fs (%s); exiting", now - lost_since, e.details())
                        return 1
                    await asyncio.sleep(0.5)
            return 0
        finally:
            for slot in self.slots:
                slot.kill()

    def _drain(self, reason: str) -> None:
        log.info("draining: %s", reason)
        self.draining = True
        if all(slot.free for slot in self.slots) and not self.unacked:
            self.stopped.set()

    # ---------------------------------------------------------------------------------------------- session

    def _channel(self) -> grpc.aio.Channel:
        if self.config.agent_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.config.agent_ca.encode())
            return grpc.aio.secure_channel(self.config.agent_address, credentials, options=GRPC_OPTIONS)
        return grpc.aio.insecure_channel(self.config.agent_address, options=GRPC_OPTIONS)

    async def _session(self) -> None:
        async with self._channel() as channel:
            call = lease_pb2_grpc.LeaseServiceStub(channel).Connect()
            running = [s.lease_id for s in self.slots if s.lease_id]
            await call.write(
                lease_pb2.ReplicaMessage(
                    hello=lease_pb2.Hello(
                        protocol_version=PROTOCOL_VERSION,
                        environment_key=self.config.environment_key,
                        replica_id=self.config.replica_id,
                        token=self.config.token,
                        capacity=len(self.slots),
                        running_lease_ids=running,
                        worker_version=_worker_version(),
                    )
                )
            )
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
                    raise Refused(e.details()) from None
                raise
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                raise Refused("the agent closed the stream without a welcome")
            for lease_id in first.welcome.abandoned_lease_ids:
                self._stop_lease(lease_id, report=None)
            self.outbox = asyncio.Queue()
            for status in self.unacked.values():
                self.outbox.put_nowait(lease_pb2.ReplicaMessage(status=status))
            writer = asyncio.ensure_future(self._write(call))
            beat = asyncio.ensure_future(self._heartbeat(first.welcome.heartbeat_interval_seconds or 5.0))
            reader = asyncio.ensure_future(self._read(call))
            stopped = asyncio.ensure_future(self.stopped.wait())
            try:
                done, _ = await asyncio.wait({writer, reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopped and task.exception() is not None:
                        raise task.exception()
            finally:
                self.outbox = None
                for task in (writer, beat, reader, stopped):
                    task.cancel()
                call.cancel()

    async def _write(self, call) -> None:
        while True:
            await call.write(await self.outbox.get())

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._send(lease_pb2.ReplicaMessage(heartbeat=lease_pb2.Heartbeat(
                running_lease_ids=[s.lease_id for s in self.slots if s.lease_id])))

    async def _read(self, call) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "the agent closed the stream")
            kind = msg.WhichOneof("body")
            if kind == "assignment":
                self._assign(msg.assignment)
            elif kind == "ack":
                self.unacked.pop(msg.ack.lease_id, None)
                if self.draining:
                    self._drain("drain requested")
            elif kind == "cancel":
                self._stop_lease(
                    msg.cancel.lease_id,
                    report=lease_pb2.TaskStatus(
                        lease_id=msg.cancel.lease_id, phase=lease_pb2.CANCELLED, message=msg.cancel.reason
                    ),
                )
            elif kind == "drain":
                self._drain(msg.drain.reason or "the agent asked")

    def _send(self, msg: lease_pb2.ReplicaMessage) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(msg)

    def _report(self, status: lease_pb2.TaskStatus) -> None:
        self.unacked[status.lease_id] = status
        self._send(lease_pb2.ReplicaMessage(status=status))

    # ------------------------------------------------------------------------------------------- executors

    def _start_slot(self, slot: Slot) -> None:
        slot.start()
        self.loop.add_reader(slot.conn.fileno(), self._on_executor_readable, slot)

    def _assign(self, assignment: lease_pb2.Assignment) -> None:
        slot = next((s for s in self.slots if s.free), None)
        if slot is None or self.draining:
            # The agent never over-assigns; if it did, give the lease straight back so it is leased elsewhere.
            self._report(lease_pb2.TaskStatus(
                lease_id=assignment.lease_id, phase=lease_pb2.CANCELLED, message="replica has no free slot"))
            return
        slot.lease_id = assignment.lease_id
        slot.kill_reason = None
        slot.conn.send((assignment.lease_id, assignment.task.SerializeToString()))
        if assignment.task.timeout_seconds > 0:
            slot.timer = self.loop.call_later(
                assignment.task.timeout_seconds,
                self._stop_lease,
                assignment.lease_id,
                lease_pb2.TaskStatus(
                    lease_id=assignment.lease_id,
                    phase=lease_pb2.FAILED,
                    retryable=True,
                    message=f"Task {assignment.task.task_name} exceeded its timeout of "
                    f"{assignment.task.timeout_seconds:g}s and was stopped on replica {self.config.replica_id}.",
                ),
            )

    def _stop_lease(self, lease_id: str, report: Optional[lease_pb2.TaskStatus]) -> None:
        """Kill the executor running ``lease_id``; the death handler reports ``report`` and starts a new one."""
        for slot in self.slots:
            if slot.lease_id == lease_id:
                slot.kill_reason = report
                if report is None:
                    slot.lease_id = None  # abandoned: nobody wants a report
                slot.kill()
                return

    def _on_executor_readable(self, slot: Slot) -> None:
        try:
            lease_id, result = slot.conn.recv()
        except (EOFError, OSError):
            self._on_executor_died(slot)
            return
        expected = slot.lease_id
        self._finish_slot(slot)
        if lease_id != expected:
            return  # abandoned while it ran
        self._report(lease_pb2.TaskStatus(
            lease_id=lease_id,
            phase=lease_pb2.SUCCEEDED if result["phase"] == "succeeded" else lease_pb2.FAILED,
            outputs=result.get("outputs", b""),
            error=result.get("error", b""),
            message=result.get("message", ""),
            retryable=result.get("retryable", False),
            run_seconds=result.get("run_seconds", 0.0),
        ))
        self._after_slot_freed()

    def _on_executor_died(self, slot: Slot) -> None:
        self.loop.remove_reader(slot.conn.fileno())
        slot.process.join(timeout=5)
        code = slot.process.exitcode
        lease_id, reason = slot.lease_id, slot.kill_reason
        self._finish_slot(slot)
        slot.conn.close()
        if reason is not None:
            self._report(reason)
        elif lease_id is not None:
            self._report(lease_pb2.TaskStatus(
                lease_id=lease_id, phase=lease_pb2.LOST, message=_death_message(code, self.config.replica_id)))
        if not self.stopped.is_set():
            self._start_slot(slot)
        self._after_slot_freed()

    def _finish_slot(self, slot: Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        slot.lease_id = None
        slot.kill_reason = None

    def _after_slot_freed(self) -> None:
        if self.draining:
            self._drain("drain requested")


def _worker_version() -> str:
    from importlib import metadata

    for distribution in ("flytekitplugins-actor", "flyte-actors"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _death_message(code: Optional[int], replica_id: str) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (SIGKILL: often the container or host ran out of memory)" if -code == signal.SIGKILL else ""
        return f"The executor running the task on replica {replica_id} was killed by {name}{hint}."
    return f"The executor running the task on replica {replica_id} exited with code {code} (os._exit?)."


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=os.environ.get("FLYTE_ACTOR_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    _not_dumpable()
    config = Config.from_env()

    async def _main() -> int:
        return await ReplicaWorker(config).run()

    sys.exit(asyncio.run(_main()))


if __name__ == "__main__":
    main()
