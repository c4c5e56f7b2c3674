"""How the Kubernetes launcher builds replica pods and reads their failures (no API server needed)."""

import json

import pytest
from flytekit.extras.accelerators import A100, T4
from kubernetes.client.rest import ApiException

from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodStatus,
)

from flyte_actor_agent.launchers import ExitReason, ReplicaLaunch
from flyte_actor_agent.placement import Placement
from flyte_actor_agent.launchers.k8s_config import AgentPodConfig
from flyte_actor_agent.launchers.kubernetes import (
    build_replica,
    flyte_secret_annotations,
    pod_failure,
    pod_waiting,
    quota_rejection,
)
from flyte_actor_agent.launchers.pods import PodSpecError
from flytekitplugins.actor.contract import SerializedEnvironment


def pod(phase="Pending", waiting=None, terminated=None, conditions=()):
    state = None
    if waiting:
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason=waiting, message="details"))
    if terminated:
        state = V1ContainerState(terminated=V1ContainerStateTerminated(reason=terminated, exit_code=137))
    statuses = [V1ContainerStatus(name="actor", image="i", image_id="", ready=False, restart_count=0, state=state)]
    return V1Pod(
        metadata=V1ObjectMeta(name="p", namespace="ns", labels={"flyte-actors.io/replica-id": "r1"}),
        status=V1PodStatus(phase=phase, container_statuses=statuses if state else None, conditions=list(conditions)),
    )


def test_start_failures_are_named_by_their_kubernetes_reason():
    for reason, kind in (("ErrImagePull", ExitReason.IMAGE_PULL), ("ImagePullBackOff", ExitReason.IMAGE_PULL),
                         ("CrashLoopBackOff", ExitReason.CRASH_LOOP),
                         ("CreateContainerConfigError", ExitReason.CONFIG_ERROR)):
        failure = pod_failure(pod(waiting=reason))
        assert failure.reason is kind and reason in failure.detail
    failure = pod_failure(pod("Failed", terminated="OOMKilled"))
    assert failure.reason is ExitReason.OOM_KILLED and "OOMKilled" in failure.detail
    assert pod_failure(pod(waiting="ContainerCreating")) is None
    assert pod_failure(pod("Running")) is None


def test_an_unschedulable_pod_is_waiting_not_failing():
    unschedulable = V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable", message="0/3 nodes")
    assert pod_failure(pod(conditions=[unschedulable])) is None
    assert pod_waiting(pod(conditions=[unschedulable])) == "Unschedulable: 0/3 nodes"
    scheduled = V1PodCondition(type="PodScheduled", status="True")
    assert pod_waiting(pod(conditions=[scheduled])) is None
    assert pod_waiting(pod("Running")) is None


def test_a_quota_rejection_is_waiting_other_rejections_are_not():
    over = ApiException(status=403, reason="Forbidden")
    over.body = json.dumps({"message": 'pods "p" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'})
    assert quota_rejection(over).startswith("ResourceQuota: pods \"p\" is forbidden: exceeded quota")
    denied = ApiException(status=403, reason="Forbidden")
    denied.body = json.dumps({"message": "pods is forbidden: User cannot create resource"})
    assert quota_rejection(denied) is None
    invalid = ApiException(status=422, reason="Invalid")
    assert quota_rejection(invalid) is None


def test_secret_annotations_are_encoded_as_flytes_webhook_reads_them():
    # Vectors from flyteplugins' own tests of its secret annotation encoding.
    assert flyte_secret_annotations([{"key": "my_key"}]) == {"flyte.secrets/s0": "nnsxsoraejwxsx2lmv3secq"}
    encoded = flyte_secret_annotations([{"group": "my_group", "key": "my_key", "mount_requirement": 1}])  # ENV_VAR
    assert encoded == {"flyte.secrets/s0": "m4zg54lqhiqce2lzl4txe22voarau12fpe4caitnpfpwwzlzeifg122vnz1f53tfof1ws3tfnvsw34b1ebcu3vs6kzavecq"}


