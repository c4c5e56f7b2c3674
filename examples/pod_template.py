"""An environment built from a pod template: the primary container sets a variable the task reads.

    pyflyte run examples/pod_template.py wf
"""

from flytekit import PodTemplate, workflow
from kubernetes.client import V1Container, V1EnvVar, V1PodSpec

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(
    name="pod-template-actor",
    replica_count=1,
    ttl_seconds=30,
    pod_template=PodTemplate(
        primary_container_name="primary",
        labels={"team": "ml"},
        pod_spec=V1PodSpec(
            containers=[V1Container(name="primary", env=[V1EnvVar(name="GREETING", value="hello from the pod template")])],
        ),
    ),
)


@actor.task
def read_greeting() -> str:
    import os

    return os.environ["GREETING"]


@workflow
def wf() -> str:
    return read_greeting()
