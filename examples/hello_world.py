"""Hello world on one actor: the smallest actor workflow.

    pyflyte run examples/hello_world.py wf
"""

from flytekit import Resources, workflow

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(
    name="hello-actor",
    replica_count=1,
    ttl_seconds=30,
    requests=Resources(cpu="1", mem="450Mi"),
)


@actor.task
def say_hello(name: str) -> str:
    return f"hello {name}"


@workflow
def wf(name: str = "world") -> str:
    return say_hello(name=name)
