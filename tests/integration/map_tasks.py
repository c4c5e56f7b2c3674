"""Actor tasks and maps for the large-map tests (``test_map_scale.py``) and the map benchmark."""

import functools
import os
import uuid

from flytekit.exceptions.user import FlyteRecoverableException

from flytekitplugins.actor import ActorEnvironment, map

env = ActorEnvironment(name="map-scale", replica_count=2, parallelism=2, ttl_seconds=300)


@env.task
def text(i: int, size: int) -> str:
    """``size`` characters of output."""
    return str(i % 10) * size


@env.task
def tiny(i: int) -> int:
    return i + 1


@env.task(retries=2)
def flaky(i: int, runs_dir: str, fail_index: int) -> int:
    """Counts its runs as files in ``runs_dir``; element ``fail_index`` fails (recoverably) on its first two runs."""
    runs = [n for n in os.listdir(runs_dir) if n.startswith(f"{i}-")]
    with open(os.path.join(runs_dir, f"{i}-{uuid.uuid4().hex}"), "w"):
        pass
    if i == fail_index and len(runs) < 2:
        raise FlyteRecoverableException(f"element {i} fails on run {len(runs) + 1}")
    return i


@env.task
def odd_fails(i: int) -> int:
    if i % 2:
        raise ValueError(f"element {i} is odd")
    return i


@env.task
def measure(data: str, i: int) -> int:
    return len(data) + i


@env.task
def length(data: str) -> int:
    return len(data)


text_map = map(text)
tiny_map = map(tiny, concurrency=0)
# Bound inputs (given to every element) are inputs of the map too; the values here are only what a local call
# would use when not given.
flaky_map = map(functools.partial(flaky, runs_dir="", fail_index=-1))
odd_fails_map = map(odd_fails, min_successes=3)
measure_map = map(functools.partial(measure, data=""))

# flytekit offloads outputs of at least _F_L_MIN_SIZE_MB (propeller sets it in pods when literal offloading is on);
# 0 offloads every output.
offloading_env = ActorEnvironment(name="map-offloading", replica_count=1, environment={"_F_L_MIN_SIZE_MB": "0"})


@offloading_env.task
def offloaded_text(i: int) -> str:
    return f"element {i}"


offloaded_map = map(offloaded_text)
