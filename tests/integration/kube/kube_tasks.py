"""Actor tasks for the Kubernetes tier."""

import os
import time

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(name="kube-actor", container_image="ghcr.io/example/actors:1", replica_count=1)
unpullable = ActorEnvironment(name="kube-unpullable", container_image="registry.invalid/actors:1")


@actor.task
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return os.environ["FLYTE_ACTOR_REPLICA_ID"]


@unpullable.task
def never() -> int:
    return 0
