"""Replica pods by propeller's rules, on a real kube-apiserver (which validates them as it would any pod): a GPU +
accelerator + interruptible environment, the cluster defaults and default pod template of the agent's plugins
config, waiting (Unschedulable, over quota) that is not failing, log links on the RUNNING answer."""

import asyncio
import os
import time

import pytest
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit import FlyteContextManager
from flytekit.models.task import TaskExecutionMetadata
from kubernetes import client

from flyte_actor_agent.launchers.k8s_config import AgentPodConfig
from flyte_actor_agent.launchers.kubernetes import KubernetesLauncher
from flytekitplugins.actor.local import local_template
from harness import LocalFleet, output
from kube import kube_tasks
from kube.test_kubernetes_fleet import metadata as execution_metadata

pytestmark = pytest.mark.timeout(300)
NAMESPACE = "actors-pods"
INTERRUPTIBLE = {"key": "cloud.google.com/gke-spot", "operator": "In", "values": ["true"]}
SPOT_TOLERATION = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
DEFAULT_TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "flyte", "effect": "NoSchedule"}
CONFIG = {
    "plugins": {
        "k8s": {
            "default-env-vars": {"FLYTE_AWS_ENDPOINT": "http://minio.flyte:9000"},
            "default-tolerations": [DEFAULT_TOLERATION],
            "default-node-selector": {"pool": "flyte"},
            "interruptible-tolerations": [SPOT_TOLERATION],
            "interruptible-node-selector-requirement": INTERRUPTIBLE,
            "non-interruptible-node-selector-requirement": {"key": "cloud.google.com/gke-spot",
                                                            "operator": "DoesNotExist"},
            "gpu-device-node-label": "cloud.google.com/gke-accelerator",
            "gpu-partition-size-node-label": "cloud.google.com/gke-gpu-partition-size",
            "default-pod-template-name": "flyte-template",
        },
        "logs": {
            "kubernetes-enabled": True,
            "kubernetes-template-uri": "https://k8s.example.com/#/log/{{ .namespace }}/{{ .podName }}/pod?"
                                       "container={{ .containerName }}&uid={{ .podUID }}",
            "templates": [{"displayName": "This task",
                           "templateUris": ["https://logs.example.com/?exec={{ .executionName }}&node={{ .nodeID }}"
                                            "&from={{ .podUnixStartTime }}"]}],
        },
    },
}


def metadata(execution: str) -> TaskExecutionMetadata:
    base = execution_metadata(execution)
    return TaskExecutionMetadata(
        task_execution_id=base.task_execution_id, namespace=NAMESPACE, labels={}, annotations={},
        k8s_service_account="", environment_variables={}, identity=None)


@pytest.fixture(autouse=True)
def no_replicas_left(cluster, kubelet):
    """Each test starts without replica pods (a stopped agent leaves them for a successor to adopt)."""
    yield
    kubelet.release()
    core = client.CoreV1Api(cluster.api_client())
    core.delete_collection_namespaced_pod(NAMESPACE, label_selector="flyte-actors.io/replica=true",
                                          grace_period_seconds=0)
    deadline = time.monotonic() + 20
    while (kubelet.processes or core.list_namespaced_pod(NAMESPACE).items) and time.monotonic() < deadline:
        time.sleep(0.1)


def pods_fleet(cluster, **options) -> LocalFleet:
    config = AgentPodConfig.from_dict(CONFIG)
    fleet = LocalFleet(
        lambda on_exit: KubernetesLauncher(on_exit, namespaces=[NAMESPACE], api_client=cluster.api_client(),
                                           pod_config=config, quota_retry_seconds=0.2),
        **options,
    )
    fleet.connector.log_config = config.logs
    return fleet


@pytest.fixture(scope="module")
def default_pod_template(cluster, kubelet):
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod_template(NAMESPACE, {"metadata": {"name": "flyte-template"}, "template": {
        "metadata": {"labels": {"from-template": "yes"}},
        "spec": {"containers": [{"name": "default", "image": "docker.io/rwgrim/docker-noop",
                                 "env": [{"name": "FROM_TEMPLATE", "value": "1"}]}]}}})


def the_pod(cluster, environment: str) -> client.V1Pod:
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
        NAMESPACE, label_selector=f"flyte-actors.io/environment={environment}").items
    (pod,) = [p for p in pods if p.metadata.deletion_timestamp is None]
    return pod


