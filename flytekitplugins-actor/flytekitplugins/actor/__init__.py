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

from importlib import import_module
from typing import TYPE_CHECKING

# The public API, name -> module. Loaded on first use, so that a replica's worker process (which imports
# flytekitplugins.actor.worker and .protocol) does not pay for importing flytekit.
_API = {
    "ActorEnvironment": ".environment",
    "ActorTask": ".task",
    "ActorMapTask": ".map",
    "map": ".map",
    "actor_cache": ".cache",
    "ACTOR_TASK_TYPE": ".contract",
    "ACTOR_MAP_TASK_TYPE": ".contract",
}

__all__ = sorted(_API)

if TYPE_CHECKING:
    from .cache import actor_cache
    from .environment import ActorEnvironment
    from .contract import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE
    from .map import ActorMapTask, map
    from .task import ActorTask


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'flytekitplugins.actor' has no attribute {name!r}")
    value = getattr(import_module(_API[name], __name__), name)
    globals()[name] = value
    return value
