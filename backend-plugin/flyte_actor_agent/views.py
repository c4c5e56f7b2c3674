"""Read-only views of the scheduler's state, taken on the reactor's loop and safe to read from any thread
afterwards: what the connector answers GetTask with, and what metrics report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

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
    # Actor maps only.
    size: int = 0
    succeeded: int = 0
    failed: int = 0
    element_outputs: List[Optional[bytes]] = field(default_factory=list)


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
            element_outputs=job.outputs if job.phase is core.Phase.SUCCEEDED else [],
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
        message = queued_message(fleet)
    elif task.phase is core.Phase.RUNNING:
        message = f"running on replica {task.replica_id}"
    return TaskView(key, task.phase, message, task.outputs, task.error, task.replica_id, waiting)


def queued_message(fleet: core.Fleet) -> str:
    starting = sum(1 for r in fleet.replicas.values() if r.state is core.ReplicaState.STARTING)
    ready = sum(1 for r in fleet.replicas.values() if r.state is core.ReplicaState.READY)
    return (
        f"queued for actor environment {fleet.config.name!r}: {len(fleet.queue)} waiting, {ready} replicas ready, "
        f"{starting} starting (up to {fleet.config.replica_count})"
    )
