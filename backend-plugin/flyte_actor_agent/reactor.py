"""The actor agent's reactor: one asyncio loop, in its own thread, that owns the scheduler and carries out its
effects through a replica channel (the lease service's streams) and a launcher (processes or pods).

Every event (a task submitted by the connector, a message from a replica, a replica exiting, a deadline) is
handled on this loop: the scheduler needs no locks, and dispatch happens the moment a task or a free slot
appears. Other threads (the connector's gRPC server, a local ``pyflyte run``) call in through :meth:`call`.

    connector ──call──> Reactor ──effects──> ReplicaChannel (lease_service.py) ──stream──> replicas
                           │   └──effects──> Launcher (launchers/) ──processes / pods
                           └── scheduler.py (pure core)
    lease service ──events (public methods below)──> Reactor
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Union

from . import scheduler as core
from .launchers import LaunchRefused, Launcher, OnExit, ReplicaLaunch
from .metrics import Metrics
from .placement import fleet_config
from .views import TaskView, task_view

log = logging.getLogger("flyte-actor-agent")

HEARTBEAT_INTERVAL_SECONDS = 5.0
#: Heartbeats a replica may miss before it counts as lost (a closed stream is noticed at once; this catches
#: half-open connections, generously, since a busy machine can delay a replica's heartbeat).
HEARTBEAT_MISSES = 6
#: How late the reactor may notice a changed deadline (TTLs, heartbeats and lease timeouts are seconds or more).
REARM_SECONDS = 0.05

#: What the reactor asks a replica channel to deliver: a lease, an ack, a cancel, a recall, or (for ``Stop``) a drain.
Delivery = Union[core.Assign, core.Ack, core.CancelLease, core.Recall, core.Stop]


class ReplicaChannel(Protocol):
    """How the reactor reaches connected replicas (implemented by :class:`.lease_service.LeaseService`)."""

    #: host:port replicas dial.
    address: str
    #: PEM of the CA replicas verify the channel's TLS certificate with ("": plain gRPC).
    ca_certificate: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def deliver(self, effect: Delivery) -> None:
        """Send ``effect`` to its replica if it is connected (a replica that is not gets it on reconnect, or
        is lost and its leases handed out again)."""

    def close(self, replica_id: str) -> None:
        """End the replica's stream, if any."""


