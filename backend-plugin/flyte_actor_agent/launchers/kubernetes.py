"""The Kubernetes launcher: each replica is a pod in the execution's namespace, built from the environment.

The pod comes from the environment's pod template when there is one (its primary container, found by name,
runs the replica worker), else from the image, resources and variables of the environment. The replica's token
lives in a Secret of its own and reaches the worker through ``secretKeyRef``, never in the pod spec. Secrets the
tasks request go through Flyte's secret-injection webhook (the same label and annotations propeller sets).
Labels identify the environment, its version, the project and domain; annotations carry what the agent needs to
adopt the pod after a restart. Replica pods have no owner: they must outlive the agent's pod (an upgrade or an
eviction replaces it) so that the next agent adopts them; a replica that loses the agent for 5 minutes exits, and
the next agent deletes finished replica pods.

One watch per namespace follows the replica pods: a pod that cannot start (image pull errors, a crash before
it connects, unschedulable past a grace, OOM) is reported with its reason, a pod that ends or disappears is
reported gone, and its Secret is deleted with it. Pods use ``restartPolicy: Never``: the agent replaces a dead
replica itself, so a crash is seen at once instead of hidden in a restart loop.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import threading
from typing import Any, Dict, List, Optional

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from flytekitplugins.actor.contract import SerializedEnvironment

from ..placement import Placement
from . import AdoptedReplica, ExitReason, Launcher, OnExit, ReplicaExit, ReplicaLaunch
from .pod_policy import PodPolicy

log = logging.getLogger("flyte-actor-agent.kubernetes")

REPLICA_LABEL = "flyte-actors.io/replica"
LABEL_ENVIRONMENT = "flyte-actors.io/environment"
LABEL_VERSION = "flyte-actors.io/version"
LABEL_REPLICA_ID = "flyte-actors.io/replica-id"
ANNOTATION_FLEET = "flyte-actors.io/fleet-key"
ANNOTATION_ENVIRONMENT = "flyte-actors.io/environment"
ANNOTATION_PLACEMENT = "flyte-actors.io/placement"
TOKEN_KEY = "token"
DEFAULT_CONTAINER = "actor"
#: Waiting reasons after which a container will not start without a change to the environment.
START_FAILURES = {
    "ErrImagePull": ExitReason.IMAGE_PULL,
    "ImagePullBackOff": ExitReason.IMAGE_PULL,
    "InvalidImageName": ExitReason.IMAGE_PULL,
    "CrashLoopBackOff": ExitReason.CRASH_LOOP,
    "CreateContainerConfigError": ExitReason.CONFIG_ERROR,
    "CreateContainerError": ExitReason.CONFIG_ERROR,
}
# Flyte's secret webhook reads each requested secret from these annotations: the protobuf text form of a
# flyteidl core.Secret, base32 with this alphabet and no padding (flyteplugins' encoding package).
_FLYTE_BASE32 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "abcdefghijklmnopqrstuvwxyz123456")


class KubernetesLauncher(Launcher):
    replicas_outlive_agent = True

    def __init__(
        self,
        on_exit: OnExit,
        namespaces: List[str] = (),
        api_client: Optional[client.ApiClient] = None,
        unschedulable_grace: float = 120.0,
        policy: Optional[PodPolicy] = None,
    ):
        """``policy`` (default: :class:`PodPolicy` for ``namespaces``) is what replica pods may ask for."""
        super().__init__(on_exit)
        self.policy = policy or PodPolicy(namespaces=tuple(namespaces))
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = client.CoreV1Api(api_client)
        self.namespaces = list(namespaces)
        self.unschedulable_grace = unschedulable_grace
        self.loop = asyncio.get_running_loop()
        self.pods: Dict[str, tuple] = {}  # replica id -> (namespace, pod name)
        self._reported: set = set()
        self._unschedulable_since: Dict[str, float] = {}
        self._watches: Dict[str, threading.Event] = {}

    # ---------------------------------------------------------------------------------------------- launch

    async def launch(self, replica: ReplicaLaunch) -> None:
        namespace = replica.placement.namespace or (self.namespaces[0] if self.namespaces else "default")
        if self.namespaces and namespace not in self.namespaces:
            raise ValueError(
                f"namespace {namespace!r} is not one this agent may create replicas in ({self.namespaces}); add it "
                "to the agent's --namespaces (and its RBAC) or run the workflow in an allowed namespace"
            )
        secret, pod = build_replica(replica, namespace)
        self.policy.check(pod)  # raises LaunchRefused: nothing is created, nothing watched
        self._ensure_watch(namespace)
        name = pod["metadata"]["name"]
        self.pods[replica.replica_id] = (namespace, name)
        await asyncio.to_thread(self.api.create_namespaced_secret, namespace, secret)
        try:
            created = await asyncio.to_thread(self.api.create_namespaced_pod, namespace, pod)
        except Exception:
            await asyncio.to_thread(self._delete_secret, namespace, name)
            self.pods.pop(replica.replica_id, None)
            raise
        # The Secret goes when its pod goes, even if the agent is not there to delete it.
        owner = {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": created.metadata.uid}
        await asyncio.to_thread(
            self.api.patch_namespaced_secret, name, namespace, {"metadata": {"ownerReferences": [owner]}}
        )

    async def stop(self, replica_id: str, reason: str) -> None:
        where = self.pods.get(replica_id)
        if where is None:
            return
        log.info("deleting replica pod %s/%s: %s", where[0], where[1], reason)
        await asyncio.to_thread(self._delete_pod, *where)

    async def close(self) -> None:
        """Stop watching; replica pods stay, for the next agent to adopt."""
        for stop in self._watches.values():
            stop.set()

    async def adopt(self) -> List[AdoptedReplica]:
        """Replica pods a previous agent left running, with what the agent needs to take them back."""
        adopted = []
        for namespace in self.namespaces or [None]:
            if namespace is None:
                pods = await asyncio.to_thread(self.api.list_pod_for_all_namespaces, label_selector=f"{REPLICA_LABEL}=true")
            else:
                pods = await asyncio.to_thread(self.api.list_namespaced_pod, namespace, label_selector=f"{REPLICA_LABEL}=true")
            for pod in pods.items:
                if pod.metadata.deletion_timestamp is not None:
                    continue
                if pod.status.phase in ("Succeeded", "Failed"):  # gave up on the previous agent: clean up
                    await asyncio.to_thread(self._delete_pod, pod.metadata.namespace, pod.metadata.name)
                    continue
                annotations = pod.metadata.annotations or {}
                try:
                    secret = await asyncio.to_thread(self.api.read_namespaced_secret, pod.metadata.name, pod.metadata.namespace)
                    token = base64.b64decode(secret.data[TOKEN_KEY]).decode()
                    environment = SerializedEnvironment.from_custom(json.loads(annotations[ANNOTATION_ENVIRONMENT]))
                    placement = Placement.from_json(annotations[ANNOTATION_PLACEMENT]) if ANNOTATION_PLACEMENT in annotations \
                        else Placement(namespace=pod.metadata.namespace)
                except (ApiException, KeyError, ValueError) as e:
                    log.warning("cannot adopt replica pod %s/%s (%s); deleting it", pod.metadata.namespace, pod.metadata.name, e)
                    await asyncio.to_thread(self._delete_pod, pod.metadata.namespace, pod.metadata.name)
                    continue
                replica_id = pod.metadata.labels[LABEL_REPLICA_ID]
                self.pods[replica_id] = (pod.metadata.namespace, pod.metadata.name)
                self._ensure_watch(pod.metadata.namespace)
                adopted.append(AdoptedReplica(
                    replica_id=replica_id,
                    token=token,
                    fleet_key=annotations[ANNOTATION_FLEET],
                    environment=environment,
                    placement=placement,
                ))
        return adopted

    # ----------------------------------------------------------------------------------------------- watch

    def _ensure_watch(self, namespace: str) -> None:
        if namespace in self._watches:
            return
        stop = threading.Event()
        self._watches[namespace] = stop
        threading.Thread(target=self._watch, args=(namespace, stop), name=f"watch-{namespace}", daemon=True).start()

    def _watch(self, namespace: str, stop: threading.Event) -> None:
        resource_version = None
        while not stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.api.list_namespaced_pod,
                    namespace,
                    label_selector=f"{REPLICA_LABEL}=true",
                    resource_version=resource_version,
                    timeout_seconds=60,
                ):
                    if stop.is_set():
                        w.stop()
                        return
                    pod = event["object"]
                    resource_version = pod.metadata.resource_version
                    self.loop.call_soon_threadsafe(self._on_pod_event, event["type"], pod)
            except ApiException as e:
                if e.status == 410:  # our resource version is too old: start over from now
                    resource_version = None
                else:
                    log.warning("watching replica pods in %s failed: %s", namespace, e)
                    stop.wait(2)
            except Exception as e:  # noqa: BLE001 - a broken connection: watch again
                log.warning("watch of replica pods in %s broke: %s", namespace, e)
                stop.wait(2)

    def _on_pod_event(self, kind: str, pod: client.V1Pod) -> None:
        replica_id = (pod.metadata.labels or {}).get(LABEL_REPLICA_ID)
        if replica_id is None or replica_id not in self.pods or replica_id in self._reported:
            return
        where = f"pod {pod.metadata.namespace}/{pod.metadata.name}"
        if kind == "DELETED":
            self._gone(replica_id, ReplicaExit(ExitReason.DELETED, f"{where} was deleted"))
            return
        if pod.metadata.deletion_timestamp is not None:
            return
        failure = pod_failure(pod, self._unschedulable_since, self.loop.time(), self.unschedulable_grace)
        if failure is not None:
            self._gone(replica_id, ReplicaExit(failure.reason, f"{where}: {failure.detail}"))
            asyncio.ensure_future(asyncio.to_thread(self._delete_pod, pod.metadata.namespace, pod.metadata.name))

    def _gone(self, replica_id: str, exit: ReplicaExit) -> None:
        self._reported.add(replica_id)
        self.pods.pop(replica_id, None)
        self._unschedulable_since.pop(replica_id, None)
        self.on_exit(replica_id, exit)

    def _delete_pod(self, namespace: str, name: str) -> None:
        """Delete a replica pod and its token Secret (they share the name); gone already is fine."""
        _delete_if_there(self.api.delete_namespaced_pod, namespace, name)
        self._delete_secret(namespace, name)

    def _delete_secret(self, namespace: str, name: str) -> None:
        _delete_if_there(self.api.delete_namespaced_secret, namespace, name)


def _delete_if_there(delete, namespace: str, name: str) -> None:
    try:
        delete(name, namespace)
    except ApiException as e:
        if e.status != 404:
            raise


def pod_failure(
    pod: client.V1Pod, unschedulable_since: Dict[str, float], now: float, grace: float
) -> Optional[ReplicaExit]:
    """Why a replica pod will not (or no longer) run, or ``None`` while it may still be fine."""
    replica_id = pod.metadata.labels.get(LABEL_REPLICA_ID, "")
    status = pod.status
    if status is None:
        return None
    for container in status.container_statuses or []:
        state = container.state
        if state and state.waiting and state.waiting.reason in START_FAILURES:
            return ReplicaExit(
                START_FAILURES[state.waiting.reason],
                f"container {container.name}: {state.waiting.reason}: {state.waiting.message or ''}".rstrip(": "),
            )
        if state and state.terminated:
            t = state.terminated
            reason = ExitReason.OOM_KILLED if t.reason == "OOMKilled" else ExitReason.EXITED
            return ReplicaExit(reason, f"container {container.name} terminated: {t.reason or 'Error'} "
                               f"(exit code {t.exit_code}) {t.message or ''}".rstrip())
    if status.phase in ("Failed", "Succeeded"):
        return ReplicaExit(ExitReason.EXITED,
                           f"pod {status.phase.lower()}: {status.reason or ''} {status.message or ''}".strip())
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            since = unschedulable_since.setdefault(replica_id, now)
            if now - since >= grace:
                return ReplicaExit(ExitReason.UNSCHEDULABLE, f"Unschedulable: {condition.message or ''}".rstrip(": "))
    return None


def build_replica(replica: ReplicaLaunch, namespace: str):
    """The Secret holding the replica's token and the replica's Pod, as Kubernetes JSON."""
    environment = replica.environment
    spec = environment.replica
    name = f"{environment.name}-{replica.replica_id}"[:63].rstrip("-")
    template = spec.get("pod_template") or {}
    pod_spec = copy.deepcopy(template.get("pod_spec") or {"containers": []})
    primary_name = template.get("primary_container_name") or DEFAULT_CONTAINER
    containers = pod_spec.setdefault("containers", [])
    primary = next((c for c in containers if c.get("name") == primary_name), None)
    if primary is None:
        primary = {"name": primary_name}
        containers.insert(0, primary)
    primary.setdefault("image", spec.get("image"))
    primary["command"] = ["flyte-actor-replica"]
    primary["args"] = []
    env = [e for e in primary.get("env") or [] if e.get("name") not in replica.worker_env()]
    env += [{"name": k, "value": v} for k, v in sorted((spec.get("environment") or {}).items())]
    env += [{"name": k, "value": v} for k, v in replica.worker_env().items()]
    env.append({"name": "FLYTE_ACTOR_REPLICA_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": TOKEN_KEY}}})
    env.append({"name": "FLYTE_ACTOR_RECONNECT_SECONDS", "value": "300"})
    primary["env"] = env
    resources = primary.setdefault("resources", {})
    for kind, key in (("requests", "requests"), ("limits", "limits")):
        values = _resources(spec.get(key) or {})
        if values:
            resources.setdefault(kind, {}).update({k: v for k, v in values.items() if k not in resources.get(kind, {})})
    pod_spec["restartPolicy"] = "Never"
    pod_spec.setdefault("enableServiceLinks", False)  # Service variables would clash with FLYTE_ACTOR_AGENT_*
    placement = replica.placement
    if placement.service_account and not pod_spec.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = placement.service_account

    labels = dict(template.get("labels") or {})
    labels.update({
        REPLICA_LABEL: "true",
        LABEL_ENVIRONMENT: environment.name,
        LABEL_VERSION: environment.version,
        LABEL_REPLICA_ID: replica.replica_id,
    })
    for key, value in (("project", placement.project), ("domain", placement.domain)):
        if value:
            labels[key] = value
    annotations = dict(template.get("annotations") or {})
    annotations[ANNOTATION_FLEET] = replica.fleet_key
    annotations[ANNOTATION_ENVIRONMENT] = json.dumps(environment.to_custom(), sort_keys=True)
    annotations[ANNOTATION_PLACEMENT] = placement.to_json()
    secrets = spec.get("secrets") or []
    if secrets:
        labels["inject-flyte-secrets"] = "true"
        annotations.update(flyte_secret_annotations(secrets))

    metadata: Dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {REPLICA_LABEL: "token", LABEL_REPLICA_ID: replica.replica_id}},
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(replica.token.encode()).decode()},
    }
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    return secret, pod


def flyte_secret_annotations(secrets: List[Dict[str, Any]]) -> Dict[str, str]:
    from flyteidl.core import security_pb2
    from google.protobuf import text_format

    annotations = {}
    for i, secret in enumerate(secrets):
        message = security_pb2.Secret(
            group=secret.get("group") or "",
            key=secret.get("key") or "",
            group_version=secret.get("group_version") or "",
            mount_requirement=int(secret.get("mount_requirement") or 0),
            env_var=secret.get("env_var") or "",
        )
        encoded = base64.b32encode(text_format.MessageToString(message).encode()).decode().rstrip("=")
        annotations[f"flyte.secrets/s{i}"] = encoded.translate(_FLYTE_BASE32)
    return annotations


def _resources(values: Dict[str, str]) -> Dict[str, str]:
    names = {"cpu": "cpu", "mem": "memory", "gpu": "nvidia.com/gpu", "ephemeral_storage": "ephemeral-storage"}
    return {names[k]: v for k, v in values.items() if k in names}
