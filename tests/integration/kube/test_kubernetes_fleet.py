"""The Kubernetes launcher against a real kube-apiserver, with a test-side kubelet that runs the pods locally:
replica pods from a pod template, tokens kept out of pod specs, start failures, TTL deletion, agent restart."""

import json
import os

import pytest
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit.models.core.identifier import (
    Identifier,
    NodeExecutionIdentifier,
    ResourceType,
    TaskExecutionIdentifier,
    WorkflowExecutionIdentifier,
)
from flytekit.models.task import TaskExecutionMetadata
from kubernetes import client

from examples import pod_template as pod_template_example
from harness import LocalFleet, free_port, output
from kube import kube_tasks
from flyte_actor_agent.launchers.kubernetes import KubernetesLauncher

pytestmark = pytest.mark.timeout(300)
NAMESPACE = "actors"


def metadata(execution: str, node: str = "n0") -> TaskExecutionMetadata:
    return TaskExecutionMetadata(
        task_execution_id=TaskExecutionIdentifier(
            task_id=Identifier(ResourceType.TASK, "flytesnacks", "development", "t", "v1"),
            node_execution_id=NodeExecutionIdentifier(node, WorkflowExecutionIdentifier("flytesnacks", "development", execution)),
            retry_attempt=0,
        ),
        namespace=NAMESPACE,
        labels={},
        annotations={},
        k8s_service_account="",
        environment_variables={},
        identity=None,
    )


def kube_fleet(cluster, **options) -> LocalFleet:
    return LocalFleet(
        lambda on_exit: KubernetesLauncher(
            on_exit, namespaces=[NAMESPACE], api_client=cluster.api_client(), unschedulable_grace=0,
        ),
        **options,
    )


def replica_pods(cluster):
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
        NAMESPACE, label_selector="flyte-actors.io/replica=true")
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


def test_replica_pods_are_built_from_the_pod_template_and_run_tasks(cluster, kubelet):
    fleet = kube_fleet(cluster)
    try:
        resource = fleet.wait(fleet.submit(pod_template_example.read_greeting, metadata=metadata("e1")))
        assert resource.phase == TaskExecution.SUCCEEDED, resource.message
        assert output(resource) == "hello from the pod template"
        (pod,) = [p for p in replica_pods(cluster) if p.metadata.labels["flyte-actors.io/environment"] == "pod-template-actor"]
        labels = pod.metadata.labels
        assert labels["team"] == "ml" and labels["project"] == "flytesnacks" and labels["domain"] == "development"
        primary = pod.spec.containers[0]
        assert primary.name == "primary" and primary.command == ["flyte-actor-replica"]
        env = {e.name: e for e in primary.env}
        assert env["GREETING"].value == "hello from the pod template"
        assert env["FLYTE_ACTOR_REPLICA_TOKEN"].value is None
        assert env["FLYTE_ACTOR_REPLICA_TOKEN"].value_from.secret_key_ref.name == pod.metadata.name
        replica = fleet.agent.scheduler.replicas[labels["flyte-actors.io/replica-id"]]
        assert replica.token not in json.dumps(client.ApiClient().sanitize_for_serialization(pod))
        assert pod.spec.restart_policy == "Never"
    finally:
        fleet.stop()


def test_a_replica_that_cannot_pull_its_image_fails_the_task_with_the_reason(cluster, kubelet):
    fleet = kube_fleet(cluster)
    try:
        resource = fleet.wait(fleet.submit(kube_tasks.never, metadata=metadata("e2")))
        assert resource.phase == TaskExecution.FAILED
        assert "cannot start" in resource.message and "ErrImagePull" in resource.message
    finally:
        fleet.stop()


def test_idle_replica_pods_and_their_token_secrets_are_deleted_after_the_ttl(cluster, kubelet):
    fleet = kube_fleet(cluster)
    try:
        resource = fleet.wait(fleet.submit(kube_tasks.slow, seconds=0.0, ttl_seconds=1, metadata=metadata("e3")))
        assert resource.phase == TaskExecution.SUCCEEDED, resource.message
        replica_id = output(resource)
        api = client.CoreV1Api(cluster.api_client())

        def gone():
            pods = api.list_namespaced_pod(NAMESPACE, label_selector=f"flyte-actors.io/replica-id={replica_id}")
            secrets = api.list_namespaced_secret(NAMESPACE, label_selector=f"flyte-actors.io/replica-id={replica_id}")
            return not pods.items and not secrets.items

        fleet.wait_until(gone, timeout=60, what="the replica pod and its Secret to be deleted")
    finally:
        fleet.stop()


def test_a_restarted_agent_adopts_running_replicas_and_finishes_their_tasks(cluster, kubelet):
    lease_port = free_port()
    lease_key = os.urandom(32)  # what the chart keeps in a Secret: the next agent verifies the leases it finds
    first = kube_fleet(cluster, lease_port=lease_port, lease_key=lease_key)
    meta = first.submit(kube_tasks.slow, seconds=4.0, metadata=metadata("e4"))
    first.wait_until(lambda: first.get(meta).phase == TaskExecution.RUNNING, what="the task to start")
    replica_id = first.view(meta).replica_id
    first.stop()  # the pods stay: the next agent adopts them
    assert replica_pods(cluster)

    second = kube_fleet(cluster, lease_port=lease_port, recovery_grace=60, lease_key=lease_key)
    try:
        # The new agent never saw this task: it waits for the replica to report it instead of failing it.
        assert second.get(meta).phase == TaskExecution.RUNNING
        resource = second.wait_until(
            lambda: (r := second.get(meta)).phase == TaskExecution.SUCCEEDED and r, timeout=60,
            what="the adopted replica to report the task")
        assert output(resource) == replica_id
        unknown = second.get(type(meta)(key="flytesnacks/development/never-seen/n0/0"))
        assert unknown.phase == TaskExecution.RUNNING  # still within the grace period
    finally:
        second.stop()


def test_a_replica_pod_the_pod_policy_refuses_fails_its_task_and_creates_nothing(cluster, kubelet):
    fleet = kube_fleet(cluster)
    try:
        resource = fleet.wait(fleet.submit(kube_tasks.as_root_of_the_node, metadata=metadata("e5")), timeout=60)
        assert resource.phase == TaskExecution.FAILED
        assert "spec.containers[0].securityContext.privileged=True" in resource.message
        assert "--allow-privileged" in resource.message and "podPolicy.allowPrivileged" in resource.message
        api = client.CoreV1Api(cluster.api_client())
        assert not [p for p in replica_pods(cluster) if p.metadata.labels.get("flyte-actors.io/environment")
                    == "kube-privileged"]
        assert not [s for s in api.list_namespaced_secret(NAMESPACE).items if s.metadata.name.startswith("kube-privileged")]
    finally:
        fleet.stop()
