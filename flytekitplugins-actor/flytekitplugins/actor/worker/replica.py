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
``FLYTE_ACTOR_QUEUE_DEPTH``         leases taken beyond the free slots and queued (default 31 per slot; 0: none)
``FLYTE_ACTOR_SCRATCH_DIR``         where task temp dirs and code bundles go (default: a temp dir)
``FLYTE_ACTOR_RECONNECT_SECONDS``   how long to keep trying to reach a lost agent before exiting (default 60)
``FLYTE_ACTOR_MEMORY_LIMIT_BYTES``  data memory each executor may use (RLIMIT_DATA; set by the local launcher)
==================================  =====================================================================

The token never reaches task code: it is read once and removed from this process's environment before any
executor starts (executors inherit the environment), and the process makes itself non-dumpable, so processes of
the same user (task code in executors, other replicas) cannot read it from ``/proc/<pid>/environ`` or memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import math
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional

import grpc

from ..protocol import GRPC_OPTIONS, PROTOCOL_VERSION, lease_pb2, lease_pb2_grpc

#: Exit code of a replica the agent refused (wrong token, unknown replica): restarting it cannot help.
EXIT_REFUSED = 3
#: Leases a replica takes beyond its free slots, per slot (the agent leases that many only of quick maps, and
#: bounds how many by each map's window: 7 for elements under 1 s, 31 for elements under 0.25 s).
QUEUE_DEPTH_PER_SLOT = 31
#: While a replica still runs or queues other leases, a finished one's status waits this long for the statuses
#: that follow it, and all go in one message (when the agent takes batches): one write per few tasks instead of
#: per task. The status of the last lease it holds goes at once, so a lone task waits for nothing.
STATUS_BATCH_SECONDS = 0.01
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
    queue_depth: int = 0

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
            queue_depth=int(env.get("FLYTE_ACTOR_QUEUE_DEPTH",
                                    QUEUE_DEPTH_PER_SLOT * int(env.get("FLYTE_ACTOR_PARALLELISM", "1")))),
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
        PR_SET_DUMPABLE = 4
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0)


class Refused(Exception):
    pass


class Progress(ctypes.Structure):
    """What an executor shares with its replica about the list of leases it was sent last: the position of the one
    it started last, and when it started it (``time.monotonic``, one clock for every process of the machine). The
    executor writes ``started`` before ``position``; a reader that sees the new position with the old time only
    times the element out later, never early (``ReplicaWorker._time_out`` checks again)."""

    _fields_ = [("position", ctypes.c_long), ("started", ctypes.c_double)]


class Slot:
    """One executor process and the leases it runs: one task, or a batch of one map's elements, which it runs in
    order (the first is running)."""

    def __init__(self, index: int, mp: multiprocessing.context.BaseContext, scratch_dir: str):
        self.index = index
        self._mp = mp
        self._scratch = os.path.join(scratch_dir, f"executor-{index}")
        self.process: Optional[multiprocessing.process.BaseProcess] = None
        self.conn = None
        self.leases: List[lease_pb2.Assignment] = []
        #: Leases of the batch nobody wants a result of any more (cancelled or abandoned before they started).
        self.dropped: set = set()
        self.kill_reason: Optional[lease_pb2.TaskStatus] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        #: Its executor said it retires (a task left a thread running): nothing more goes to it.
        self.retiring = False
        #: How many leases the executor was last sent, and (shared with it, a :class:`Progress`) which of them it
        #: started last and when: results of a batch's elements are sent a few at a time, so the first lease not
        #: answered yet may have finished already while a later one runs.
        self.sent = 0
        self.progress: Optional[Progress] = None

    def start(self) -> None:
        parent, child = self._mp.Pipe()
        self.progress = self._mp.RawValue(Progress)
        self.process = self._mp.Process(target=_executor_main, args=(child, self._scratch, self.progress), daemon=True)
        self.process.start()
        child.close()
        self.conn = parent

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    @property
    def lease_ids(self) -> List[str]:
        return [a.lease_id for a in self.leases if a.lease_id not in self.dropped]

    @property
    def running(self) -> int:
        """The position in ``leases`` of the lease the executor runs now (those before it finished; their results
        are on the way)."""
        answered = self.sent - len(self.leases)
        started = self.progress.position if self.progress is not None else answered
        return min(max(started - answered, 0), max(len(self.leases) - 1, 0))

    @property
    def free(self) -> bool:
        return not self.leases and not self.retiring


