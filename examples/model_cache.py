"""``@actor_cache``: four chained calls share one loaded model, because the replica keeps it between tasks.

    pyflyte run examples/model_cache.py wf

The loader appends a line to the file named by ``ACTOR_EXAMPLES_LOAD_LOG`` (when set) so that the tests can
count how often the model was really loaded.
"""

import os
import time

from flytekit import workflow

from flytekitplugins.actor import ActorEnvironment, actor_cache

actor = ActorEnvironment(name="model-cache-actor", replica_count=1, ttl_seconds=60)


def record_load(what: str) -> None:
    log = os.environ.get("ACTOR_EXAMPLES_LOAD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{what} {os.getpid()}\n")


@actor_cache
def load_model(state: int):
    time.sleep(1)  # stands in for an expensive load
    record_load(f"model-{state}")
    return lambda value: state + value


@actor.task
def evaluate(value: int, state: int) -> int:
    return load_model(state=state)(value)


@workflow
def wf(init_value: int = 1, state: int = 3) -> int:
    out = evaluate(value=init_value, state=state)
    out = evaluate(value=out, state=state)
    out = evaluate(value=out, state=state)
    return evaluate(value=out, state=state)
