"""What the integration tests share: the local fleet (``flyte_actor_agent.local_fleet``, also used by the
benchmarks), a free port, and reading an output."""

from __future__ import annotations

from typing import Any

from flytekit.extend.backend.base_connector import Resource

from flyte_actor_agent.local_fleet import LocalFleet

__all__ = ["LocalFleet", "free_port", "output", "stop_served_agent"]


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


def stop_served_agent(process) -> None:
    """SIGTERM a ``flyte-actor-agent serve`` process (its graceful stop), and kill it if it takes over 30 s."""
    import signal
    import subprocess

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
