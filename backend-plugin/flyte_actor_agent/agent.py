"""The actor agent's reactor: one asyncio loop, in its own thread, that owns the scheduler and carries out its
effects through the lease service (gRPC streams to replicas) and a launcher (processes or pods).

Every event (a task submitted by the connector, a message from a replica, a replica exiting, a deadline) is
handled on this loop: the scheduler needs no locks, and dispatch happens the moment a task or a free slot
appears. Other threads (the connector's gRPC server, a local ``pyflyte run``) call in through :meth:`call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import grpc

from flytekitplugins.actor.protocol import lease_pb2, lease_pb2_grpc
from flytekitplugins.actor.worker.replica import GRPC_OPTIONS, PROTOCOL_VERSION

from . import scheduler as core
from .launchers import Launcher, OnExit, ReplicaLaunch
from .metrics import Metrics

log = logging.getLogger("flyte-actor-agent")

HEARTBEAT_INTERVAL_SECONDS = 5.0
#: Heartbeats a replica may miss before it counts as lost (a closed stream is noticed at once; this catches
#: half-open connections, generously, since a busy machine can delay a replica's heartbeat).
HEARTBEAT_MISSES = 6


@dataclass
class TaskView:
    """A snapshot of a task or actor map, safe to read from any thread."""

    key: str
    phase: core.Phase
    message: str
    outputs: Optional[bytes] = None
    error: Optional[bytes] = None
    replica_id: Optional[str] = None
    #: Queued while no replica of its fleet is ready (they are starting, or cannot start).
    waiting_for_replicas: bool = False
    #: Running: where its replica runs (the launcher's placement: pod name, namespace, ...) and when the task
    #: started there (epoch seconds), for log links.
    placement: Optional[Dict[str, Any]] = None
    started_at: Optional[float] = None
    # Actor maps only.
    size: int = 0
    succeeded: int = 0
    failed: int = 0
    element_outputs: List[Optional[bytes]] = field(default_factory=list)


class ActorAgent:
    """Start with :meth:`start`, stop with :meth:`stop`; everything else is safe to call from any thread."""

    def __init__(
        self,
        launcher_factory: Callable[[OnExit], Launcher],
        lease_host: str = "127.0.0.1",
        lease_port: int = 0,
        advertise_host: Optional[str] = None,
        advertised_port: Optional[int] = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS,
        metrics: Optional[Metrics] = None,
        max_ttl_seconds: Optional[float] = None,
        recovery_grace: float = 60.0,
        **scheduler_options: Any,
    ):
        self._launcher_factory = launcher_factory
        self._lease_host = lease_host
        self._lease_port = lease_port
        self._advertise_host = advertise_host
        self._advertised_port = advertised_port
        self.max_ttl_seconds = max_ttl_seconds
        self.recovery_grace = recovery_grace
        self._recovering_until = 0.0
        self.heartbeat_interval = heartbeat_interval
        self.metrics = metrics or Metrics()
        self.scheduler = core.Scheduler(
            clock=time.monotonic, heartbeat_timeout=HEARTBEAT_MISSES * heartbeat_interval, **scheduler_options
        )
        self.loop = asyncio.new_event_loop()
        self.launcher: Optional[Launcher] = None
        self.lease_address = ""
        self._thread = threading.Thread(target=self.loop.run_forever, name="actor-agent", daemon=True)
        self._server: Optional[grpc.aio.Server] = None
        self._streams: Dict[str, asyncio.Queue] = {}
        self._waiters: Dict[str, List[asyncio.Future]] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self._background: set = set()
        self._stopped = False

    # -------------------------------------------------------------------------------------- thread-safe API

    def start(self) -> "ActorAgent":
        self._thread.start()
        self.call(self._start).result(timeout=30)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._stopped or not self._thread.is_alive():
            return
        self._stopped = True
        try:
            self.call(self._stop).result(timeout=timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    def call(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` (a function or coroutine function) on the agent loop; returns its future."""

        async def run():
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    # ------------------------------------------------------------------------ loop-side API (for the connector)

    def submit(self, request: core.TaskRequest) -> None:
        if self._known(request.key):
            return  # a retried CreateTask
        self.metrics.submitted(request.fleet.name)
        self._apply(self.scheduler.submit(request))

    def submit_map(self, key: str, fleet: core.Fleet.Spec, size: int, make_element, concurrency, ratio) -> None:
        if self._known(key):
            return
        self.metrics.submitted(fleet.name)
        self._apply(self.scheduler.submit_map(key, fleet, size, make_element, concurrency, ratio))

    def _known(self, key: str) -> bool:
        return key in self.scheduler.tasks or key in self.scheduler.maps

    def cancel(self, key: str, reason: str) -> None:
        self._apply(self.scheduler.cancel(key, reason))

    def forget(self, key: str) -> None:
        self.scheduler.forget(key)

    def view(self, key: str) -> Optional[TaskView]:
        job = self.scheduler.maps.get(key)
        if job is not None:
            return TaskView(
                key=key,
                phase=job.phase,
                message=job.message or f"{job.succeeded + job.failed} of {job.size} elements done",
                size=job.size,
                succeeded=job.succeeded,
                failed=job.failed,
                element_outputs=job.outputs if job.phase is core.Phase.SUCCEEDED else [],
            )
        task = self.scheduler.tasks.get(key)
        if task is None:
            if time.monotonic() < self._recovering_until:
                return TaskView(key, core.Phase.RUNNING, "the actor agent restarted; waiting for a replica to report "
                                "this task (up to --recovery-grace-seconds)")
            return None
        message, waiting = task.message, False
        if task.phase is core.Phase.QUEUED:
            fleet = self.scheduler.fleets[task.fleet_key]
            waiting = not any(r.state is core.ReplicaState.READY for r in fleet.replicas.values())
            message = self._queued_message(fleet)
        elif task.phase is core.Phase.RUNNING:
            message = f"running on replica {task.replica_id}"
            return TaskView(key, task.phase, message, replica_id=task.replica_id, **self._placement(task))
        return TaskView(key, task.phase, message, task.outputs, task.error, task.replica_id, waiting)

    def _placement(self, task: core.TaskState) -> Dict[str, Any]:
        placement = self.launcher.placement(task.replica_id) if self.launcher and task.replica_id else None
        started = time.time() - (time.monotonic() - task.started_at) if task.started_at is not None else None
        return {"placement": placement, "started_at": started}

    async def wait(self, key: str) -> Optional[TaskView]:
        """Wait until ``key`` reaches a terminal phase, without polling."""
        view = self.view(key)
        if view is None or view.phase.terminal:
            return view
        future = self.loop.create_future()
        self._waiters.setdefault(key, []).append(future)
        await future
        return self.view(key)

    def _queued_message(self, fleet: core.Fleet) -> str:
        starting = sum(1 for r in fleet.replicas.values() if r.state is core.ReplicaState.STARTING)
        ready = sum(1 for r in fleet.replicas.values() if r.state is core.ReplicaState.READY)
        waiting = self.scheduler.waiting_reason(fleet.spec.key)
        return (
            f"queued for actor environment {fleet.spec.name!r}: {len(fleet.queue)} waiting, {ready} replicas ready, "
            f"{starting} starting (up to {fleet.spec.replica_count})" + (f"; waiting for resources: {waiting}"
                                                                           if waiting and not ready else "")
        )

    # ------------------------------------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        self.launcher = self._launcher_factory(self._on_replica_exit)
        self.launcher.on_waiting = self._on_replica_waiting
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(_LeaseServicer(self), self._server)
        port = self._server.add_insecure_port(f"{self._lease_host}:{self._lease_port}")
        if port == 0:
            raise OSError(f"cannot listen for replicas on {self._lease_host}:{self._lease_port}")
        await self._server.start()
        self.lease_address = f"{self._advertise_host or self._lease_host}:{self._advertised_port or port}"
        log.info("lease service listening on port %s; replicas dial %s", port, self.lease_address)
        if self.launcher.replicas_outlive_agent:
            adopted = await self.launcher.adopt()
            for replica in adopted:
                self.scheduler.adopt_replica(replica.replica_id, replica.token, _fleet_of(replica, self.max_ttl_seconds))
            if adopted:
                log.info("adopted %d replicas left by a previous agent", len(adopted))
            # Tasks GetTask asks about that this agent does not know may still be running on a replica.
            self._recovering_until = time.monotonic() + self.recovery_grace
            self._arm_timer()

    def shutdown(self, grace: float) -> None:
        """Graceful stop of a served agent: take no new work, let running tasks finish for up to ``grace``
        seconds, then stop. A launcher whose replicas outlive the agent (Kubernetes) leaves them running."""
        deadline = time.monotonic() + grace
        self.call(setattr, self.scheduler, "draining", True).result(timeout=10)
        while time.monotonic() < deadline and self.call(lambda: bool(self.scheduler.leases)).result(timeout=10):
            time.sleep(0.2)
        self.stop()

    async def _stop(self) -> None:
        if self.launcher is not None and self.launcher.replicas_outlive_agent:
            # Leave replicas and their leases alone: they reconnect to the next agent, which adopts them.
            self.scheduler.draining = True
        else:
            self._apply(self.scheduler.drain())
        if self.launcher is not None:
            await self.launcher.close()
        if self._server is not None:
            await self._server.stop(grace=1)
        if self._timer is not None:
            self._timer.cancel()

    # --------------------------------------------------------------------------------------------- effects

    def _apply(self, effects: List[core.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, core.Assign):
                self.metrics.dispatched(effect.task)
                message = lease_pb2.AgentMessage()
                message.assignment.lease_id = effect.lease_id
                message.assignment.task.MergeFromString(effect.task.payload)  # the connector's TaskSpec bytes
                self._send(effect.replica_id, message)
            elif isinstance(effect, core.Ack):
                self._send(effect.replica_id, lease_pb2.AgentMessage(ack=lease_pb2.Ack(lease_id=effect.lease_id)))
            elif isinstance(effect, core.CancelLease):
                self._send(effect.replica_id, lease_pb2.AgentMessage(
                    cancel=lease_pb2.Cancel(lease_id=effect.lease_id, reason=effect.reason)))
            elif isinstance(effect, core.Finished):
                self._finished(effect.key)
            elif isinstance(effect, core.Launch):
                self.metrics.replica_event(effect.fleet.name, "launched")
                self._background_task(self._launch(effect))
            elif isinstance(effect, core.Stop):
                self.metrics.replica_event(self._fleet_name(effect.replica_id), "stop requested")
                queue = self._streams.get(effect.replica_id)
                if queue is not None:
                    queue.put_nowait(lease_pb2.AgentMessage(drain=lease_pb2.Drain(reason=effect.reason)))
                self._background_task(self.launcher.stop(effect.replica_id, effect.reason))
        self._arm_timer()

    def _finished(self, key: str) -> None:
        view = self.view(key)
        if view is not None:
            self.metrics.finished(view)
        for future in self._waiters.pop(key, []):
            if not future.done():
                future.set_result(None)

    def _send(self, replica_id: str, message: lease_pb2.AgentMessage) -> None:
        queue = self._streams.get(replica_id)
        if queue is not None:
            queue.put_nowait(message)

    async def _launch(self, launch: core.Launch) -> None:
        spec = launch.fleet.extra
        try:
            await self.launcher.launch(ReplicaLaunch(
                replica_id=launch.replica_id,
                token=launch.token,
                fleet_key=launch.fleet.key,
                environment=spec["environment"],
                agent_address=self.lease_address,
                context=spec.get("context", {}),
            ))
        except Exception as e:  # noqa: BLE001 - any launch failure is a start failure of this replica
            log.exception("launching replica %s failed", launch.replica_id)
            self._on_replica_exit(launch.replica_id, f"could not launch the replica: {e}")

    def _on_replica_exit(self, replica_id: str, cause: str) -> None:
        log.info("replica %s gone: %s", replica_id, cause.splitlines()[0] if cause else "")
        queue = self._streams.pop(replica_id, None)
        if queue is not None:
            queue.put_nowait(None)
        self._replica_gone(replica_id, cause)

    def _on_replica_waiting(self, replica_id: str, reason: Optional[str]) -> None:
        if reason:
            log.info("replica %s waits for resources: %s", replica_id, reason)
        self._apply(self.scheduler.replica_waiting(replica_id, reason))

    def _replica_gone(self, replica_id: str, cause: str) -> None:
        if replica_id in self.scheduler.replicas:
            self.metrics.replica_gone(self._fleet_name(replica_id), cause)
        self._apply(self.scheduler.replica_gone(replica_id, cause))

    def _fleet_name(self, replica_id: str) -> str:
        replica = self.scheduler.replicas.get(replica_id)
        return self.scheduler.fleets[replica.fleet_key].spec.name if replica else ""

    def _background_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _arm_timer(self) -> None:
        """Sleep exactly until the scheduler's next deadline (TTL, lease deadline, heartbeat), never poll."""
        deadline = self.scheduler.next_deadline()
        if self._timer is not None:
            if deadline is not None and abs(self._timer.when() - self._loop_time(deadline)) < 0.01:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(self._loop_time(deadline) + 0.001, self._tick)

    def _loop_time(self, monotonic: float) -> float:
        return self.loop.time() + (monotonic - time.monotonic())

    def _tick(self) -> None:
        self._timer = None
        self._apply(self.scheduler.tick())


def _fleet_of(replica, max_ttl: Optional[float]) -> core.Fleet.Spec:
    environment = replica.environment
    ttl = min(environment.ttl_seconds, max_ttl) if max_ttl else environment.ttl_seconds
    return core.Fleet.Spec(
        key=replica.fleet_key,
        name=environment.name,
        replica_count=environment.replica_count,
        ttl_seconds=ttl,
        parallelism=environment.parallelism,
        extra={"environment": environment, "context": replica.context},
        lineage=f"{environment.name}.{replica.context.get('namespace', '')}",
    )


class _LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    """One Connect stream per replica: reads its messages into the scheduler, writes the agent's to it."""

    def __init__(self, agent: ActorAgent):
        self.agent = agent

    async def Connect(self, request_iterator, context):
        agent = self.agent
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message on a lease stream must be Hello")
        hello = first.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease protocol version {hello.protocol_version} is not supported (this agent speaks "
                f"{PROTOCOL_VERSION}); use the same flytekitplugins-actor version in the image and the agent",
            )
        replica_id = hello.replica_id
        queue: asyncio.Queue = asyncio.Queue()
        running = list(hello.running_lease_ids)
        effects = agent.scheduler.replica_connected(replica_id, hello.token, hello.environment_key, hello.capacity, running)
        refusal = next((e for e in effects if isinstance(e, core.Refuse)), None)
        if refusal is not None:
            log.warning("refused replica: %s", refusal.reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal.reason)
        old = agent._streams.pop(replica_id, None)
        if old is not None:
            old.put_nowait(None)
        agent._streams[replica_id] = queue
        await context.write(lease_pb2.AgentMessage(welcome=lease_pb2.Welcome(
            heartbeat_interval_seconds=agent.heartbeat_interval,
            abandoned_lease_ids=agent.scheduler.abandoned_leases(replica_id, running),
        )))
        agent.metrics.replica_event(agent._fleet_name(replica_id), "connected")
        log.info("replica %s connected (worker %s, capacity %d)", replica_id, hello.worker_version, hello.capacity)
        agent._apply(effects)
        reader = asyncio.ensure_future(self._read(context, replica_id))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    break
                message = getter.result()
                if message is None:
                    break
                await context.write(message)
        finally:
            reader.cancel()
            if getter is not None:
                getter.cancel()
            if agent._streams.get(replica_id) is queue:
                # The stream ended while the replica was still ours: treat it as lost.
                del agent._streams[replica_id]
                agent._replica_gone(replica_id, "its lease stream closed")

    async def _read(self, context, replica_id: str) -> None:
        agent = self.agent
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("body")
            if kind == "heartbeat":
                agent.scheduler.heartbeat(replica_id)
            elif kind == "status":
                status = message.status
                outcome = _OUTCOMES.get(status.phase)
                if outcome is None:
                    log.warning("replica %s sent a status with no phase for lease %s", replica_id, status.lease_id)
                    continue
                agent.metrics.ran(status.run_seconds)
                agent._apply(agent.scheduler.report(
                    replica_id,
                    status.lease_id,
                    outcome,
                    outputs=status.outputs,
                    error=status.error or None,
                    message=status.message,
                    retryable=status.retryable,
                ))


_OUTCOMES = {
    lease_pb2.SUCCEEDED: core.Outcome.SUCCEEDED,
    lease_pb2.FAILED: core.Outcome.FAILED,
    lease_pb2.LOST: core.Outcome.LOST,
    lease_pb2.CANCELLED: core.Outcome.CANCELLED,
}
