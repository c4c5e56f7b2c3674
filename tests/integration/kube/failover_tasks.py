"""Actor tasks for the failover tests: every run logs its input when it starts, so a test counts re-runs."""

import time

from flytekitplugins.actor import ActorEnvironment

IMAGE = "ghcr.io/example/actors:1"
# ttl_seconds at its minimum: once the work is done, replica pods the new leader adopted are deleted by it.
mapped = ActorEnvironment(name="failover-map", container_image=IMAGE, replica_count=4, parallelism=2,
                          ttl_seconds=10)
queued = ActorEnvironment(name="failover-queue", container_image=IMAGE, replica_count=1, ttl_seconds=10)


def _log(path: str, i: int) -> None:
    with open(path, "a") as f:
        f.write(f"{i}\n")


@mapped.task
def double(i: int, log: str) -> int:
    _log(log, i)
    return 2 * i


@queued.task
def slow_triple(i: int, log: str, seconds: float) -> int:
    _log(log, i)
    time.sleep(seconds)
    return 3 * i