def test_replica_pod_without_pod_template_carries_image_resources_secrets_and_no_token():
    environment = SerializedEnvironment(
        name="env", version="abc", replica_count=1, ttl_seconds=60, parallelism=2,
        replica={"image": "ghcr.io/x/y:1", "environment": {"A": "1"}, "requests": {"cpu": "1", "mem": "1Gi"},
                 "limits": {"gpu": "1"}, "secrets": [{"group": "g", "key": "k", "mount_requirement": 1}]},
    )
    launch = ReplicaLaunch(replica_id="r1", token="s3cr3t", fleet_key="env-abc.ns", environment=environment,
                           agent_address="agent:8001", placement=Placement(namespace="ns", project="p", domain="d"))
    secret, replica = build_replica(launch, "ns")
    (container,) = replica["spec"]["containers"]
    assert container["image"] == "ghcr.io/x/y:1" and container["command"] == ["flyte-actor-replica"]
    # Propeller's rules: limits from requests, the GPU request from its limit.
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}}
    env = {e["name"]: e for e in container["env"]}
    assert env["A"]["value"] == "1" and env["FLYTE_ACTOR_PARALLELISM"]["value"] == "2"
    assert env["FLYTE_ACTOR_ENVIRONMENT_KEY"]["value"] == "env-abc.ns"
    assert env["FLYTE_ACTOR_REPLICA_TOKEN"] == {
        "name": "FLYTE_ACTOR_REPLICA_TOKEN", "valueFrom": {"secretKeyRef": {"name": replica["metadata"]["name"], "key": "token"}}}
    assert "s3cr3t" not in str(replica)
    assert secret["data"] == {"token": "czNjcjN0"}
    labels = replica["metadata"]["labels"]
    assert labels["inject-flyte-secrets"] == "true" and labels["project"] == "p" and labels["domain"] == "d"
    assert "flyte.secrets/s0" in replica["metadata"]["annotations"]
    # What a restarted agent reads back to adopt the replica into the same fleet.
    assert Placement.from_json(replica["metadata"]["annotations"]["flyte-actors.io/placement"]) == launch.placement
    assert replica["spec"]["restartPolicy"] == "Never" and "ownerReferences" not in replica["metadata"]


def gpu_environment(**replica):
    from flytekitplugins.actor import ActorEnvironment

    actor = ActorEnvironment(name="gpu", **replica)
    spec = actor.replica_template("ghcr.io/x/gpu:1")
    return SerializedEnvironment(name="gpu", version="v1", replica_count=1, ttl_seconds=60, parallelism=1, replica=spec)


def launch_of(environment):
    return ReplicaLaunch(replica_id="r1", token="t", fleet_key="gpu-v1.ns", environment=environment,
                         agent_address="agent:8001", placement=Placement(namespace="ns", service_account="sa"))


def test_a_gpu_accelerator_interruptible_environment_gets_propellers_scheduling():
    from flytekit import Resources

    config = AgentPodConfig.from_dict({"plugins": {"k8s": {
        "interruptible-tolerations": [{"key": "spot", "value": "true", "operator": "Equal", "effect": "NoSchedule"}],
        "interruptible-node-selector-requirement": {"key": "spot", "operator": "In", "values": ["true"]},
        "non-interruptible-node-selector-requirement": {"key": "spot", "operator": "DoesNotExist"},
        "gpu-device-node-label": "cloud.google.com/gke-accelerator",
        "gpu-partition-size-node-label": "cloud.google.com/gke-gpu-partition-size",
        "default-env-vars": {"FLYTE_AWS_ENDPOINT": "http://minio:9000"},
        "default-labels": {"team": "ml"},
    }}})
    environment = gpu_environment(requests=Resources(gpu="1", mem="4Gi"), accelerator=A100.partition_1g_5gb,
                                  interruptible=True)
    _, replica = build_replica(launch_of(environment), "ns", config)
    spec = replica["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "FLYTE_AWS_ENDPOINT", "value": "http://minio:9000"} in container["env"]
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": "spot", "operator": "In", "values": ["true"]},
        {"key": "cloud.google.com/gke-accelerator", "operator": "In", "values": ["nvidia-tesla-a100"]},
        {"key": "cloud.google.com/gke-gpu-partition-size", "operator": "In", "values": ["1g.5gb"]},
    ]}]
    assert [t["key"] for t in spec["tolerations"]] == [
        "spot", "cloud.google.com/gke-accelerator", "cloud.google.com/gke-gpu-partition-size"]
    assert replica["metadata"]["labels"]["team"] == "ml"
    assert replica["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert spec["serviceAccountName"] == "sa"


def test_an_accelerator_the_cluster_cannot_honour_is_refused_before_any_pod():
    from flytekit import Resources
    from flytekitplugins.actor import ActorEnvironment

    with pytest.raises(ValueError, match="no GPU is requested"):
        ActorEnvironment(name="x", accelerator=T4)
    with pytest.raises(ValueError, match="not a whole number of GPUs"):
        ActorEnvironment(name="x", requests=Resources(gpu="0.5"))
    with pytest.raises(ValueError, match="differ"):
        ActorEnvironment(name="x", requests=Resources(gpu="1"), limits=Resources(gpu="2"))
    # An agent-side check too (a spec written by hand, or a pod template whose GPU is in another container).
    environment = gpu_environment(requests=Resources(gpu="1"), accelerator=T4)
    environment.replica["requests"] = {}
    with pytest.raises(PodSpecError, match="names accelerator 'nvidia-tesla-t4' but asks for no GPU"):
        build_replica(launch_of(environment), "ns")
