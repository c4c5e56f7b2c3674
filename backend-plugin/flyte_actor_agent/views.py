"""Read-only views of the scheduler's state, taken on the reactor's loop and safe to read from any thread
afterwards: what the connector answers GetTask with, what metrics report, and the fleet status page."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from . import scheduler as core


@dataclass
class TaskView:
    """A snapshot of a task or actor map."""

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
    retried: int = 0
    #: Per element: its outputs, ``core.IN_PREFIX`` (in its output prefix), or None (failed).
    element_outputs: List[Union[bytes, str, None]] = field(default_factory=list)
    #: The first failures' messages, by element index.
    errors: Dict[int, str] = field(default_factory=dict)


def task_view(scheduler: core.Scheduler, key: str, recovering: bool = False) -> Optional[TaskView]:
    """The view of task or actor map ``key``; ``None`` if unknown. ``recovering``: the agent restarted recently,
    so a task it does not know may still be reported by an adopted replica."""
    job = scheduler.maps.get(key)
    if job is not None:
        return TaskView(
            key=key,
            phase=job.phase,
            message=job.message or f"{job.succeeded + job.failed} of {job.size} elements done",
            size=job.size,
            succeeded=job.succeeded,
            failed=job.failed,
            retried=job.retried,
            element_outputs=job.outputs if job.phase is core.Phase.SUCCEEDED else [],
            errors=dict(job.errors) if job.phase.terminal else {},
        )
    task = scheduler.tasks.get(key)
    if task is None:
        if recovering:
            return TaskView(key, core.Phase.RUNNING, "the actor agent restarted; waiting for a replica to report "
                            "this task (up to --recovery-grace-seconds)")
        return None
    message, waiting = task.message, False
    if task.phase is core.Phase.QUEUED:
        fleet = scheduler.fleets[task.fleet_key]
        waiting = not any(r.state is core.ReplicaState.READY for r in fleet.replicas.values())
        message = queued_message(fleet, scheduler.waiting_reason(fleet.config.key))
    elif task.phase is core.Phase.RUNNING:
        message = f"running on replica {task.replica_id}"
    return TaskView(key, task.phase, message, task.outputs, task.error, task.replica_id, waiting)


def queued_message(fleet: core.Fleet, waiting: str = "") -> str:
    starting = sum(1 for r in fleet.replicas.values() if r.state is core.ReplicaState.STARTING)
    ready = sum(1 for r in fleet.replicas.values() if r.state is core.ReplicaState.READY)
    return (
        f"queued for actor environment {fleet.config.name!r}: {len(fleet.queue)} waiting, {ready} replicas ready, "
        f"{starting} starting (up to {fleet.config.replica_count})"
        + (f"; waiting for resources: {waiting}" if waiting and not ready else "")
    )


# ------------------------------------------------------------------------------------------------ fleet status


@dataclass
class RunningTaskStatus:
    key: str
    name: str
    #: Seconds since it was first leased.
    running_seconds: float
    #: How many times it was leased (more than one: a replica or executor was lost under it).
    leases: int


@dataclass
class ReplicaStatus:
    id: str
    state: str
    #: Where it runs, as its launcher names it ("pod NAMESPACE/NAME", "pid N"); empty if the launcher cannot say.
    where: str
    #: Seconds in its current state: since launch while starting, since it connected while ready.
    state_seconds: float
    #: Seconds without a lease, or ``None`` while it runs something.
    idle_seconds: Optional[float]
    tasks_run: int
    capacity: int
    running: List[RunningTaskStatus]
    adopted: bool
    #: The last task that failed or was lost on it (``None`` if none did).
    last_failure: Optional[str]


@dataclass
class MapStatus:
    key: str
    #: The mapped task's name (from an element in flight).
    name: str
    size: int
    succeeded: int
    failed: int
    in_flight: int
    running_seconds: float


@dataclass
class FleetStatus:
    key: str
    environment: str
    version: str
    namespace: str
    replica_count: int
    parallelism: int
    ttl_seconds: float
    #: A newer version of the environment is in use; this one's replicas stop once idle.
    superseded: bool
    queue_depth: int
    replicas: List[ReplicaStatus]
    maps: List[MapStatus]
    #: Replicas that failed to start in a row, and the last such failure.
    start_failures: int
    last_start_error: str
    #: The last replica that went away for another reason than being asked to stop, and how long ago.
    last_replica_failure: Optional[str]
    last_replica_failure_seconds: Optional[float]


@dataclass
class AgentStatus:
    fleets: List[FleetStatus]
    draining: bool
    tasks_queued: int
    tasks_running: int
    maps_running: int


def agent_status(scheduler: core.Scheduler, where: Callable[[str], str] = lambda replica_id: "") -> AgentStatus:
    """A snapshot of every fleet, its replicas, queue and running actor maps (taken on the reactor's loop).
    ``where(replica_id)`` names the replica's pod or process."""
    now = scheduler.clock()
    maps: Dict[str, List[MapStatus]] = {}
    for job in scheduler.maps.values():
        if not job.phase.terminal:
            element = next(iter(job.in_flight.values()), None)
            name = element.name.rpartition("[")[0] if element is not None and element.name.endswith("]") else ""
            maps.setdefault(job.fleet.key, []).append(MapStatus(
                key=job.key, name=name or job.key, size=job.size, succeeded=job.succeeded, failed=job.failed,
                in_flight=len(job.in_flight), running_seconds=now - job.submitted_at,
            ))
    fleets = []
    for fleet in scheduler.fleets.values():
        config = fleet.config
        replicas = []
        for replica in sorted(fleet.replicas.values(), key=lambda r: r.launched_at):
            running = []
            for lease_id in sorted(replica.leases):
                task = scheduler.leases.get(lease_id)
                if task is not None:
                    running.append(RunningTaskStatus(task.key, task.name or task.key,
                                                     now - (task.started_at or now), task.leases))
            since = replica.connected_at if replica.connected_at is not None else replica.launched_at
            replicas.append(ReplicaStatus(
                id=replica.id,
                state=replica.state.value,
                where=where(replica.id),
                state_seconds=now - since,
                idle_seconds=None if replica.leases or replica.state is not core.ReplicaState.READY
                else now - replica.idle_since,
                tasks_run=replica.tasks_run,
                capacity=replica.capacity,
                running=running,
                adopted=replica.adopted,
                last_failure=replica.last_failure or None,
            ))
        failure = fleet.last_replica_failure
        fleets.append(FleetStatus(
            key=config.key,
            environment=config.name,
            version=config.environment.version if config.environment is not None else "",
            namespace=config.placement.namespace if config.placement is not None else "",
            replica_count=config.replica_count,
            parallelism=config.parallelism,
            ttl_seconds=config.ttl_seconds,
            superseded=fleet.superseded,
            queue_depth=len(fleet.queue),  # as the metric counts it
            replicas=replicas,
            maps=maps.get(config.key, []),
            start_failures=fleet.start_failures,
            last_start_error=fleet.last_start_error,
            last_replica_failure=failure.detail if failure else None,
            last_replica_failure_seconds=now - fleet.last_replica_failure_at if failure else None,
        ))
    fleets.sort(key=lambda f: (f.environment, f.namespace, f.superseded, f.key))
    return AgentStatus(
        fleets=fleets,
        draining=scheduler.draining,
        tasks_queued=sum(f.queue_depth for f in fleets),
        tasks_running=len(scheduler.leases),
        maps_running=sum(len(m) for m in maps.values()),
    )
