"""A real actor agent with a fleet of local replica processes (or any launcher), driven through the connector as
Flyte drives it: what the tests and the benchmarks run against.

    fleet = LocalFleet()
    resource = fleet.run(plus_one, x=1)     # create, wait for the agent's completion signal, get
    fleet.stop()

Instead of polling ``get`` (propeller polls every few seconds), it waits on the agent's own completion signal
(``Reactor.wait``) and then calls ``get`` once, so what it measures is the agent, not a polling interval.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.extend.backend.base_connector import Resource

from flytekitplugins.actor.local import local_template

from . import scheduler as core
from .connector import ActorConnector, ActorMetadata
from .launchers import Launcher
from .launchers.local import LocalProcessLauncher
from .lease_service import LeaseService
from .reactor import Reactor


class LocalFleet:
    """``launcher_factory(on_exit)`` makes the launcher (default: local processes running ``worker_command``,
    default the replica worker); the lease service listens on ``lease_port`` of loopback (0: any free port, a
    fixed one to restart an agent in place), or ``channel_factory(reactor)`` makes it (the chaos tests put a proxy
    in front of it); ``reactor_options`` go to :class:`Reactor`."""

    def __init__(self, launcher_factory: Optional[Callable] = None, worker_command: Optional[Sequence[str]] = None,
                 lease_port: int = 0, channel_factory: Optional[Callable] = None, **reactor_options: Any):
        if launcher_factory is None:
            launcher_factory = LocalProcessLauncher
            if worker_command is not None:
                launcher_factory = functools.partial(LocalProcessLauncher, worker_command=worker_command)
        self.launchers: List[Launcher] = []

        def factory(on_exit):
            made = launcher_factory(on_exit)
            self.launchers.append(made)
            return made

        if channel_factory is None:
            channel_factory = lambda reactor: LeaseService(reactor, "127.0.0.1", lease_port)  # noqa: E731
        self.agent = Reactor(factory, **reactor_options).start(channel_factory)
        self.connector = ActorConnector(lambda: self.agent)
        self.root = tempfile.mkdtemp(prefix="flyte-actors-fleet-")
        self._prefixes = 0

    @property
    def launcher(self) -> Launcher:
        return self.launchers[-1]

    # --------------------------------------------------------------------------------- tasks, synchronously

    def submit(self, task, ttl_seconds: Optional[float] = None, metadata=None, **inputs: Any) -> ActorMetadata:
        ctx = FlyteContextManager.current_context()
        template, output_prefix = local_template(task, ctx)
        if ttl_seconds is not None:
            template.custom["environment"]["ttl_seconds"] = ttl_seconds
        literals = TypeEngine.dict_to_literal_map(ctx, inputs, task.get_input_types())
        return asyncio.run(self.connector.create(template, output_prefix, literals, metadata))

    def get(self, meta: ActorMetadata) -> Resource:
        return asyncio.run(self.connector.get(meta, wait=None))

    def wait(self, meta: ActorMetadata, timeout: float = 120) -> Resource:
        self.agent.call(self.agent.wait, meta.key).result(timeout=timeout)
        return self.get(meta)

    def run(self, task, **inputs: Any) -> Resource:
        return self.wait(self.submit(task, **inputs))

    def cancel(self, meta: ActorMetadata) -> None:
        asyncio.run(self.connector.delete(meta))

    def view(self, meta: ActorMetadata):
        return self.on_loop(self.agent.view, meta.key)

    # ------------------------------------------------------------------ templates, asynchronously (benchmarks)

    def template(self, task, **environment: Any):
        """The task's TaskTemplate as a local run serializes it; ``environment`` overrides fields of the
        serialized environment (``replica_count``, ``ttl_seconds``), as a re-registration would."""
        template, _ = local_template(task, FlyteContextManager.current_context())
        template.custom["environment"].update(environment)
        return template

    @staticmethod
    def inputs(task, **values: Any):
        ctx = FlyteContextManager.current_context()
        return TypeEngine.dict_to_literal_map(ctx, values, task.get_input_types())

    def prefix(self) -> str:
        self._prefixes += 1
        return os.path.join(self.root, str(self._prefixes))

    async def create(self, template, inputs=None, prefix: Optional[str] = None) -> ActorMetadata:
        return await self.connector.create(template, prefix or self.prefix(), inputs)

    async def finished(self, key: str) -> None:
        if self.agent.final_view(key, read=False) is None:
            await asyncio.wrap_future(self.agent.call(self.agent.wait, key))

    async def run_template(self, template, inputs=None) -> Resource:
        meta = await self.create(template, inputs)
        await self.finished(meta.key)
        return await self.connector.get(meta, wait=None)

    # ---------------------------------------------------------------------------------------- the agent's state

    def on_loop(self, fn: Callable, *args: Any, timeout: float = 120) -> Any:
        return self.agent.call(fn, *args).result(timeout=timeout)

    def ready_replicas(self) -> int:
        return self.on_loop(
            lambda: sum(1 for r in self.agent.scheduler.replicas.values() if r.state is core.ReplicaState.READY))

    def connected_at(self) -> Dict[str, float]:
        """When each live replica first connected (``time.monotonic``)."""
        return self.on_loop(lambda: {r.id: r.connected_at for r in self.agent.scheduler.replicas.values()
                                     if r.connected_at is not None})

    def wait_until(self, condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
        return wait_until(condition, timeout, what)

    def stop(self) -> None:
        try:
            self.agent.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true (returned), or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
