"""Prometheus metrics of one agent: task outcomes, dispatch latency, replica events, and (read at scrape time)
queue depth per environment and replicas by state."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from .scheduler import ExitReason, Scheduler, TaskState
    from .views import TaskView


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        self.tasks_submitted = Counter(
            "flyte_actor_tasks_submitted", "Tasks and actor maps submitted", ["environment"], registry=self.registry
        )
        self.task_outcomes = Counter(
            "flyte_actor_task_outcomes", "Tasks and actor maps finished, by phase", ["phase"], registry=self.registry
        )
        self.dispatch_latency = Histogram(
            "flyte_actor_dispatch_latency_seconds",
            "Time from a task's submission to its first lease",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "flyte_actor_task_run_seconds",
            "Time replicas spent running a task",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300),
            registry=self.registry,
        )
        self.replica_events = Counter(
            "flyte_actor_replica_events",
            "Replica launches, connections and stops (with their cause)",
            ["environment", "event"],
            registry=self.registry,
        )

    def watch(self, scheduler: "Scheduler", call: Callable) -> None:
        """Report gauges read from the scheduler; ``call`` runs a function on the agent loop and returns a future."""
        self.registry.register(_SchedulerCollector(scheduler, call))

    def submitted(self, environment: str) -> None:
        self.tasks_submitted.labels(environment).inc()

    def dispatched(self, task: "TaskState") -> None:
        if task.leases == 1:
            self.dispatch_latency.observe(max(0.0, time.monotonic() - task.submitted_at))

    def ran(self, seconds: float) -> None:
        self.run_seconds.observe(seconds)

    def finished(self, view: "TaskView") -> None:
        self.task_outcomes.labels(view.phase.value).inc()

    def replica_gone(self, environment: str, reason: "ExitReason") -> None:
        self.replica_events.labels(environment, "gone: " + reason.value).inc()

    def replica_event(self, environment: str, event: str) -> None:
        """``event`` must come from a small fixed set (it is a label value)."""
        self.replica_events.labels(environment, event).inc()


class _SchedulerCollector:
    def __init__(self, scheduler: "Scheduler", call: Callable):
        self.scheduler = scheduler
        self.call = call

    def collect(self):
        queued = GaugeMetricFamily("flyte_actor_queue_depth", "Tasks waiting for a replica", labels=["environment"])
        replicas = GaugeMetricFamily("flyte_actor_replicas", "Replicas by state", labels=["environment", "state"])
        try:
            snapshot = self.call(self._snapshot).result(timeout=5)
        except Exception:  # noqa: BLE001 - a stopped agent has no gauges
            snapshot = []
        for name, depth, states in snapshot:
            queued.add_metric([name], depth)
            for state, count in states.items():
                replicas.add_metric([name, state], count)
        yield queued
        yield replicas

    def _snapshot(self):
        out = []
        for fleet in self.scheduler.fleets.values():
            states = {}
            for replica in fleet.replicas.values():
                states[replica.state.value] = states.get(replica.state.value, 0) + 1
            out.append((fleet.config.name, len(fleet.queue), states))
        return out
