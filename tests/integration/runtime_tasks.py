"""Actor tasks that exercise the replica runtime: state wipe, failures, timeouts, executor deaths."""

import os
import sys
import threading
import time
import uuid

from flytekitplugins.actor import ActorEnvironment, actor_cache
from flytekitplugins.actor.cache import actor_cache as cache_from_its_module

actor = ActorEnvironment(name="runtime-test", replica_count=1, ttl_seconds=60)
wide = ActorEnvironment(name="runtime-wide", replica_count=4, ttl_seconds=60)
parallel = ActorEnvironment(name="runtime-parallel", replica_count=1, parallelism=2)
broken = ActorEnvironment(name="runtime-broken", replica_count=1, environment={"PYTHONMALLOC": "broken-image"})

COUNTER = 0


@actor.task
def bump() -> int:
    global COUNTER
    COUNTER += 1
    return COUNTER


@actor.task
def set_env() -> str:
    os.environ["ACTOR_TEST_LEAK"] = "leaked"
    os.chdir("/")
    return os.environ["ACTOR_TEST_LEAK"]


@actor.task
def read_env() -> str:
    return f"{os.environ.get('ACTOR_TEST_LEAK', '')}|{os.getcwd() != '/'}"


@actor_cache
def token() -> str:
    return uuid.uuid4().hex


@actor.task
def cached_token() -> str:
    return token()


@cache_from_its_module
def other_token() -> str:
    return uuid.uuid4().hex


@actor.task
def plugin_identity() -> str:
    """What must stay the same from task to task: the plugin's modules and the cache reached through them."""
    return f"{id(sys.modules['flytekitplugins.actor.task'])}:{id(sys.modules['flytekitplugins.actor.cache'])}:{other_token()}"


@actor.task
def whoami() -> int:
    return os.getpgid(0)  # the replica's process group: the worker, its fork server and executors


@actor.task
def fail(message: str) -> int:
    if message:
        raise ValueError(message)
    return 0


@actor.task
def exit_task(code: int) -> int:
    sys.exit(code)
    return code


@actor.task
def die() -> int:
    os.kill(os.getpid(), 9)  # what the kernel's OOM killer does
    return 0


@actor.task
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@actor.task(timeout=2)
def too_slow() -> int:
    time.sleep(60)
    return 0


@actor.task
def leak_thread() -> int:
    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
    return threading.active_count()


@wide.task
def record(i: int, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return i * 2


@wide.task
def odd_fails(i: int) -> int:
    if i % 2:
        raise ValueError(f"odd {i}")
    return i


@parallel.task
def rendezvous(directory: str, me: str, other: str) -> int:
    """Finishes only if the other task runs at the same time: both must be running on the one replica."""
    open(os.path.join(directory, me), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(directory, other)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never ran alongside {me}")
        time.sleep(0.05)
    return os.getpgid(0)


@broken.task
def never_runs() -> int:
    return 0


# Elements that count how many elements this executor session has seen (a module global, reset between tasks).
batched = ActorEnvironment(name="runtime-batched", replica_count=1, ttl_seconds=60)
unbatched = ActorEnvironment(name="runtime-unbatched", replica_count=1, ttl_seconds=60,
                             environment={"FLYTE_ACTOR_QUEUE_DEPTH": "0"})
SEEN = []


def _seen(i: int) -> int:
    SEEN.append(i)
    return len(SEEN)


@batched.task
def seen_batched(i: int) -> int:
    return _seen(i)


@unbatched.task
def seen_unbatched(i: int) -> int:
    return _seen(i)


@batched.task(timeout=2)
def hangs_at(i: int, at: int) -> int:
    """Element ``at`` hangs past the timeout, after quick elements of the same batch whose results are not sent yet."""
    if i == at:
        time.sleep(60)
    return i


pair = ActorEnvironment(name="runtime-pair", replica_count=2, ttl_seconds=60)


@pair.task
def nap(seconds: float) -> float:
    """Quick (0 s) most of the time: tasks of it are queued on replicas, until one naps long."""
    time.sleep(seconds)
    return seconds
