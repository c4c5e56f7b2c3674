"""Actor tasks for the Kubernetes tier."""

import os
import time

from flytekit import PodTemplate
from kubernetes.client import V1Container, V1PodSpec, V1SecurityContext

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


privileged = ActorEnvironment(
    name="kube-privileged",
    container_image="ghcr.io/example/actors:1",
    pod_template=PodTemplate(primary_container_name="actor", pod_spec=V1PodSpec(containers=[
        V1Container(name="actor", security_context=V1SecurityContext(privileged=True))])),
)


@privileged.task
def as_root_of_the_node() -> int:
    return 0
