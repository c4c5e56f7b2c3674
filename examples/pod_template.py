"""An environment built from a pod template: the primary container sets a variable the task reads, and a sidecar
runs an image described by an ``ImageSpec`` (flytekit names it at serialization, as for any task's pod template).

    pyflyte run examples/pod_template.py wf
"""

from flytekit import ImageSpec, PodTemplate, workflow
from kubernetes.client import V1Container, V1EnvVar, V1PodSpec

from flytekitplugins.actor import ActorEnvironment

# A sidecar that serves the model files to the replica; any image flytekit can name works here.
model_server = ImageSpec(name="model-server", registry="ghcr.io/example", packages=["fsspec"])

actor = ActorEnvironment(
    name="pod-template-actor",
    replica_count=1,
    ttl_seconds=30,
    pod_template=PodTemplate(
        primary_container_name="primary",
        labels={"team": "ml"},
        pod_spec=V1PodSpec(
            containers=[
                V1Container(name="primary", env=[V1EnvVar(name="GREETING", value="hello from the pod template")]),
                V1Container(name="model-server", image=model_server),
            ],
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
