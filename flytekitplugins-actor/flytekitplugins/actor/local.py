"""Local runs of actor tasks (``pyflyte run`` without ``--remote``, or calling a workflow in Python).

By default each actor task goes to the embedded agent, which starts a fleet of local replica processes per
environment on first use and stops them when this process exits, and waits for the result directly (no polling).
``FLYTE_ACTOR_LOCAL_MODE=inprocess`` runs tasks in this process instead, for debugging with breakpoints; the
environment's variables are applied around each task in both modes. Where the agent is not installed (only the
SDK, as in a notebook) or does not load, tasks run in this process too, after a one-line hint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections import OrderedDict
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

from flyteidl.core.execution_pb2 import TaskExecution
from flytekit import FlyteContext
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.models.literals import LiteralMap

from .contract import replica_variables

if TYPE_CHECKING:
    from .environment import ActorEnvironment
    from .map import ActorMapTask
    from .task import ActorTask

LOCAL_MODE_ENV = "FLYTE_ACTOR_LOCAL_MODE"
#: Entry point group under which the agent package offers its embedded agent (a function returning it).
LOCAL_FLEET_ENTRY_POINT_GROUP = "flytekitplugins.actor.local_fleet"
FLEET, INPROCESS = "fleet", "inprocess"


class ActorTaskFailed(RuntimeError):
    """An actor task failed on the local fleet; the message carries the replica's error."""


def local_mode() -> str:
    mode = os.environ.get(LOCAL_MODE_ENV, FLEET).strip().lower()
    if mode not in (FLEET, INPROCESS):
        raise ValueError(f"{LOCAL_MODE_ENV}={mode!r} is not a local mode: use {FLEET!r} (default) or {INPROCESS!r}.")
    return mode


def runs_on_local_fleet(ctx: FlyteContext) -> bool:
    state = ctx.execution_state
    if state is None or not state.is_local_execution():
        return False
    return local_mode() == FLEET and embedded_agent() is not None


@functools.lru_cache(maxsize=None)
def embedded_agent() -> Optional[Callable[[], Any]]:
    """The embedded agent (a function returning it), found through the entry point the agent package declares (this
    package does not depend on the agent); or ``None`` where there is none or it does not load: actor tasks then run
    in this process, and the first call says so on stderr in one line (cached, so once per process)."""
    found = entry_points(group=LOCAL_FLEET_ENTRY_POINT_GROUP)
    if not found:
        why = "needs flyte-actors-agent (pip install flyte-actors-agent)"
    else:
        try:
            return next(iter(found)).load()
        except ImportError as e:  # installed, but it does not load here (e.g. a flytekit older than the agent's 1.16)
            why = f"cannot load flyte-actors-agent ({e})"
    print(f"flyte-actors: the local fleet {why}; running actor tasks in this process", file=sys.stderr)
    return None


@contextlib.contextmanager
def replica_environment(ctx: FlyteContext, environment: "ActorEnvironment") -> Iterator[None]:
    """Apply the environment's variables while a task runs in this process locally (a replica has them already)."""
    state = ctx.execution_state
    if state is None or not state.is_local_execution():
        yield
        return
    saved = dict(os.environ)
    os.environ.update(replica_variables(environment.replica_template(image="")))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_on_fleet(task: Union["ActorTask", "ActorMapTask"], ctx: FlyteContext, inputs: LiteralMap) -> LiteralMap:
    """Run one actor task (or actor map) on the embedded local fleet and return its outputs."""
    local_agent = embedded_agent()
    if local_agent is None:
        raise RuntimeError(f"Actor task {task.name} cannot run on the local fleet: flyte-actors-agent does not load.")
    template, output_prefix = local_template(task, ctx)
    resource = local_agent().run(template, inputs=inputs, output_prefix=output_prefix)
    if resource.phase != TaskExecution.SUCCEEDED:
        raise ActorTaskFailed(f"Actor task {task.name} failed: {resource.message}")
    return resource.outputs if resource.outputs is not None else LiteralMap(literals={})


def local_template(task: Union["ActorTask", "ActorMapTask"], ctx: FlyteContext):
    """Serialize ``task`` for a run on local replicas: its TaskTemplate with local output paths filled in, and
    its output prefix."""
    from flytekit.tools.translator import get_serializable

    settings = ctx.serialization_settings or SerializationSettings(ImageConfig.auto_default_image())
    template = get_serializable(OrderedDict(), settings, task).template
    output_prefix = ctx.file_access.get_random_local_directory()
    raw_output_prefix = ctx.file_access.raw_output_prefix
    args = [
        a.replace("{{.rawOutputDataPrefix}}", raw_output_prefix).replace("{{.outputPrefix}}", output_prefix)
        for a in template.container.args
    ]
    # pyflyte run imports the workflow file under a name that is importable only from the file's root, which it
    # does not keep on sys.path: tell the replica where the code is, as pyflyte-fast-execute does.
    code_root = _code_root(getattr(task, "actor_task", task).task_function.__module__)
    if code_root is not None and "--resolver" in args:
        at = args.index("--resolver")
        args[at:at] = ["--dynamic-dest-dir", code_root]
    template.container._args = args
    return template, output_prefix


def _code_root(module_name: str) -> Optional[str]:
    """The directory from which ``module_name`` is importable."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = os.path.dirname(os.path.abspath(path))
    depth = module_name.count(".") + (1 if os.path.basename(path) == "__init__.py" else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root
