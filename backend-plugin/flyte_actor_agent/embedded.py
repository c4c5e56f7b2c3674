"""The embedded agent: an actor agent with a local-process fleet inside this process, for local runs.

``local_agent()`` starts it on first use; it stops its replicas when the process exits. ``run`` goes through the
same connector as a Flyte cluster would, then waits for the task to finish (no polling) and forgets it.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Optional

from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit.extend.backend.base_connector import Resource
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskTemplate

from .connector import ActorConnector
from .launchers.local import LocalProcessLauncher
from .outputs import OUTPUTS_FILE, read
from .lease_service import LeaseService
from .reactor import Reactor

_lock = threading.Lock()
_agent: Optional["EmbeddedAgent"] = None


class EmbeddedAgent:
    def __init__(self, **agent_options):
        self.agent = Reactor(LocalProcessLauncher, **agent_options).start(LeaseService)
        self.connector = ActorConnector(lambda: self.agent)

    def run(self, template: TaskTemplate, inputs: LiteralMap, output_prefix: str) -> Resource:
        """Run one actor task or actor map to completion and return its final Resource."""
        future = self.agent.call(self._run, template, inputs, output_prefix)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # the coroutine's cleanup cancels the task on its replica
            raise

    async def _run(self, template: TaskTemplate, inputs: LiteralMap, output_prefix: str) -> Resource:
        # Runs on the agent loop: the connector's hops onto it complete without blocking.
        meta = await self.connector.create(template, output_prefix, inputs)
        try:
            await self.agent.wait(meta.key)
            resource = await self.connector.get(meta, wait=None)
            if resource.phase == TaskExecution.SUCCEEDED and resource.outputs is None and template.interface.outputs:
                # Too large to answer inline: read outputs.pb as propeller would.
                raw = await asyncio.to_thread(read, f"{output_prefix.rstrip('/')}/{OUTPUTS_FILE}")
                resource.outputs = LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(raw))
            return resource
        except BaseException:
            self.agent.cancel(meta.key, "the local run was interrupted")
            raise
        finally:
            self.agent.forget(meta.key)

    def stop(self) -> None:
        self.agent.stop()


def local_agent() -> EmbeddedAgent:
    global _agent
    with _lock:
        if _agent is None:
            _agent = EmbeddedAgent()
            atexit.register(_agent.stop)
        return _agent
