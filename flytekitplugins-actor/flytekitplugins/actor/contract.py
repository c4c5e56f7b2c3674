"""What an actor task carries to the agent in ``TaskTemplate.custom``, and how its container args are read.

This module is the contract between the flytekit plugin (which writes it at serialization) and the agent (which
reads it), so both sides import it from here. ``custom`` is a protobuf Struct, which keeps only doubles: every
integer is read back through :func:`_bounded`. The agent reads ``custom`` from whoever reaches its connector, so
``from_custom`` checks every field (type, range, no unknown fields) and raises :class:`InvalidTask` with one line
naming the field, the value and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

#: Task type of a single actor task; propeller routes it to the actor agent.
ACTOR_TASK_TYPE = "actor"
#: Task type of an actor map: one Flyte node whose elements the agent fans out over the fleet.
ACTOR_MAP_TASK_TYPE = "actor-map"
#: Version of the layout of ``custom`` below; the agent refuses layouts it does not know.
CUSTOM_SCHEMA_VERSION = 1

#: Bounds for ``ttl_seconds``: the SDK asks for at least 10 s so a replica survives the gap between two tasks of one
#: workflow (propeller polls agents every few seconds); the agent accepts from 1 s. At most 7 days, so a forgotten
#: fleet does not run for ever.
MIN_TTL_SECONDS = 10
MAX_TTL_SECONDS = 7 * 24 * 3600
MAX_REPLICA_COUNT = 1000
MAX_PARALLELISM = 256
ENVIRONMENT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VERSION_RE = re.compile(r"^[a-z0-9]{1,63}$")
_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_FIX = "re-register the task with the same flytekitplugins-actor version as the agent"


class InvalidTask(ValueError):
    """A task template the agent will not run: the message is one line naming the field, its value and the fix."""


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
    def from_custom(cls, data: Any) -> "SerializedEnvironment":
        where = "custom.environment"
        _known_fields(where, data, required=("name", "version", "replica_count", "ttl_seconds", "parallelism"),
                      optional=("replica",))
        name, version = data["name"], data["version"]
        if not isinstance(name, str) or not ENVIRONMENT_NAME_RE.match(name):
            raise InvalidTask(f"{where}.name={_show(name)} is not a DNS-1123 label: name the ActorEnvironment with 1 "
                              "to 63 lower-case letters, digits and '-'")
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise InvalidTask(f"{where}.version={_show(version)} is not an environment version (1 to 63 lower-case "
                              f"letters and digits): {_FIX}")
        replica = data.get("replica") or {}
        if not isinstance(replica, dict):
            raise InvalidTask(f"{where}.replica={_show(replica)} must be an object (the replica template): {_FIX}")
        return cls(
            name=name,
            version=version,
            replica_count=_bounded(f"{where}.replica_count", data["replica_count"], 1, MAX_REPLICA_COUNT,
                                   "set replica_count on the ActorEnvironment"),
            ttl_seconds=_bounded(f"{where}.ttl_seconds", data["ttl_seconds"], 1, MAX_TTL_SECONDS,
                                 "set ttl_seconds on the ActorEnvironment"),
            parallelism=_bounded(f"{where}.parallelism", data["parallelism"], 1, MAX_PARALLELISM,
                                 "set parallelism on the ActorEnvironment"),
            replica=dict(replica),
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
    def from_custom(cls, data: Any) -> "MapOptions":
        where = "custom.map"
        _known_fields(where, data, required=("mapped_inputs",),
                      optional=("bound_inputs", "concurrency", "min_success_ratio", "min_successes"))
        concurrency = data.get("concurrency")
        if concurrency is not None:  # 0: no limit
            concurrency = _bounded(f"{where}.concurrency", concurrency, 0, 2**31 - 1,
                                   "pass map(..., concurrency=N) with N >= 1, or None for no limit")
        min_successes = data.get("min_successes")
        if min_successes is not None:
            _bounded(f"{where}.min_successes", min_successes, 0, 2**31 - 1,
                     "pass map(..., min_successes=N) with N >= 0")
        ratio = data.get("min_success_ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:  # NaN fails too
            raise InvalidTask(f"{where}.min_success_ratio={_show(ratio)} is invalid: pass map(..., "
                              "min_success_ratio=R) with R from 0 to 1")
        return cls(
            mapped_inputs=_names(f"{where}.mapped_inputs", data["mapped_inputs"]),
            bound_inputs=_names(f"{where}.bound_inputs", data.get("bound_inputs", [])),
            concurrency=concurrency,
            min_success_ratio=float(ratio),
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
        if not custom or not isinstance(custom, dict) or "environment" not in custom:
            raise InvalidTask(
                "This task template has no actor environment in its custom field: it was not serialized by "
                "flytekitplugins-actor. Declare the task with @ActorEnvironment(...).task."
            )
        version = custom.get("schema_version", 0)
        if isinstance(version, bool) or version != CUSTOM_SCHEMA_VERSION:
            raise InvalidTask(
                f"custom.schema_version={_show(version)} is not supported by this agent (it reads "
                f"{CUSTOM_SCHEMA_VERSION}); install the same flytekitplugins-actor version in the image and the agent."
            )
        _known_fields("custom", custom, required=("schema_version", "environment"), optional=("map",))
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
            raise InvalidTask(
                f"Cannot run container args {_show(args)} on an actor replica: expected 'pyflyte-execute ... "
                "--resolver R -- ARGS' (optionally behind 'pyflyte-fast-execute'). Actor tasks must be flytekit "
                "Python tasks."
            )
        if not _DOTTED_RE.match(values["resolver"]):
            raise InvalidTask(f"container args: --resolver {_show(values['resolver'])} is not a dotted Python name "
                              f"(module.attribute): {_FIX}")
        for option in ("task-module", "task-name"):  # the default resolver's loader args
            if option in resolver_args[:-1:2] and not resolver_args[resolver_args.index(option) + 1]:
                raise InvalidTask(f"container args: {option} is empty in {_show(resolver_args)}: {_FIX}")
        if "task-name" in resolver_args and "task-module" not in resolver_args:
            raise InvalidTask(f"container args: no task-module in {_show(resolver_args)}: {_FIX}")
        return cls(resolver_args=resolver_args, **values)


def _bounded(where: str, value: Any, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not float(value).is_integer() or not low <= value <= high:
        raise InvalidTask(f"{where}={_show(value)} is invalid: it must be an integer from {low} to {high}; {fix}")
    return int(value)


def _known_fields(where: str, data: Any, required: tuple, optional: tuple) -> None:
    if not isinstance(data, dict):
        raise InvalidTask(f"{where}={_show(data)} must be an object: {_FIX}")
    missing = [k for k in required if k not in data]
    if missing:
        raise InvalidTask(f"{where} lacks {missing}: {_FIX}")
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if unknown:
        raise InvalidTask(f"{where} has unknown fields {_show(unknown)} (this agent reads "
                          f"{sorted(required + optional)}): {_FIX}")


def _names(where: str, value: Any) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidTask(f"{where}={_show(value)} must be a list of input names: {_FIX}")
    return list(value)


def _show(value: Any, limit: int = 120) -> str:
    """A value for a one-line message: repr, newlines escaped by repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
