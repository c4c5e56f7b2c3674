"""The actor task type: a Python function task that serializes with its environment, for the actor agent.

It serializes to a ``container`` target (propeller renders container args for agents, not for pod targets), with
the environment, its version and its pod template in ``custom`` (see :mod:`.spec`). Locally it runs on the
embedded fleet, or in this process when ``FLYTE_ACTOR_LOCAL_MODE=inprocess`` (see :mod:`.local`). Inside a
replica it is an ordinary Python function task.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from flytekit import FlyteContext
from flytekit.configuration import SerializationSettings
from flytekit.core.array_node_map_task import ArrayNodeMapTask
from flytekit.core.python_function_task import PythonFunctionTask
from flytekit.extend import TaskPlugins
from flytekit.models.literals import LiteralMap

from .environment import ActorEnvironment, environment_version
from .spec import ACTOR_TASK_TYPE, ActorCustom, EnvironmentSpec


@dataclass
class ActorConfig:
    """``task_config`` of an actor task: the environment it runs on. Made by ``@ActorEnvironment.task``."""

    environment: ActorEnvironment


def environment_spec(environment: ActorEnvironment, image: str,
                     settings: Optional[SerializationSettings] = None) -> EnvironmentSpec:
    replica = environment.spec(image, settings)
    return EnvironmentSpec(
        name=environment.name,
        version=environment_version(replica),
        replica_count=environment.replica_count,
        ttl_seconds=environment.effective_ttl_seconds,
        parallelism=environment.parallelism,
        replica=replica,
    )


class ActorTask(PythonFunctionTask[ActorConfig]):
    """A task that runs on the warm replicas of an :class:`ActorEnvironment`."""

    def __init__(self, task_config: ActorConfig, task_function: Callable, **kwargs):
        if not isinstance(task_config, ActorConfig):
            raise TypeError(f"ActorTask needs an ActorConfig, got {task_config!r}; use @ActorEnvironment(...).task.")
        super().__init__(task_config=task_config, task_function=task_function, task_type=ACTOR_TASK_TYPE, **kwargs)

    @property
    def actor_environment(self) -> ActorEnvironment:
        return self.task_config.environment

    def environment_spec(self, settings: SerializationSettings) -> EnvironmentSpec:
        return environment_spec(self.actor_environment, self.get_image(settings), settings)

    def get_custom(self, settings: SerializationSettings) -> Dict[str, Any]:
        return ActorCustom(environment=self.environment_spec(settings)).to_custom()

    def dispatch_execute(self, ctx: FlyteContext, input_literal_map: LiteralMap) -> Any:
        from . import local

        if local.runs_on_local_fleet(ctx):
            return local.run_on_fleet(self, ctx, input_literal_map)
        with local.replica_environment(ctx, self.actor_environment):
            return super().dispatch_execute(ctx, input_literal_map)


TaskPlugins.register_pythontask_plugin(ActorConfig, ActorTask)


def actor_task_of(target: Any) -> Optional[ActorTask]:
    """The actor task behind ``target`` (a task or a ``functools.partial`` of one), else ``None``."""
    func = getattr(target, "func", target)
    return func if isinstance(func, ActorTask) else None


def _refuse_actor_tasks_in_array_node(init):
    @functools.wraps(init)
    def __init__(self, python_function_task, *args, **kwargs):
        if actor_task_of(python_function_task) is not None:
            raise TypeError(
                f"flytekit.map_task cannot map actor task {actor_task_of(python_function_task).name}: Flyte's "
                "ArrayNode cannot run agent tasks. Use flytekitplugins.actor.map(task)(...) instead, which spreads "
                "the elements over the actor's replicas."
            )
        init(self, python_function_task, *args, **kwargs)

    return __init__


# flytekit.map_task offers no hook to refuse a sub-task, so its constructor is wrapped once, when actor tasks are
# first imported (before any actor task exists).
if not getattr(ArrayNodeMapTask.__init__, "_refuses_actor_tasks", False):
    ArrayNodeMapTask.__init__ = _refuse_actor_tasks_in_array_node(ArrayNodeMapTask.__init__)
    ArrayNodeMapTask.__init__._refuses_actor_tasks = True  # type: ignore[attr-defined]
