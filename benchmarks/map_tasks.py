"""The task of benchmark 7 (a large actor map); small, as a replica re-imports it before every element."""

from flytekitplugins.actor import ActorEnvironment, map

large_env = ActorEnvironment(name="bench-large-map", replica_count=2, parallelism=2, ttl_seconds=600)


@large_env.task
def plus_one(i: int) -> int:
    return i + 1


plus_one_map = map(plus_one, concurrency=0)
