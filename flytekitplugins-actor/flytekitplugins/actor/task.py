"""The actor task type: a Python function task that serializes with its environment, for the actor agent.

It serializes to a ``container`` target (propeller renders container args for agents, not for pod targets), with
the environment, its version and its pod template in ``custom`` (see :mod:`.contract`). Locally it runs on the
embedded fleet, or in this process when ``FLYTE_ACTOR_LOCAL_MODE=inprocess`` (see :mod:`.local`). Inside a
replica it is an ordinary Python function task.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from flytekit import FlyteContext
from flytekit.configuration import SerializationSettings
from flytekit.core.array_node_map_task import ArrayNodeMapTask
from flytekit.core.python_function_task import PythonFunctionTask
from flytekit.models.literals import LiteralMap

from . import local
from .contract import ACTOR_TASK_TYPE, ActorCustom, SerializedEnvironment

if TYPE_CHECKING:
    from .environment import ActorEnvironment


class RunsOnActors:
    """What actor tasks and actor maps share: local runs go to the local fleet (or run in this process with the
    environment's variables applied); on a replica they are ordinary flytekit tasks."""

    actor_environment: "ActorEnvironment"

    def dispatch_execute(self, ctx: FlyteContext, input_literal_map: LiteralMap) -> Any:
        if local.runs_on_local_fleet(ctx):
            return local.run_on_fleet(self, ctx, input_literal_map)
        with local.replica_environment(ctx, self.actor_environment):
            return super().dispatch_execute(ctx, input_literal_map)  # type: ignore[misc]


class ActorTask(RunsOnActors, PythonFunctionTask["ActorEnvironment"]):
    """A task that runs on the warm replicas of an :class:`ActorEnvironment` (its ``task_config``).

    Made by ``@actor.task`` or ``@flytekit.task(task_config=actor)``; either way the environment's image,
    resources, variables, secrets, accelerator and interruptible flag are the task's, and setting them on the
    task is refused."""

    def __init__(self, task_config: "ActorEnvironment", task_function: Callable, **kwargs):
        environment = task_config
        if kwargs.get("execution_mode") is PythonFunctionTask.ExecutionBehavior.DYNAMIC:
            raise TypeError(
                f"Actor task {task_function.__name__} cannot be @dynamic: a dynamic task hands a sub-workflow back "
                "to propeller instead of outputs, and actor replicas return outputs only. Declare it as a plain "
                "@dynamic (without task_config) and call actor tasks from it: they still run on the actor's "
                f"replicas of ActorEnvironment {environment.name!r}."
            )
        environment.refuse_owned_task_arguments(kwargs, f"Actor task {task_function.__name__}")
        metadata = kwargs.get("metadata")
        if metadata is not None:
            if metadata.interruptible is not None and metadata.interruptible != environment.interruptible:
                environment.refuse_owned_task_arguments({"interruptible": metadata.interruptible},
                                                        f"Actor task {task_function.__name__}")
            metadata.interruptible = environment.interruptible
        kwargs.update(environment.task_arguments())
        super().__init__(task_config=environment, task_function=task_function, task_type=ACTOR_TASK_TYPE, **kwargs)

    @property
    def actor_environment(self) -> "ActorEnvironment":
        return self.task_config

    def serialized_environment(self, settings: SerializationSettings) -> SerializedEnvironment:
        return self.actor_environment.serialized(self.get_image(settings), settings)

    def get_custom(self, settings: SerializationSettings) -> Dict[str, Any]:
        return ActorCustom(environment=self.serialized_environment(settings)).to_custom()


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
