"""What an actor task carries to the agent in ``TaskTemplate.custom``, and how its container args are read.

This module is the contract between the flytekit plugin (which writes it at serialization) and the agent (which
reads it), so both sides import it from here. ``custom`` is a protobuf Struct, which keeps only doubles: every
integer is read back through :func:`_int`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

#: Task type of a single actor task; propeller routes it to the actor agent.
ACTOR_TASK_TYPE = "actor"
#: Task type of an actor map: one Flyte node whose elements the agent fans out over the fleet.
ACTOR_MAP_TASK_TYPE = "actor-map"
#: Version of the layout of ``custom`` below; the agent refuses layouts it does not know.
CUSTOM_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SerializedEnvironment:
    """The fleet an actor task runs on. ``version`` is a hash of ``replica``: tasks with equal versions share
    replicas; ``replica_count`` and ``ttl_seconds`` size the fleet and are not part of it."""

    name: str
    version: str
    replica_count: int
    ttl_seconds: int
    parallelism: int
    replica: Dict[str, Any] = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        """Identifies a fleet: replicas of one key are interchangeable."""
        return f"{self.name}-{self.version}"

    def to_custom(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "replica_count": self.replica_count,
            "ttl_seconds": self.ttl_seconds,
            "parallelism": self.parallelism,
            "replica": self.replica,
        }

    @classmethod
    def from_custom(cls, data: Dict[str, Any]) -> "SerializedEnvironment":
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            replica_count=_int(data["replica_count"]),
            ttl_seconds=_int(data["ttl_seconds"]),
            parallelism=_int(data["parallelism"]),
            replica=dict(data.get("replica") or {}),
        )


@dataclass(frozen=True)
class MapOptions:
    """How the agent fans out an actor map. ``concurrency`` ``None`` means as many as the fleet can take."""

    mapped_inputs: List[str]
    bound_inputs: List[str]
    concurrency: Optional[int] = None
    min_success_ratio: float = 1.0

    def to_custom(self) -> Dict[str, Any]:
        return {
            "mapped_inputs": list(self.mapped_inputs),
            "bound_inputs": list(self.bound_inputs),
            "concurrency": self.concurrency,
            "min_success_ratio": self.min_success_ratio,
        }

    @classmethod
    def from_custom(cls, data: Dict[str, Any]) -> "MapOptions":
        concurrency = data.get("concurrency")
        return cls(
            mapped_inputs=[str(x) for x in data.get("mapped_inputs", [])],
            bound_inputs=[str(x) for x in data.get("bound_inputs", [])],
            concurrency=None if concurrency is None else _int(concurrency),
            min_success_ratio=float(data.get("min_success_ratio", 1.0)),
        )


@dataclass(frozen=True)
class ActorCustom:
    environment: SerializedEnvironment
    map: Optional[MapOptions] = None

    def to_custom(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"schema_version": CUSTOM_SCHEMA_VERSION, "environment": self.environment.to_custom()}
        if self.map is not None:
            out["map"] = self.map.to_custom()
        return out

    @classmethod
    def from_custom(cls, custom: Optional[Dict[str, Any]]) -> "ActorCustom":
        if not custom or "environment" not in custom:
            raise ValueError(
                "This task template has no actor environment in its custom field: it was not serialized by "
                "flytekitplugins-actor. Declare the task with @ActorEnvironment(...).task."
            )
        version = _int(custom.get("schema_version", 0))
        if version != CUSTOM_SCHEMA_VERSION:
            raise ValueError(
                f"Actor task custom schema_version {version} is not supported by this agent (it reads "
                f"{CUSTOM_SCHEMA_VERSION}); install the same flytekitplugins-actor version in the image and the agent."
            )
        return cls(
            environment=SerializedEnvironment.from_custom(custom["environment"]),
            map=MapOptions.from_custom(custom["map"]) if custom.get("map") is not None else None,
        )


def replica_variables(replica: Dict[str, Any]) -> Dict[str, str]:
    """The variables a replica of this spec (``SerializedEnvironment.replica``) runs with outside a cluster: the
    environment's, then the pod template's primary container's (literal values only; ``valueFrom`` needs one)."""
    variables = dict(replica.get("environment") or {})
    template = replica.get("pod_template") or {}
    for container in (template.get("pod_spec") or {}).get("containers") or []:
        if container.get("name") == template.get("primary_container_name"):
            for var in container.get("env") or []:
                if var.get("value") is not None:
                    variables[var["name"]] = var["value"]
    return variables


@dataclass
class TaskCommand:
    """How a replica loads and runs one task, read from the task's container args (as ``pyflyte-execute`` takes
    them, optionally behind ``pyflyte-fast-execute``). Unrendered ``{{.placeholders}}`` become ``None``."""

    resolver: str
    resolver_args: List[str]
    inputs: Optional[str] = None
    output_prefix: Optional[str] = None
    raw_output_data_prefix: Optional[str] = None
    checkpoint_path: Optional[str] = None
    prev_checkpoint: Optional[str] = None
    distribution: Optional[str] = None
    dest_dir: Optional[str] = None

    _OPTIONS = {
        "--inputs": "inputs",
        "--output-prefix": "output_prefix",
        "--raw-output-data-prefix": "raw_output_data_prefix",
        "--checkpoint-path": "checkpoint_path",
        "--prev-checkpoint": "prev_checkpoint",
        "--additional-distribution": "distribution",
        "--dest-dir": "dest_dir",
        "--dynamic-addl-distro": "distribution",
        "--dynamic-dest-dir": "dest_dir",
        "--resolver": "resolver",
    }

    @classmethod
    def from_args(cls, args: List[str]) -> "TaskCommand":
        values: Dict[str, Any] = {}
        resolver_args: List[str] = []
        executable_seen = False
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("pyflyte-fast-execute", "pyflyte-execute"):
                executable_seen = True
            elif arg == "--":
                if "resolver" in values:
                    resolver_args = list(args[i + 1 :])
                    break
            elif arg in cls._OPTIONS and i + 1 < len(args):
                value = args[i + 1]
                # Propeller renders an absent previous checkpoint as the two characters "" (as flytekit reads it).
                values[cls._OPTIONS[arg]] = None if value.startswith("{{") or value in ("", '""') else value
                i += 1
            i += 1
        if not executable_seen or not values.get("resolver") or not resolver_args:
            raise ValueError(
                f"Cannot run container args {args!r} on an actor replica: expected 'pyflyte-execute ... --resolver R "
                "-- ARGS' (optionally behind 'pyflyte-fast-execute'). Actor tasks must be flytekit Python tasks."
            )
        return cls(resolver_args=resolver_args, **values)


def _int(value: Any) -> int:
    """Integers come back from a protobuf Struct as floats; refuse anything that is not a whole number."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"Expected an integer in the actor task's custom field, got {value!r}.")
    return int(value)
