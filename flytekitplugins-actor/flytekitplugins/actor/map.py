"""``map``: run an actor task over lists, as one Flyte node whose elements the agent spreads over the fleet.

    @workflow
    def wf(xs: list[int]) -> list[int]:
        return map(plus_one, concurrency=8)(x=xs)

OSS propeller cannot run agent-backed sub-tasks inside an ArrayNode (it loses their state), so this is not a
``flytekit.map_task``: it serializes as a single task of type ``actor-map`` that carries the element task's
command, and the agent runs one lease per element and gathers the outputs in order. Inputs bound with
``functools.partial`` are passed whole to every element. With ``min_success_ratio`` below 1 (or ``min_successes``
set) the outputs are lists of ``Optional`` values, ``None`` where an element failed.

As in Flyte's ArrayNode, an element that fails in a retryable way runs again on its own, up to the task's
``retries`` (user errors: raise ``FlyteRecoverableException``) or the agent's system-failure budget (a replica
lost), without re-running the others; ``concurrency=0`` or ``None`` means no limit but the fleet's size.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Dict, List, Optional, Union

from flytekit.configuration import SerializationSettings
from flytekit.core import tracker
from flytekit.core.interface import Interface, transform_types_to_list_of_type
from flytekit.core.python_auto_container import PythonAutoContainerTask

from .contract import ACTOR_MAP_TASK_TYPE, ActorCustom, MapOptions
from .task import ActorTask, RunsOnActors, actor_task_of


class ActorMapTask(RunsOnActors, PythonAutoContainerTask):
    """One node that runs an actor task once per element of its list inputs. Made by :func:`map`."""

    def __init__(
        self,
        target: Union[ActorTask, functools.partial],
        concurrency: Optional[int] = None,
        min_success_ratio: Optional[float] = None,
        min_successes: Optional[int] = None,
    ):
        actor_task = actor_task_of(target)
        if actor_task is None:
            raise TypeError(
                f"flytekitplugins.actor.map needs an actor task (or a functools.partial of one), got {target!r}. "
                "Declare the task with @ActorEnvironment(...).task, or use flytekit.map_task for regular tasks."
            )
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0):
            raise ValueError(f"map concurrency={concurrency!r} is invalid: use a positive integer, or 0 (or None) for "
                             "no limit.")
        if min_successes is not None and (isinstance(min_successes, bool) or not isinstance(min_successes, int)
                                          or min_successes < 0):
            raise ValueError(f"map min_successes={min_successes!r} is invalid: use a whole number of elements >= 0.")
        if min_success_ratio is not None and not 0 <= min_success_ratio <= 1:
            raise ValueError(f"map min_success_ratio={min_success_ratio!r} is invalid: it must be between 0 and 1.")
        self._partial = target if isinstance(target, functools.partial) else None
        if self._partial is not None and self._partial.args:
            raise ValueError("map over a functools.partial takes keyword arguments only, e.g. partial(t, model=m).")
        bound = sorted(self._partial.keywords) if self._partial else []
        unknown = set(bound) - set(actor_task.python_interface.inputs)
        if unknown:
            raise ValueError(f"map: {sorted(unknown)} bound by partial are not inputs of {actor_task.name}.")
        self._actor_task = actor_task
        self._map_options = MapOptions(
            mapped_inputs=[k for k in actor_task.python_interface.inputs if k not in bound],
            bound_inputs=bound,
            concurrency=concurrency or None,
            min_success_ratio=1.0 if min_success_ratio is None else float(min_success_ratio),
            min_successes=min_successes,
        )
        if not self._map_options.mapped_inputs:
            raise ValueError(f"map over {actor_task.name}: every input is bound by partial, so there is nothing to map.")
        optional_outputs = self._map_options.optional
        # What transform_interface_to_list_interface does, whose signature changed in flytekit 1.16.
        interface = Interface(
            inputs=transform_types_to_list_of_type(actor_task.python_interface.inputs, set(bound)),
            outputs=transform_types_to_list_of_type(actor_task.python_interface.outputs, set(), optional_outputs),
        )
        _, module, function, _ = tracker.extract_task_module(actor_task.task_function)
        digest = hashlib.md5(repr(self._map_options.to_custom()).encode()).hexdigest()[:10]
        self._map_name = f"{module}.actor_map_{function}_{digest}"
        super().__init__(
            name=self._map_name,
            task_config=None,
            task_type=ACTOR_MAP_TASK_TYPE,
            interface=interface,
            metadata=actor_task.metadata,
            **actor_task.actor_environment.task_arguments(),
        )

    @property
    def name(self) -> str:
        # Stable whichever workflow creates the map (a workflow would otherwise prefix its own name).
        return self._map_name

    @property
    def actor_task(self) -> ActorTask:
        return self._actor_task

    @property
    def actor_environment(self):
        return self._actor_task.actor_environment

    @property
    def map_options(self) -> MapOptions:
        return self._map_options

    def get_command(self, settings: SerializationSettings) -> List[str]:
        # Elements run the actor task itself, so the map carries the actor task's command.
        return self._actor_task.get_command(settings)

    def get_custom(self, settings: SerializationSettings) -> Dict[str, Any]:
        return ActorCustom(environment=self._actor_task.serialized_environment(settings), map=self._map_options).to_custom()

    def __call__(self, *args, **kwargs):
        if self._partial is not None:
            kwargs = {**self._partial.keywords, **kwargs}
        return super().__call__(*args, **kwargs)

    def execute(self, **kwargs) -> Any:
        """In-process run (local debugging): the elements one after another, honouring ``min_success_ratio``."""
        lengths = {len(kwargs[k]) for k in self._map_options.mapped_inputs}
        if len(lengths) > 1:
            raise ValueError(f"map over {self._actor_task.name}: mapped inputs have different lengths {sorted(lengths)}.")
        size = lengths.pop()
        results: List[Any] = []
        failures = 0
        for i in range(size):
            element = {k: kwargs[k][i] for k in self._map_options.mapped_inputs}
            element.update({k: kwargs[k] for k in self._map_options.bound_inputs})
            try:
                results.append(self._actor_task.execute(**element))
            except Exception:
                if not self._map_options.optional:
                    raise
                failures += 1
                results.append(None)
        options = self._map_options
        required = options.min_successes if options.min_successes is not None else math.ceil(
            options.min_success_ratio * size - 1e-9)
        if size - failures < required:
            limit = (f"min_successes={options.min_successes}" if options.min_successes is not None
                     else f"min_success_ratio={options.min_success_ratio}")
            raise RuntimeError(
                f"map over {self._actor_task.name}: {size - failures} of {size} elements succeeded, fewer than "
                f"{limit}."
            )
        outputs = list(self._actor_task.python_interface.outputs)
        if not outputs:
            return None
        if len(outputs) == 1:
            return results
        return tuple([None if r is None else r[j] for r in results] for j in range(len(outputs)))


def map(
    target: Union[ActorTask, functools.partial],
    concurrency: Optional[int] = None,
    min_success_ratio: Optional[float] = None,
    min_successes: Optional[int] = None,
) -> ActorMapTask:
    """Map an actor task over list inputs: ``map(t, concurrency=4)(x=[1, 2, 3])`` returns a list.
    ``concurrency`` 0 or None: no limit but the fleet's. ``min_successes`` wins over ``min_success_ratio``."""
    return ActorMapTask(target, concurrency=concurrency, min_success_ratio=min_success_ratio,
                        min_successes=min_successes)
