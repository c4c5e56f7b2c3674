"""Four chained calls on one environment: after the first, each runs on the already-warm replica.

    pyflyte run examples/plus_one.py wf --input 0
"""

from flytekit import workflow

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(name="plus-one-actor", replica_count=1, ttl_seconds=60)


@actor.task
def plus_one(input: int) -> int:
    return input + 1


@workflow
def wf(input: int = 0) -> int:
    a = plus_one(input=input)
    b = plus_one(input=a)
    c = plus_one(input=b)
    return plus_one(input=c)
