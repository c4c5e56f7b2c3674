"""Tasks the benchmarks run. Each actor environment has the replica count its benchmark needs.

Keep this module small: on the executor's full path a replica re-imports the task's module before every task (see
worker/sandbox.py), so its size is part of that path's per-task cost, as a user's module would be; the fast path
keeps it imported and resets it in place.
"""

import os
import time

from flytekit import task

from flytekitplugins.actor import ActorEnvironment, actor_cache

#: Benchmark 1: an actor map of hello-world elements over 25 replicas.
hello_env = ActorEnvironment(name="bench-hello", replica_count=25, ttl_seconds=600)
#: Benchmarks 2 and 4: one warm replica.
single_env = ActorEnvironment(name="bench-single", replica_count=1, ttl_seconds=600)
#: Benchmarks 3 and 5: four replicas.
quad_env = ActorEnvironment(name="bench-quad", replica_count=4, ttl_seconds=600)

#: Seconds a model load takes in benchmark 5.
LOAD_SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "1"))


@hello_env.task
def hello(name: str) -> str:
    return f"hello {name}"


@task
def hello_plain(name: str) -> str:
    """The same element as a regular task, for the fresh-process (one pod per element) baseline."""
    return f"hello {name}"


@single_env.task
def noop() -> None:
    pass


@quad_env.task
def noop4() -> None:
    pass


def _load(log: str) -> str:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(LOAD_SECONDS)
    return "model"


@actor_cache
def load_model_cached(log: str) -> str:
    return _load(log)


@quad_env.task
def predict_cached(x: int, log: str) -> int:
    load_model_cached(log)
    return x


@quad_env.task
def predict_uncached(x: int, log: str) -> int:
    _load(log)
    return x
