"""Where a fleet's replicas run, and the one place that turns an environment and a placement into a fleet.

The connector builds a fleet from each task (its environment, and the execution's namespace and service
account); an agent that restarted rebuilds the same fleet from what a replica pod carries. Both go through
:func:`fleet_config`, so a replica adopted after a restart joins the fleet its tasks are queued on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

from flytekitplugins.actor.contract import SerializedEnvironment

from .scheduler import FleetConfig


@dataclass(frozen=True)
class Placement:
    """Where replicas of a fleet run and on whose behalf: from the execution metadata of the task that caused
    the fleet (all empty for local runs)."""

    namespace: str = ""
    service_account: str = ""
    project: str = ""
    domain: str = ""

    @classmethod
    def of_execution(cls, metadata: Optional[Any]) -> "Placement":
        """From flytekit's ``TaskExecutionMetadata`` (or ``None``)."""
        execution = execution_id(metadata)
        return cls(
            namespace=getattr(metadata, "namespace", None) or "",
            service_account=getattr(metadata, "k8s_service_account", None) or "",
            project=getattr(execution, "project", None) or "",
            domain=getattr(execution, "domain", None) or "",
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        data = json.loads(text)
        return cls(**{k: str(data.get(k) or "") for k in ("namespace", "service_account", "project", "domain")})


def execution_id(metadata: Optional[Any]):
    """The workflow execution id in flytekit's ``TaskExecutionMetadata``, or ``None``."""
    task_id = getattr(metadata, "task_execution_id", None)
    return getattr(getattr(task_id, "node_execution_id", None), "execution_id", None)


def fleet_config(
    environment: SerializedEnvironment, placement: Placement, max_ttl_seconds: Optional[float] = None
) -> FleetConfig:
    """The fleet for ``environment`` at ``placement``: one per environment version and namespace (replicas run in
    the execution's namespace), its TTL capped by the agent's ``max_ttl_seconds``."""
    namespace = placement.namespace
    ttl = environment.ttl_seconds
    return FleetConfig(
        key=environment.key + (f".{namespace}" if namespace else ""),
        name=environment.name,
        replica_count=environment.replica_count,
        ttl_seconds=min(ttl, max_ttl_seconds) if max_ttl_seconds else ttl,
        parallelism=environment.parallelism,
        lineage=f"{environment.name}.{namespace}",
        environment=environment,
        placement=placement,
    )
