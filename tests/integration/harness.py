"""A real actor agent (local-process fleet by default, or any launcher), driven through the connector as Flyte
would drive it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.extend.backend.base_connector import Resource

from flyte_actor_agent.agent import ActorAgent
from flyte_actor_agent.connector import ActorConnector, ActorMetadata
from flyte_actor_agent.launchers.local import LocalProcessLauncher
from flytekitplugins.actor.local import local_template


class LocalFleet:
    def __init__(self, launcher_factory=LocalProcessLauncher, **agent_options: Any):
        self.launchers = []

        def launcher(on_exit):
            made = launcher_factory(on_exit)
            self.launchers.append(made)
            return made

        self.agent = ActorAgent(launcher, **agent_options).start()
        self.connector = ActorConnector(lambda: self.agent)

    @property
    def launcher(self):
        return self.launchers[-1]

    def submit(self, task, ttl_seconds: Optional[float] = None, metadata=None, **inputs: Any) -> ActorMetadata:
        ctx = FlyteContextManager.current_context()
        template, output_prefix = local_template(task, ctx)
        if ttl_seconds is not None:
            template.custom["environment"]["ttl_seconds"] = ttl_seconds
        literals = TypeEngine.dict_to_literal_map(ctx, inputs, task.get_input_types())
        return asyncio.run(self.connector.create(template, output_prefix, literals, metadata))

    def get(self, meta: ActorMetadata) -> Resource:
        return asyncio.run(self.connector.get(meta))

    def wait(self, meta: ActorMetadata, timeout: float = 120) -> Resource:
        self.agent.call(self.agent.wait, meta.key).result(timeout=timeout)
        return self.get(meta)

    def run(self, task, **inputs: Any) -> Resource:
        return self.wait(self.submit(task, **inputs))

    def cancel(self, meta: ActorMetadata) -> None:
        asyncio.run(self.connector.delete(meta))

    def view(self, meta: ActorMetadata):
        return self.agent.call(self.agent.view, meta.key).result(timeout=10)

    def wait_until(self, condition, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self.agent.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output(resource: Resource, name: str = "o0") -> Any:
    literal = resource.outputs.literals[name]
    scalar = literal.scalar
    if scalar.primitive is not None:
        return scalar.primitive.value
    return literal
