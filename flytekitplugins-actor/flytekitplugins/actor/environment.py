"""The actor environment: what a warm replica is, and the ``@actor.task`` decorator that places tasks on it.

    actor = ActorEnvironment(name="my-actor", replica_count=2, ttl_seconds=300)

    @actor.task
    def plus_one(x: int) -> int:
        return x + 1

Every task of one environment runs on the same fleet of replicas. What makes a replica (image, resources,
environment variables, secrets, pod template, parallelism) belongs to the environment, so a task cannot set it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from flytekit import ImageSpec, PodTemplate, Resources, Secret
from flytekit import task as flytekit_task
from flytekit.extend import TaskPlugins
from flytekit.extras.accelerators import BaseAccelerator

from .contract import (
    ENVIRONMENT_NAME_RE,
    MAX_PARALLELISM,
    MAX_REPLICA_COUNT,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    SerializedEnvironment,
)
from .task import ActorTask

#: Idle time after which replicas are stopped when ``ttl_seconds`` is not given (as in Union's actors).
DEFAULT_TTL_SECONDS = 900

# Settings that describe a replica, so they come from the environment and may not be set per task.
_ENVIRONMENT_OWNED_TASK_ARGS = (
    "container_image",
    "environment",
    "requests",
    "limits",
    "resources",
    "accelerator",
    "secret_requests",
    "pod_template",
    "pod_template_name",
    "interruptible",
    "task_config",
    "shared_memory",
)


@dataclass
class ActorEnvironment:
    """A named fleet of warm replicas that run the environment's tasks one after another, in one process.

    :param name: DNS-1123 label (lower-case letters, digits and ``-``, at most 63 characters); names the fleet and
        its replica pods.
    :param container_image: Image of the replicas; ``None`` uses the default image given at serialization time.
    :param replica_count: Most replicas the fleet scales up to (1 to 1000). Replicas start on demand.
    :param ttl_seconds: Idle seconds after which a replica is stopped (10 s to 7 days; default 900 s).
    :param environment: Environment variables of every replica.
    :param requests: Resource requests of one replica.
    :param limits: Resource limits of one replica.
    :param accelerator: Accelerator of one replica.
    :param secret_requests: Secrets mounted into every replica.
    :param pod_template: Pod template the replica pods are built from.
    :param interruptible: Whether replicas may run on interruptible (spot) nodes.
    :param parallelism: Tasks one replica runs at once (1 to 256), each in its own executor process.
    """

    name: str
    container_image: Optional[Union[str, ImageSpec]] = None
    replica_count: int = 1
    ttl_seconds: Optional[int] = None
    environment: Optional[Dict[str, str]] = None
    requests: Optional[Resources] = None
    limits: Optional[Resources] = None
    accelerator: Optional[BaseAccelerator] = None
    secret_requests: Optional[List[Secret]] = None
    pod_template: Optional[PodTemplate] = None
    interruptible: Optional[bool] = None
    parallelism: int = 1
    _tasks: List[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not ENVIRONMENT_NAME_RE.match(self.name):
            raise ValueError(
                f"ActorEnvironment name {self.name!r} is not a DNS-1123 label: use 1 to 63 lower-case letters, "
                "digits or '-', starting and ending with a letter or digit (for example 'my-actor')."
            )
        _check_int("replica_count", self.replica_count, 1, MAX_REPLICA_COUNT)
        _check_int("parallelism", self.parallelism, 1, MAX_PARALLELISM)
        if self.ttl_seconds is not None:
            _check_int("ttl_seconds", self.ttl_seconds, MIN_TTL_SECONDS, MAX_TTL_SECONDS)
        if self.environment is not None:
            bad = {k: v for k, v in self.environment.items() if not isinstance(k, str) or not isinstance(v, str)}
            if bad:
                raise ValueError(
                    f"ActorEnvironment {self.name!r}: environment must map str to str, got {bad!r}; "
                    "convert the values with str()."
                )
        for arg, cls in (("requests", Resources), ("limits", Resources)):
            value = getattr(self, arg)
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"ActorEnvironment {self.name!r}: {arg} must be flytekit.Resources, got {value!r}."
                )
        if self.pod_template is not None and not isinstance(self.pod_template, PodTemplate):
            raise TypeError(
                f"ActorEnvironment {self.name!r}: pod_template must be flytekit.PodTemplate, got "
                f"{type(self.pod_template).__name__}."
            )

    @property
    def effective_ttl_seconds(self) -> int:
        return DEFAULT_TTL_SECONDS if self.ttl_seconds is None else self.ttl_seconds

    def task(self, _task_function: Optional[Callable] = None, **task_kwargs):
        """Declare a task that runs on this environment's replicas; takes ``flytekit.task``'s per-task arguments
        (``cache``, ``cache_version``, ``retries``, ``timeout``, ``docs``, ...)."""
        self.refuse_owned_task_arguments(task_kwargs, f"@{self.name}.task")

        def wrapper(fn: Callable):
            actor_task = flytekit_task(fn, task_config=self, **task_kwargs)
            self._tasks.append(actor_task)
            return actor_task

        if _task_function is not None:
            return wrapper(_task_function)
        return wrapper

    def refuse_owned_task_arguments(self, arguments: Dict[str, Any], where: str) -> None:
        """Raise if ``arguments`` set what belongs to the environment (``None`` counts as unset)."""
        owned = sorted(k for k in _ENVIRONMENT_OWNED_TASK_ARGS if arguments.get(k) is not None)
        if owned:
            raise TypeError(
                f"{where} got {', '.join(owned)}: on an actor these belong to the environment, since every "
                f"task of ActorEnvironment {self.name!r} runs on the same replicas. Set them on "
                f"ActorEnvironment({self.name!r}, ...) instead."
            )

    def task_arguments(self) -> Dict[str, Any]:
        """The container arguments of every task of this environment (actor tasks and actor maps alike), as
        flytekit's task classes take them. ``interruptible`` travels in the task metadata; the pod template
        travels in ``custom`` only (a task with a pod template would serialize a pod target, which propeller
        does not render for agents)."""
        return {
            "container_image": self.container_image,
            "environment": dict(self.environment or {}),
            "requests": self.requests,
            "limits": self.limits,
            "accelerator": self.accelerator,
            "secret_requests": list(self.secret_requests or []),
        }

    def serialized(self, image: str) -> SerializedEnvironment:
        """The environment as its tasks carry it to the agent, given the image resolved at serialization."""
        replica = self.replica_template(image)
        return SerializedEnvironment(
            name=self.name,
            version=environment_version(replica),
            replica_count=self.replica_count,
            ttl_seconds=self.effective_ttl_seconds,
            parallelism=self.parallelism,
            replica=replica,
        )

    def replica_template(self, image: str) -> Dict[str, Any]:
        """What a replica of this environment is, as plain JSON, given the image resolved at serialization."""
        pod_template = None
        if self.pod_template is not None:
            from kubernetes.client import ApiClient

            pod_template = {
                "primary_container_name": self.pod_template.primary_container_name,
                # Kubernetes' own JSON form (camelCase, no nulls), as a PodTemplateSpec's spec.
                "pod_spec": ApiClient().sanitize_for_serialization(self.pod_template.pod_spec),
                "labels": dict(self.pod_template.labels or {}),
                "annotations": dict(self.pod_template.annotations or {}),
            }
        return {
            "name": self.name,
            "image": image,
            "environment": dict(sorted((self.environment or {}).items())),
            "requests": _resources(self.requests),
            "limits": _resources(self.limits),
            "accelerator": self.accelerator.to_flyte_idl().SerializeToString().hex() if self.accelerator else None,
            "secrets": [_secret(s) for s in self.secret_requests or []],
            "pod_template": pod_template,
            "interruptible": self.interruptible,
            "parallelism": self.parallelism,
        }


def environment_version(replica_template: Dict[str, Any]) -> str:
    """A short deterministic id of a replica template: equal ones share replicas, any change starts new ones."""
    canonical = json.dumps(replica_template, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"ActorEnvironment {name}={value!r} is invalid: it must be an integer from {low} to {high}.")


def _resources(resources: Optional[Resources]) -> Dict[str, str]:
    if resources is None:
        return {}
    out = {}
    for key in ("cpu", "mem", "gpu", "ephemeral_storage"):
        value = getattr(resources, key, None)
        if value is not None:
            out[key] = str(value)
    return out


def _secret(secret: Secret) -> Dict[str, Any]:
    return {
        "group": secret.group,
        "key": secret.key,
        "group_version": secret.group_version,
        "mount_requirement": int(secret.mount_requirement),
        "env_var": getattr(secret, "env_var", None),
    }


# ``@task(task_config=ActorEnvironment(...))`` builds an actor task, as ``@actor.task`` does.
TaskPlugins.register_pythontask_plugin(ActorEnvironment, ActorTask)