class Reactor:
    """Start with :meth:`start`, stop with :meth:`stop`; everything else runs on the reactor's loop (use
    :meth:`call` from other threads)."""

    def __init__(
        self,
        launcher_factory: Callable[[OnExit], Launcher],
        heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS,
        metrics: Optional[Metrics] = None,
        max_ttl_seconds: Optional[float] = None,
        recovery_grace: float = 60.0,
        **scheduler_options: Any,
    ):
        self._launcher_factory = launcher_factory
        self.max_ttl_seconds = max_ttl_seconds
        self.recovery_grace = recovery_grace
        self._recovering_until = 0.0
        self._parked: List[Callable[[], List[core.Effect]]] = []
        self.heartbeat_interval = heartbeat_interval
        self.metrics = metrics or Metrics()
        scheduler_options.setdefault("ghost_grace", heartbeat_interval)
        self.scheduler = core.Scheduler(
            clock=time.monotonic, heartbeat_timeout=HEARTBEAT_MISSES * heartbeat_interval, **scheduler_options
        )
        self.loop = asyncio.new_event_loop()
        self.launcher: Optional[Launcher] = None
        self.channel: Optional[ReplicaChannel] = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="actor-agent", daemon=True)
        self._waiters: Dict[str, List[asyncio.Future]] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self._rearm: Optional[asyncio.TimerHandle] = None
        self._background: set = set()
        self._stopped = False
        #: Finished tasks and maps whose result no GetTask has read yet: a draining agent waits for them.
        self._unread: set = set()
        self._prune_at = 1024
        #: The final view of each finished task and map the scheduler still knows, for :meth:`final_view`: set on
        #: the loop, read from any thread (one dict lookup holds the GIL throughout; a view is never changed
        #: once final). ``_read``: the keys read there, added from any thread, consulted and pruned on the loop.
        self._final: Dict[str, TaskView] = {}
        self._read: set = set()

    # -------------------------------------------------------------------------------------- thread-safe API

    def start(self, channel_factory: Callable[["Reactor"], ReplicaChannel]) -> "Reactor":
        """Start the loop, the replica channel made by ``channel_factory(self)``, and the launcher."""
        self._thread.start()
        self.call(self._start, channel_factory).result(timeout=30)
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

    def final_view(self, key: str, read: bool = True) -> Optional[TaskView]:
        """The view of ``key`` if it has finished, else None; from any thread, without a trip to the loop (a
        GetTask of a finished task, the most common one, then waits for nothing). ``read``: the result counts as
        delivered (see :meth:`view`)."""
        view = self._final.get(key)
        if view is not None and read:
            self._read.add(key)
        return view

    def shutdown(self, grace: float) -> None:
        """Graceful stop of a served agent: take no new work, let running tasks finish for up to ``grace``
        seconds, then stop. A launcher whose replicas outlive the agent (Kubernetes) leaves them running."""
        deadline = time.monotonic() + grace
        self.call(setattr, self.scheduler, "draining", True).result(timeout=10)
        while time.monotonic() < deadline and self.call(self._drain_pending).result(timeout=10):
            time.sleep(0.2)
        self.stop()

    def _drain_pending(self) -> bool:
        """Whether a draining agent still has work: running leases, or results that GetTask has not read."""
        return bool(self.scheduler.leases) or any(self._known(key) for key in self._unread if key not in self._read)

    @property
    def lease_address(self) -> str:
        return self.channel.address if self.channel is not None else ""

    # ------------------------------------------------------------------------- loop side: from the connector

    def submit(self, request: core.TaskRequest) -> None:
        if self._known(request.key):
            return  # a retried CreateTask
        self._final.pop(request.key, None)  # finished and forgotten by the scheduler since: runs again
        self.metrics.submitted(request.fleet.name)
        self._apply(self.scheduler.submit(request))

    def submit_map(self, key: str, fleet: core.FleetConfig, size: int, make_element, concurrency, ratio,
                   **options: Any) -> None:
        if self._known(key):
            return
        self._final.pop(key, None)
        self.metrics.submitted(fleet.name)
        self._apply(self.scheduler.submit_map(key, fleet, size, make_element, concurrency, ratio, **options))

    def _known(self, key: str) -> bool:
        return key in self.scheduler.tasks or key in self.scheduler.maps

    def cancel(self, key: str, reason: str) -> None:
        if self._known(key):
            self._apply(self.scheduler.cancel(key, reason))
        else:
            self._apply(self.scheduler.tombstone(key, reason))

    def known_view(self, key: str) -> Optional[TaskView]:
        """The view of ``key`` if this agent knows it (unlike :meth:`view`, never a recovery placeholder)."""
        return self.view(key) if self._known(key) else None

    def resume(self, request: core.TaskRequest, stored_outputs: Optional[bytes]) -> None:
        """Take back a task the connector rebuilt from its record after a restart (see recovery.py)."""
        self._take_back(request.key, lambda: self.scheduler.resume(request, stored_outputs))

    def resume_map(self, key: str, fleet: core.FleetConfig, size: int, make_element, concurrency, ratio,
                   done: Set[int] = frozenset(), **options: Any) -> None:
        """Take back an actor map the connector rebuilt; ``done``: elements whose outputs are stored."""
        self._take_back(key, lambda: self.scheduler.resume_map(key, fleet, size, make_element, concurrency, ratio,
                                                               done=done, **options))

    def _take_back(self, key: str, take_back: Callable[[], List[core.Effect]]) -> None:
        """While adopted replicas have not reconnected yet (within the recovery grace), wait for them before
        handing a rebuilt task to the scheduler, so a task one of them still runs is not started twice."""
        self._final.pop(key, None)
        if self._known(key):
            self._apply(take_back())  # it only completes what a reconnected replica brought back
        elif self._adoption_pending():
            self._parked.append(take_back)
        else:
            self._apply(take_back())

    def _adoption_pending(self) -> bool:
        return time.monotonic() < self._recovering_until and any(
            r.adopted and r.state is core.ReplicaState.STARTING for r in self.scheduler.replicas.values())

    def _release_parked(self, force: bool = False) -> None:
        if self._parked and (force or not self._adoption_pending()):
            parked, self._parked = self._parked, []
            for take_back in parked:
                self._apply(take_back())

    def forget(self, key: str) -> None:
        self.scheduler.forget(key)
        self._final.pop(key, None)

    def view(self, key: str) -> Optional[TaskView]:
        """What GetTask answers; a terminal answer counts as delivered (a draining agent waits for that)."""
        view = self._view(key)
        if view is not None and view.phase.terminal:
            self._unread.discard(key)
        task = self.scheduler.tasks.get(key)
        if view is not None and task is not None and view.phase is core.Phase.RUNNING and task.replica_id:
            # Where the task runs, for its log links: the launcher knows the replica's pod.
            view.placement = self.launcher.placement(task.replica_id) if self.launcher else None
            if task.started_at is not None:
                view.started_at = time.time() - (time.monotonic() - task.started_at)
        return view

    def _view(self, key: str) -> Optional[TaskView]:
        return task_view(self.scheduler, key, recovering=time.monotonic() < self._recovering_until)

    async def wait(self, key: str) -> Optional[TaskView]:
        """Wait until ``key`` reaches a terminal phase, without polling."""
        view = self._view(key)
        if view is None or view.phase.terminal:
            return view
        future = self.loop.create_future()
        self._waiters.setdefault(key, []).append(future)
        await future
        return self._view(key)

    # ----------------------------------------------------------------------- loop side: from the lease service

    def replica_connected(self, replica_id: str, token: str, fleet_key: str, capacity: int,
                          running: List[str], queue_depth: int = 0) -> List[str]:
        """A replica said Hello. Returns the leases among ``running`` it must drop; raises
        :class:`.scheduler.ReplicaRefused` if it is not one of ours."""
        effects = self.scheduler.replica_connected(replica_id, token, fleet_key, capacity, running, queue_depth)
        abandoned = self.scheduler.abandoned_leases(replica_id, running)
        self.metrics.replica_event(self.fleet_name(replica_id), "connected")
        self._apply(effects)
        self._release_parked()
        return abandoned

    def authenticate(self, replica_id: str, token: str, fleet_key: str) -> None:
        """Raises :class:`.scheduler.ReplicaRefused` unless ``token`` is the token of this replica of ours."""
        self.scheduler.authenticate(replica_id, token, fleet_key)

    def heartbeat(self, replica_id: str, running: Optional[List[str]] = None) -> None:
        effects = self.scheduler.heartbeat(replica_id, running)
        if effects:  # most heartbeats change nothing: skip re-arming the timer
            self._apply(effects)

    def report(self, replica_id: str, lease_id: str, outcome: core.Outcome, outputs: Optional[bytes],
               error: Optional[bytes], message: str, retryable: bool, run_seconds: float,
               **details: Any) -> None:
        self.metrics.ran(run_seconds)
        self._apply(self.scheduler.report(
            replica_id, lease_id, outcome, outputs=outputs, error=error, message=message, retryable=retryable,
            **details))

    def stream_lost(self, replica_id: str) -> None:
        """The stream of a replica that was still ours ended: it has the reconnect grace to come back."""
        if replica_id in self.scheduler.replicas:
            self.metrics.replica_event(self.fleet_name(replica_id), "disconnected")
        self._apply(self.scheduler.stream_lost(replica_id))

    def fleet_name(self, replica_id: str) -> str:
        replica = self.scheduler.replicas.get(replica_id)
        return self.scheduler.fleets[replica.fleet_key].config.name if replica else ""

    # ------------------------------------------------------------------------------------------- lifecycle

    async def _start(self, channel_factory: Callable[["Reactor"], ReplicaChannel]) -> None:
        self.channel = channel_factory(self)
        await self.channel.start()
        self.launcher = self._launcher_factory(self._on_replica_exit)
        self.launcher.on_waiting = self._on_replica_waiting
        if self.launcher.replicas_outlive_agent:
            adopted = await self.launcher.adopt()
            for replica in adopted:
                fleet = fleet_config(replica.environment, replica.placement, self.max_ttl_seconds)
                if fleet.key != replica.fleet_key:
                    log.warning("adopted replica %s says fleet %s but its environment makes fleet %s; using %s",
                                replica.replica_id, replica.fleet_key, fleet.key, replica.fleet_key)
                    fleet = dataclasses.replace(fleet, key=replica.fleet_key)
                self.scheduler.adopt_replica(replica.replica_id, replica.token, fleet)
            if adopted:
                log.info("adopted %d replicas left by a previous agent", len(adopted))
            # Tasks GetTask asks about that this agent does not know may still be running on a replica.
            self._recovering_until = time.monotonic() + self.recovery_grace
            self.loop.call_later(self.recovery_grace, self._release_parked, True)
            self._arm_timer()

    async def _stop(self) -> None:
        if self.launcher is not None and self.launcher.replicas_outlive_agent:
            # Leave replicas and their leases alone: they reconnect to the next agent, which adopts them.
            self.scheduler.draining = True
        else:
            self._apply(self.scheduler.drain())
        if self.launcher is not None:
            await self.launcher.close()
        if self.channel is not None:
            await self.channel.stop()
        for timer in (self._timer, self._rearm):
            if timer is not None:
                timer.cancel()

    # --------------------------------------------------------------------------------------------- effects

    def _apply(self, effects: List[core.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, (core.Assign, core.Ack, core.CancelLease, core.Recall)):
                if isinstance(effect, core.Assign):
                    self.metrics.dispatched(effect.task)
                self.channel.deliver(effect)
            elif isinstance(effect, core.Disconnect):
                log.warning("closing the lease stream of replica %s: %s", effect.replica_id, effect.reason)
                self.channel.close(effect.replica_id)
            elif isinstance(effect, core.Finished):
                self._finished(effect.key)
            elif isinstance(effect, core.Launch):
                self.metrics.replica_event(effect.fleet.name, "launched")
                self._background_task(self._launch(effect))
            elif isinstance(effect, core.Stop):
                self.metrics.replica_event(self.fleet_name(effect.replica_id), "stop_requested")
                self.channel.deliver(effect)
                self._background_task(self.launcher.stop(effect.replica_id, effect.reason))
        if self._rearm is None:
            # Finding the next deadline walks every lease and replica: with thousands of replicas, doing it after
            # each event caps the dispatch rate, so a burst of events re-arms the timer once, a moment later.
            self._rearm = self.loop.call_later(REARM_SECONDS, self._rearm_timer)

    def _rearm_timer(self) -> None:
        self._rearm = None
        self._arm_timer()

    def _finished(self, key: str) -> None:
        view = self._view(key)
        if view is not None:
            self.metrics.finished(view)
            if view.phase is not core.Phase.ABORTED:  # propeller stops asking about what it aborted
                self._unread.add(key)
            self._final[key] = view
            if len(self._final) > self._prune_at:  # results the scheduler has forgotten since: prune
                self._final = {k: v for k, v in list(self._final.items()) if self._known(k)}
                self._unread = {k for k in self._unread if self._known(k) and k not in self._read}
                self._read = {k for k in list(self._read) if k in self._final}
                self._prune_at = max(1024, 2 * len(self._final))
        for future in self._waiters.pop(key, []):
            if not future.done():
                future.set_result(None)

    async def _launch(self, launch: core.Launch) -> None:
        fleet = launch.fleet
        try:
            await self.launcher.launch(ReplicaLaunch(
                replica_id=launch.replica_id,
                token=launch.token,
                fleet_key=fleet.key,
                environment=fleet.environment,
                agent_address=self.lease_address,
                placement=fleet.placement,
                agent_ca=self.channel.ca_certificate,
            ))
        except LaunchRefused as e:
            log.warning("replica %s refused: %s", launch.replica_id, e)
            self._on_replica_exit(launch.replica_id, core.ReplicaExit(core.ExitReason.REFUSED, str(e)))
        except Exception as e:  # noqa: BLE001 - any launch failure is a start failure of this replica
            log.exception("launching replica %s failed", launch.replica_id)
            self._on_replica_exit(launch.replica_id, core.ReplicaExit(
                core.ExitReason.LAUNCH_FAILED, f"could not launch the replica: {e}"))

    def _on_replica_exit(self, replica_id: str, exit: core.ReplicaExit) -> None:
        log.info("replica %s gone: %s", replica_id, exit.detail.splitlines()[0] if exit.detail else "")
        if self.channel is not None:
            self.channel.close(replica_id)
        self._replica_gone(replica_id, exit)

    def _on_replica_waiting(self, replica_id: str, reason: Optional[str]) -> None:
        if reason:
            log.info("replica %s waits for resources: %s", replica_id, reason)
        self._apply(self.scheduler.replica_waiting(replica_id, reason))

    def _replica_gone(self, replica_id: str, exit: core.ReplicaExit) -> None:
        if replica_id in self.scheduler.replicas:
            self.metrics.replica_gone(self.fleet_name(replica_id), exit.reason)
        self._apply(self.scheduler.replica_gone(replica_id, exit))
        self._release_parked()

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
