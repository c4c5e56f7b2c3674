"""Actor tasks for the security tests: what task code can see of replica tokens, and a task that takes a while."""

import os
import time

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(name="security-test", replica_count=2, ttl_seconds=60)


@actor.task
def snoop() -> str:
    """Everything this task can read that might hold a replica token: its own environment, and the environment and
    command line of every process it can open; the last line lists the pids whose environment it could read."""
    found = [f"{k}={v}" for k, v in os.environ.items()]
    readable = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    found.append(f.read().decode(errors="replace"))
                if name == "environ":
                    readable.append(pid)
            except OSError:
                pass
    return "\n".join(found + [" ".join(readable)])


@actor.task
def sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value
