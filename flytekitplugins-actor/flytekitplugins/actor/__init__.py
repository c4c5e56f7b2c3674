"""
Actors for Flyte: tasks of one ``ActorEnvironment`` run on a warm fleet of replicas that are reused from task to
task, so they skip pod start-up and keep what ``@actor_cache`` loaded.

.. code-block:: python

    from flytekit import workflow
    from flytekitplugins.actor import ActorEnvironment, actor_cache, map

    actor = ActorEnvironment(name="my-actor", replica_count=2, ttl_seconds=300)

    @actor.task
    def plus_one(x: int) -> int:
        return x + 1

    @workflow
    def wf(xs: list[int]) -> list[int]:
        return map(plus_one)(x=xs)

.. autosummary::

   ActorEnvironment
   ActorTask
   ActorMapTask
   actor_cache
   map
"""

from .cache import actor_cache
from .environment import ActorEnvironment
from .map import ActorMapTask, map
from .spec import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE
from .task import ActorConfig, ActorTask

__all__ = [
    "ACTOR_MAP_TASK_TYPE",
    "ACTOR_TASK_TYPE",
    "ActorConfig",
    "ActorEnvironment",
    "ActorMapTask",
    "ActorTask",
    "actor_cache",
    "map",
]
