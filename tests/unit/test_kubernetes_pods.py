"""How the Kubernetes launcher builds replica pods and reads their failures (no API server needed)."""

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

from flyte_actor_agent.launchers import ExitReason, ReplicaExit, ReplicaLaunch
from flyte_actor_agent.placement import Placement
from flyte_actor_agent.launchers.kubernetes import build_replica, flyte_secret_annotations, pod_failure
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
        failure = pod_failure(pod(waiting=reason), {}, 0.0, 0.0)
        assert failure.reason is kind and reason in failure.detail
    failure = pod_failure(pod("Failed", terminated="OOMKilled"), {}, 0.0, 0.0)
    assert failure.reason is ExitReason.OOM_KILLED and "OOMKilled" in failure.detail
    assert pod_failure(pod(waiting="ContainerCreating"), {}, 0.0, 0.0) is None
    assert pod_failure(pod("Running"), {}, 0.0, 0.0) is None


def test_unschedulable_fails_only_after_its_grace():
    unschedulable = V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable", message="0/3 nodes")
    since = {}
    assert pod_failure(pod(conditions=[unschedulable]), since, 100.0, 60.0) is None
    assert pod_failure(pod(conditions=[unschedulable]), since, 159.0, 60.0) is None
    assert pod_failure(pod(conditions=[unschedulable]), since, 160.0, 60.0) == ReplicaExit(
        ExitReason.UNSCHEDULABLE, "Unschedulable: 0/3 nodes")


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
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": "1"}}
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
