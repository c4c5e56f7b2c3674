"""The embedded agent: an actor agent with a local-process fleet inside this process, for local runs.

``local_agent()`` starts it on first use; it stops its replicas when the process exits. ``run`` goes through the
same connector as a Flyte cluster would, then waits for the task to finish (no polling) and forgets it.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Optional

from flytekit.extend.backend.base_connector import Resource
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskTemplate

from .agent import ActorAgent
from .connector import ActorConnector
from .launchers.local import LocalProcessLauncher

_lock = threading.Lock()
_agent: Optional["EmbeddedAgent"] = None


class EmbeddedAgent:
    def __init__(self, **agent_options):
        self.agent = ActorAgent(lambda on_exit: LocalProcessLauncher(on_exit), **agent_options).start()
        self.connector = ActorConnector(lambda: self.agent)

    def run(self, template: TaskTemplate, inputs: LiteralMap, output_prefix: str) -> Resource:
        """Run one actor task or actor map to completion and return its final Resource."""
        return asyncio.run(self._run(template, inputs, output_prefix))

    async def _run(self, template: TaskTemplate, inputs: LiteralMap, output_prefix: str) -> Resource:
        meta = await self.connector.create(template, output_prefix, inputs)
        try:
            await asyncio.wrap_future(self.agent.call(self.agent.wait, meta.key))
            return await self.connector.get(meta)
        except BaseException:
            await self.connector.delete(meta)
            raise
        finally:
            self.agent.call(self.agent.forget, meta.key)

    def stop(self) -> None:
        self.agent.stop()


def local_agent() -> EmbeddedAgent:
    global _agent
    with _lock:
        if _agent is None:
            _agent = EmbeddedAgent()
            atexit.register(_agent.stop)
        return _agent
