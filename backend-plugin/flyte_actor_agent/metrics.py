"""Prometheus metrics of one agent: task outcomes, dispatch latency, replica events (with their cause), and (read
at scrape time) queue depth and replicas by state per fleet: an environment version in a namespace, so each
fleet is one series (``environment``, ``version``, ``namespace``).

The agent's own metrics live in a private registry (tests run several agents in one process); the metrics port
serves it together with prometheus_client's default registry, where flytekit's connector service records its
request counts and latencies (``flyte_connector_*``) and the process collector its CPU and memory."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
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
            "Replica launches, connections, stop requests and exits; `cause` is why a replica is gone",
            ["environment", "event", "cause"],
            registry=self.registry,
        )

    def exported(self) -> CollectorRegistry:
        """What the metrics port serves: this agent's metrics and the default registry (flytekit's connector
        metrics, process and Python collectors)."""
        served = CollectorRegistry(auto_describe=False)
        served.register(_Both(self.registry, REGISTRY))
        return served

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
        self.replica_events.labels(environment, "gone", reason.value).inc()

    def replica_event(self, environment: str, event: str) -> None:
        """``event`` must come from a small fixed set (it is a label value)."""
        self.replica_events.labels(environment, event, "").inc()


class _Both:
    """A collector that yields the metrics of two registries (they share no metric names)."""

    def __init__(self, *registries: CollectorRegistry):
        self.registries = registries

    def collect(self):
        for registry in self.registries:
            yield from registry.collect()


class _SchedulerCollector:
    def __init__(self, scheduler: "Scheduler", call: Callable):
        self.scheduler = scheduler
        self.call = call

    def collect(self):
        labels = ["environment", "version", "namespace"]
        queued = GaugeMetricFamily("flyte_actor_queue_depth", "Tasks waiting for a replica, per fleet", labels=labels)
        replicas = GaugeMetricFamily("flyte_actor_replicas", "Replicas by state, per fleet", labels=labels + ["state"])
        elements = GaugeMetricFamily(
            "flyte_actor_map_elements", "Elements of running actor maps, by state (progress the console cannot show)",
            labels=["environment", "state"])
        try:
            snapshot, maps = self.call(self._snapshot).result(timeout=5)
        except Exception:  # noqa: BLE001 - a stopped agent has no gauges
            snapshot, maps = [], {}
        for fleet, depth, states in snapshot:
            queued.add_metric(list(fleet), depth)
            for state, count in states.items():
                replicas.add_metric(list(fleet) + [state], count)
        for (name, state), count in sorted(maps.items()):
            elements.add_metric([name, state], count)
        yield queued
        yield replicas
        yield elements

    def _snapshot(self):
        out = []
        for fleet in self.scheduler.fleets.values():
            if fleet.superseded and not fleet.replicas and not fleet.queue:
                continue  # an old version with nothing left: its series end
            states = {}
            for replica in fleet.replicas.values():
                states[replica.state.value] = states.get(replica.state.value, 0) + 1
            config = fleet.config
            labels = (
                config.name,
                config.environment.version if config.environment is not None else "",
                config.placement.namespace if config.placement is not None else "",
            )
            out.append((labels, len(fleet.queue), states))
        maps: dict = {}
        for job in self.scheduler.maps.values():
            if job.phase.terminal:
                continue
            for state, count in (("total", job.size), ("succeeded", job.succeeded), ("failed", job.failed),
                                 ("in_flight", len(job.in_flight)), ("retried", job.retried)):
                maps[(job.fleet.name, state)] = maps.get((job.fleet.name, state), 0) + count
        return out, maps