def test_a_gpu_pod_waits_unschedulable_then_runs_as_propeller_would_build_it(cluster, kubelet, default_pod_template):
    kubelet.unschedulable = lambda pod: (
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        if "nvidia.com/gpu" in ((pod.spec.containers[0].resources or client.V1ResourceRequirements()).limits or {})
        else None)
    fleet = pods_fleet(cluster)
    try:
        meta = fleet.submit(kube_tasks.on_gpu, seconds=3.0, metadata=metadata("gpu1"))
        waiting = fleet.wait_until(
            lambda: (r := fleet.get(meta)).phase == TaskExecution.WAITING_FOR_RESOURCES and "Insufficient" in r.message
            and r, what="the task to wait for a GPU node")
        assert "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in waiting.message
        # A waiting replica is not a failed start: no start timeout runs for it (tests/unit/test_waiting.py).
        scheduler = fleet.agent.scheduler
        (replica,) = fleet.agent.call(lambda: list(scheduler.replicas.values())).result(timeout=10)
        assert replica.waiting.startswith("Unschedulable") and replica.state.value == "starting"
        assert fleet.agent.call(scheduler.next_deadline).result(timeout=10) is None

        pod = the_pod(cluster, "kube-gpu")
        spec = pod.spec
        (container,) = spec.containers
        # ApplyResourceOverrides: the GPU request has its limit; CPU and memory limits from the requests.
        assert container.resources.requests == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}
        assert container.resources.limits == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}
        # UpdatePod + ApplyGPUNodeSelectors: interruptible and accelerator requirements ANDed in one term.
        (term,) = spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
        assert [(e.key, e.operator, e.values) for e in term.match_expressions] == [
            ("cloud.google.com/gke-spot", "In", ["true"]),
            ("cloud.google.com/gke-accelerator", "In", ["nvidia-tesla-a100"]),
            ("cloud.google.com/gke-gpu-partition-size", "In", ["1g.5gb"]),
        ]
        # (node.kubernetes.io/* tolerations are the API server's own, from its DefaultTolerationSeconds admission.)
        assert [(t.key, t.value) for t in spec.tolerations if not t.key.startswith("node.kubernetes.io/")] == [
            ("cloud.google.com/gke-spot", "true"), ("dedicated", "flyte"),
            ("cloud.google.com/gke-accelerator", "nvidia-tesla-a100"),
            ("cloud.google.com/gke-gpu-partition-size", "1g.5gb"),
        ]
        assert spec.node_selector == {"pool": "flyte"}
        # Cluster defaults and the default pod template reach the pod.
        env = {e.name: e.value for e in container.env}
        assert env["FLYTE_AWS_ENDPOINT"] == "http://minio.flyte:9000" and env["FROM_TEMPLATE"] == "1"
        assert container.image == "ghcr.io/example/actors:1"
        assert pod.metadata.labels["from-template"] == "yes"
        assert pod.metadata.annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert spec.enable_service_links is False and spec.restart_policy == "Never"  # not the template's defaults

        kubelet.release()  # a GPU node came
        running = fleet.wait_until(lambda: (r := fleet.get(meta)).phase == TaskExecution.RUNNING and r,
                                   what="the task to run once its pod is scheduled")
        k8s_link, task_link = running.log_links
        assert k8s_link.name == "Kubernetes Logs" and task_link.name == "This task"
        assert k8s_link.uri == (f"https://k8s.example.com/#/log/{NAMESPACE}/{pod.metadata.name}/pod?container=actor"
                                f"&uid={pod.metadata.uid}")
        assert task_link.uri.startswith("https://logs.example.com/?exec=gpu1&node=n0&from=")
        done = fleet.wait(meta)
        assert done.phase == TaskExecution.SUCCEEDED, done.message
        assert output(done) == "http://minio.flyte:9000"
        # The replica's log bounds the task with its execution id, so a slice per task can be found.
        key = "flytesnacks/development/gpu1/n0/0"
        with open(os.path.join(kubelet.logs, f"{pod.metadata.name}.log")) as f:
            replica_log = f.read()
        assert f"task start: {key} " in replica_log and f"task end: {key} SUCCEEDED" in replica_log
        assert replica_log.index(f"task start: {key}") < replica_log.index(f"task end: {key}")
    finally:
        fleet.stop()


def test_a_namespace_over_its_quota_keeps_the_task_waiting_until_there_is_room(cluster, kubelet, default_pod_template):
    core = client.CoreV1Api(cluster.api_client())
    hard = {"requests.nvidia.com/gpu": "0"}
    core.create_namespaced_resource_quota(NAMESPACE, {"metadata": {"name": "gpus"}, "spec": {"hard": hard}})
    # No quota controller here: set the status it would compute, so admission can count.
    core.patch_namespaced_resource_quota_status("gpus", NAMESPACE, {"status": {"hard": hard, "used": hard}})
    fleet = pods_fleet(cluster)
    try:
        meta = fleet.submit(kube_tasks.on_gpu, seconds=0.0, metadata=metadata("quota1"))
        waiting = fleet.wait_until(
            lambda: (r := fleet.get(meta)).phase == TaskExecution.WAITING_FOR_RESOURCES and "quota" in r.message and r,
            what="the task to wait for quota")
        assert "ResourceQuota" in waiting.message and "exceeded quota: gpus" in waiting.message
        core.delete_namespaced_resource_quota("gpus", NAMESPACE)
        done = fleet.wait(meta)
        assert done.phase == TaskExecution.SUCCEEDED, done.message
    finally:
        fleet.stop()


def test_a_gpu_setting_kubernetes_would_refuse_fails_the_first_task_and_creates_no_pod(cluster, kubelet):
    fleet = pods_fleet(cluster)
    try:
        ctx = FlyteContextManager.current_context()
        template, prefix = local_template(kube_tasks.on_gpu, ctx)
        template.custom["environment"]["replica"]["limits"] = {"gpu": "2"}  # request 1, limit 2
        with pytest.raises(ValueError, match="GPU request '1' and limit '2' differ"):
            asyncio.run(fleet.connector.create(template, prefix, None, metadata("bad1")))
        pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
            NAMESPACE, label_selector="flyte-actors.io/environment=kube-gpu").items
        assert not [p for p in pods if p.metadata.deletion_timestamp is None]
    finally:
        fleet.stop()