def _executor_main(conn, scratch_dir: str, progress=None) -> None:
    """An executor's entry point, named here so that this process never imports flytekit (the fork server that
    forks executors has it preloaded)."""
    from .executor import serve

    serve(conn, scratch_dir, progress)


class ReplicaWorker:
    def __init__(self, config: Config):
        self.config = config
        self.loop = asyncio.get_running_loop()
        mp = multiprocessing.get_context("forkserver")
        # Executors fork from a server that has flytekit imported already, so a replacement starts in milliseconds.
        mp.set_forkserver_preload(["flytekitplugins.actor.worker.executor"])
        if EXECUTOR_MODULE in sys.modules:
            start_forkserver()  # forked from a warm parent (the local launcher's zygote): fork the server too
        self.slots = [Slot(i, mp, config.scratch_dir) for i in range(config.parallelism)]
        #: Leases taken beyond the free slots, in the order they came.
        self.queued: Deque[lease_pb2.Assignment] = deque()
        self.unacked: Dict[str, lease_pb2.TaskStatus] = {}
        #: The agent takes StatusBatch and sends batches (its Welcome said so).
        self.batches = False
        #: A Welcome came on the current stream (the agent was reachable; see ``run``).
        self.welcomed = False
        self.outbox: Optional[asyncio.Queue] = None
        self.draining = False
        self.stopped = asyncio.Event()
        #: The signal that drained this replica, if one did: it exits by that signal, so whoever started it can
        #: tell "stopped from outside" from "failed".
        self.signalled: Optional[signal.Signals] = None

    # -------------------------------------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        for slot in self.slots:
            self._start_slot(slot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
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
                    if self.welcomed:  # the stream was up until now: the agent is lost from now, not from before
                        lost_since, self.welcomed = None, False
                    lost_since = lost_since or now
                    if now - lost_since > self.config.reconnect_seconds:
                        log.error("agent unreachable for %.0fs (%s); exiting", now - lost_since, e.details())
                        return 1
                    await asyncio.sleep(0.5)
            return 0
        finally:
            for slot in self.slots:
                slot.kill()

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signalled = sig
        self._drain(f"signal {sig.name}")

    def _drain(self, reason: str) -> None:
        log.info("draining: %s", reason)
        self.draining = True
        while self.queued:
            self._give_back(self.queued.popleft(), f"replica {self.config.replica_id} is stopping: {reason}")
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
            # Every lease still held, reported-but-unacked ones too: the agent re-leases those we do not list.
            running = self._held() + [l for l in self.unacked if l]
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
                        queue_depth=self.config.queue_depth,
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
            self.welcomed = True
            self.batches = first.welcome.batches
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
            message = await self.outbox.get()
            batched = self.batches and message.WhichOneof("body") == "status"
            if batched and self._held():
                await asyncio.sleep(STATUS_BATCH_SECONDS)
            if batched and not self.outbox.empty():
                statuses = [message.status]
                rest = []
                while not self.outbox.empty():
                    more = self.outbox.get_nowait()
                    (statuses.append(more.status) if more.WhichOneof("body") == "status" else rest.append(more))
                message = lease_pb2.ReplicaMessage()
                message.statuses.statuses.extend(statuses)
                await call.write(message)
                for message in rest:
                    await call.write(message)
                continue
            await call.write(message)

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._send(lease_pb2.ReplicaMessage(heartbeat=lease_pb2.Heartbeat(running_lease_ids=self._held())))

    def _held(self) -> List[str]:
        """Every lease this replica runs or will run: in its slots and queued."""
        return [l for s in self.slots for l in s.lease_ids] + [a.lease_id for a in self.queued]

    async def _read(self, call) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "the agent closed the stream")
            try:
                self._handle(msg)
            except Exception as e:  # noqa: BLE001 - one bad message must not take the replica down
                log.exception("could not handle a %s message from the agent", msg.WhichOneof("body"))
                kind = msg.WhichOneof("body")
                leases = ([msg.assignment.lease_id] if kind == "assignment" else
                          [a.lease_id for a in msg.assignments.assignments] if kind == "assignments" else [])
                held = self._held()
                for lease_id in leases:
                    if lease_id not in held:
                        self._report(lease_pb2.TaskStatus(
                            lease_id=lease_id, phase=lease_pb2.LOST,
                            message=f"replica {self.config.replica_id} could not start the task: {e!r}"))

    def _handle(self, msg: lease_pb2.AgentMessage) -> None:
        kind = msg.WhichOneof("body")
        if kind == "assignment":
            self._assign([msg.assignment])
        elif kind == "assignments":
            self._assign(msg.assignments.assignments)
        elif kind == "ack":
            self.unacked.pop(msg.ack.lease_id, None)
            for lease_id in msg.ack.lease_ids:
                self.unacked.pop(lease_id, None)
            if self.draining:
                self._drain("drain requested")
        elif kind == "cancel":
            self._stop_lease(
                msg.cancel.lease_id,
                report=lease_pb2.TaskStatus(
                    lease_id=msg.cancel.lease_id, phase=lease_pb2.CANCELLED, message=msg.cancel.reason
                ),
            )
        elif kind == "recall":
            # Queued leases no executor has: give them back to run elsewhere (those in an executor's batch stay:
            # taking one back would run it twice).
            while self.queued:
                self._give_back(self.queued.popleft(), f"recalled by the agent: {msg.recall.reason}")
        elif kind == "drain":
            self._drain(msg.drain.reason or "the agent asked")

    def _send(self, msg: lease_pb2.ReplicaMessage) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(msg)

    def _report(self, status: lease_pb2.TaskStatus) -> None:
        # With the start line in _assign, these bound each task's slice of the replica's log (its log links).
        log.info("task end: %s %s (lease %s)", _task_key(status.lease_id),
                 lease_pb2.TaskPhase.Name(status.phase), status.lease_id)
        self.unacked[status.lease_id] = status
        self._send(lease_pb2.ReplicaMessage(status=status))

    # ------------------------------------------------------------------------------------------- executors

    def _start_slot(self, slot: Slot) -> None:
        slot.start()
        self.loop.add_reader(slot.conn.fileno(), self._on_executor_readable, slot)

    def _assign(self, assignments) -> None:
        """Queue new leases, then start what free slots can take."""
        for assignment in assignments:
            if self.draining or len(self._held()) >= len(self.slots) + self.config.queue_depth:
                # The agent never over-assigns; if it did, give the lease straight back so it is leased elsewhere.
                reason = "replica is stopping" if self.draining else "replica has no free slot"
                self._give_back(assignment, reason)
                continue
            self.queued.append(assignment)
        self._start_queued()

    def _start_queued(self) -> None:
        """Give queued leases to free slots: a lone task, or the first lease and the queued elements of the same
        map after it (``batch_key``), shared out among the free slots."""
        free = [s for s in self.slots if s.free]
        while free and self.queued:
            slot = free.pop()
            head = self.queued.popleft()
            batch = [head]
            key = head.task.batch_key
            if key:
                share = math.ceil(sum(1 for a in self.queued if a.task.batch_key == key) / (len(free) + 1))
                rest = deque()
                while self.queued and len(batch) <= share:
                    nxt = self.queued.popleft()
                    (batch if nxt.task.batch_key == key else rest).append(nxt)
                rest.extend(self.queued)
                self.queued = rest
            self._run(slot, batch)

    def _run(self, slot: Slot, batch: List[lease_pb2.Assignment]) -> None:
        for assignment in batch:
            log.info("task start: %s %s (lease %s)", _task_key(assignment.lease_id), assignment.task.task_name,
                     assignment.lease_id)
        slot.leases = list(batch)
        slot.dropped = set()
        slot.kill_reason = None
        slot.sent = len(batch)
        if slot.progress is not None:
            slot.progress.position, slot.progress.started = 0, time.monotonic()
        slot.conn.send([(a.lease_id, a.task.SerializeToString()) for a in batch])
        self._arm_timeout(slot)

    def _arm_timeout(self, slot: Slot) -> None:
        """Time the lease of ``slot`` running now from when it started (the executor says when, see
        :class:`Progress`); when the time is up, :meth:`_time_out` stops the lease running then if its own time
        is up, and times it otherwise."""
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        if not slot.leases or slot.leases[0].task.timeout_seconds <= 0:
            return
        slot.timer = self.loop.call_later(max(self._time_left(slot), 0.0), self._time_out, slot)

    @staticmethod
    def _time_left(slot: Slot) -> float:
        """Seconds until the lease running in ``slot`` has run for its timeout (elements of a batch share one)."""
        started = slot.progress.started if slot.progress is not None else time.monotonic()
        return started + slot.leases[0].task.timeout_seconds - time.monotonic()

    def _time_out(self, slot: Slot) -> None:
        slot.timer = None
        if not slot.leases:
            return
        left = self._time_left(slot)
        if left > 0:  # a later element started since the timer was set: its own time is not up
            slot.timer = self.loop.call_later(left, self._time_out, slot)
            return
        assignment = slot.leases[slot.running]
        self._stop_lease(assignment.lease_id, lease_pb2.TaskStatus(
            lease_id=assignment.lease_id,
            phase=lease_pb2.FAILED,
            retryable=True,
            message=f"Task {assignment.task.task_name} exceeded its timeout of "
            f"{assignment.task.timeout_seconds:g}s and was stopped on replica {self.config.replica_id}.",
        ))

    def _give_back(self, assignment: lease_pb2.Assignment, reason: str) -> None:
        """Return a lease that was never started (CANCELLED): the agent leases it again and counts no failure."""
        self._report(lease_pb2.TaskStatus(lease_id=assignment.lease_id, phase=lease_pb2.CANCELLED, message=reason))

    def _stop_lease(self, lease_id: str, report: Optional[lease_pb2.TaskStatus]) -> None:
        """Stop ``lease_id``, reporting ``report`` for it (None: nobody wants a report). A queued lease is just
        dropped; a running one's executor is killed (the death handler reports and starts a new one)."""
        for assignment in self.queued:
            if assignment.lease_id == lease_id:
                self.queued.remove(assignment)
                if report is not None:
                    self._report(report)
                return
        for slot in self.slots:
            if slot.leases and slot.leases[slot.running].lease_id == lease_id:
                slot.kill_reason = report
                if report is None:
                    slot.dropped.add(lease_id)  # abandoned: nobody wants a report
                slot.kill()
                return
            if lease_id in slot.lease_ids:  # in a batch, not running: its result will be thrown away
                slot.dropped.add(lease_id)
                if report is not None:
                    self._report(report)
                return

    def _on_executor_readable(self, slot: Slot) -> None:
        try:
            results = slot.conn.recv()
        except (EOFError, OSError):
            self._on_executor_died(slot)
            return
        for lease_id, result in results:
            if not lease_id and "retire" in result:
                # Its task left a thread running: it hands back what it was sent and exits once we say goodbye;
                # the slot gets a clean executor when it has (_on_executor_died).
                log.info("replacing executor %d: %s", slot.index, result["retire"])
                slot.retiring = True
                slot.conn.send([])
                continue
            if not slot.leases or slot.leases[0].lease_id != lease_id:
                log.warning("executor %d sent a result for lease %s, which it was not running", slot.index, lease_id)
                continue
            assignment = slot.leases.pop(0)
            if lease_id in slot.dropped:
                slot.dropped.discard(lease_id)
            elif "not_started" in result:
                self._give_back(assignment, f"executor {slot.index} of replica {self.config.replica_id} was replaced "
                                "before it started the task")
            else:
                self._report(_status_of(lease_id, result))
        self._arm_timeout(slot)
        if not slot.leases and not slot.retiring:
            self._finish_slot(slot)
            self._after_slot_freed()

    def _on_executor_died(self, slot: Slot) -> None:
        """The running lease is lost (or ends as its kill said); the others go back to be leased again: those
        after it never started, those before it finished but their results died with the executor."""
        self.loop.remove_reader(slot.conn.fileno())
        slot.process.join(timeout=5)
        code = slot.process.exitcode
        batch, reason, dropped, running = slot.leases, slot.kill_reason, slot.dropped, slot.running
        self._finish_slot(slot)
        slot.conn.close()
        for position, assignment in enumerate(batch):
            if assignment.lease_id in dropped:
                continue
            if position == running:
                self._report(reason if reason is not None else lease_pb2.TaskStatus(
                    lease_id=assignment.lease_id, phase=lease_pb2.LOST,
                    message=_death_message(code, self.config.replica_id)))
            else:
                self._give_back(assignment, f"the executor on replica {self.config.replica_id} stopped " + (
                    "before the task started" if position > running else "before it sent the task's result"))
        if not self.stopped.is_set():
            self._start_slot(slot)
        self._after_slot_freed()

    def _finish_slot(self, slot: Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        slot.leases = []
        slot.dropped = set()
        slot.kill_reason = None
        slot.retiring = False

    def _after_slot_freed(self) -> None:
        if self.draining:
            self._drain("drain requested")
        else:
            self._start_queued()


def _task_key(lease_id: str) -> str:
    """The task execution a lease runs (project/domain/execution/node/attempt): lease ids end with it."""
    return lease_id.partition("|")[2] or lease_id


#: A status's message and error document are cut to these sizes, so that no report is a large stream message
#: (the full error.pb is in the task's output prefix).
MAX_STATUS_MESSAGE_CHARS = 64 * 1024
MAX_STATUS_ERROR_BYTES = 1024 * 1024


def _status_of(lease_id: str, result: dict) -> lease_pb2.TaskStatus:
    """The report of an executor's result; large outputs come by size only (they are in the output prefix)."""
    message, error = result.get("message", ""), result.get("error", b"")
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = message[:MAX_STATUS_MESSAGE_CHARS] + f"... ({len(message)} characters; cut)"
    return lease_pb2.TaskStatus(
        lease_id=lease_id,
        phase=lease_pb2.SUCCEEDED if result["phase"] == "succeeded" else lease_pb2.FAILED,
        outputs=result.get("outputs", b""),
        error=error if len(error) <= MAX_STATUS_ERROR_BYTES else b"",
        message=message,
        retryable=result.get("retryable", False),
        run_seconds=result.get("run_seconds", 0.0),
        outputs_in_prefix=result.get("outputs_in_prefix", False),
        outputs_size=result.get("outputs_size", 0),
        system_error=result.get("system_error", False),
        outputs_group=result.get("outputs_group", ""),
    )


EXECUTOR_MODULE = "flytekitplugins.actor.worker.executor"


def start_forkserver() -> bool:
    """Start multiprocessing's fork server for this process by forking it from this process, which already has
    flytekit imported, instead of by running a fresh interpreter that imports it again (about a second of CPU).
    Call it before any thread or gRPC channel exists. The server then works as usual (preload modules are imported
    in it, most already are). Returns False, starting nothing, where multiprocessing's internals are not the ones
    this was written against (Python 3.11 and 3.12); the usual start then happens on first use."""
    from multiprocessing import connection, forkserver, resource_tracker, util

    server = getattr(forkserver, "_forkserver", None)
    needed = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_preload_modules", "_lock")
    if sys.version_info >= (3, 13) or server is None or not all(hasattr(server, a) for a in needed):
        return False
    import socket

    with server._lock:
        if server._forkserver_pid is not None:
            return True
        resource_tracker.ensure_running()
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")
            listener.bind(address)
            if not util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.close(alive_w)
                    forkserver.main(listener.fileno(), alive_r, list(server._preload_modules))
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 0
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
    return True


@functools.lru_cache(maxsize=1)
def _worker_version() -> str:
    """This plugin's version, for Hello (read once: looking a distribution up costs ~15 ms of CPU)."""
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


class _Formatter(logging.Formatter):
    """logging's line (``%(asctime)s`` as logging writes it), with the date and time formatted once per second
    instead of once per line: a replica writes two lines per task (see ``_run`` and ``_report``)."""

    _second: Optional[int] = None
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)


def warm_up() -> None:
    """What a warm parent (the local launcher's zygote) reads once for all the replicas it forks."""
    _worker_version()


def main(argv: Optional[List[str]] = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=os.environ.get("FLYTE_ACTOR_LOG_LEVEL", "INFO"), handlers=[handler])
    _not_dumpable()
    config = Config.from_env()

    workers: List[ReplicaWorker] = []

    async def _main() -> int:
        workers.append(ReplicaWorker(config))
        return await workers[0].run()

    code = asyncio.run(_main())
    if workers and workers[0].signalled is not None:
        # Drained by a signal: exit by it, so the launcher sees a replica stopped from outside, not a failure.
        logging.shutdown()
        signal.signal(workers[0].signalled, signal.SIG_DFL)
        os.kill(os.getpid(), workers[0].signalled)
    sys.exit(code)


if __name__ == "__main__":
    main()
