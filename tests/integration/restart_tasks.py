"""Actor tasks for the restart tests: each run is logged when it starts, so a test counts runs, re-runs included."""

import time

from flytekitplugins.actor import ActorEnvironment

durable = ActorEnvironment(name="durable-test", replica_count=2, ttl_seconds=60, parallelism=2)


@durable.task
def logged_double(i: int, log: str, seconds: float) -> int:
    with open(log, "a") as f:
        f.write(f"{i}\n")
    time.sleep(seconds)
    return i * 2
