"""The Kubernetes launcher: each replica is a pod in the execution's namespace, built from the environment.

The pod comes from the environment's pod template when there is one (its primary container, found by name,
runs the replica worker), else from the image, resources and variables of the environment. The replica's token
lives in a Secret of its own and reaches the worker through ``secretKeyRef``, never in the pod spec. Secrets the
tasks request go through Flyte's secret-injection webhook (the same label and annotations propeller sets).
Labels identify the environment, its version, the project and domain; annotations carry what the agent needs to
adopt the pod after a restart. Replica pods have no owner: they must outlive the agent's pod (an upgrade or an
eviction replaces it) so that the next agent adopts them; a replica that loses the agent for 5 minutes exits, and
the next agent deletes finished replica pods.

The pod spec follows the rules flytepropeller applies to task pods (:mod:`.pods`): GPU limits, accelerator and
interruptible node affinity and tolerations, resource defaults and limits, the cluster defaults and the default
pod template of the agent's plugins config (:mod:`.k8s_config`, propeller's keys).

One watch per namespace follows the replica pods: a pod that cannot start (image pull errors, a crash before
it connects, OOM) is reported with its reason, a pod that ends or disappears is reported gone, and its Secret is
deleted with it. A pod that waits for a node (Unschedulable) or a namespace over its quota is not failing: the
launcher says the replica is waiting, with the reason, until it runs or ``pod-pending-timeout`` passes (default:
wait, as Flyte does). Pods use ``restartPolicy: Never``: the agent replaces a dead replica itself, so a crash is
seen at once instead of hidden in a restart loop.
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
from . import pods
from .k8s_config import AgentPodConfig

log = logging.getLogger("flyte-actor-agent.kubernetes")

REPLICA_LABEL = "flyte-actors.io/replica"
LABEL_ENVIRONMENT = "flyte-actors.io/environment"
LABEL_VERSION = "flyte-actors.io/version"
LABEL_REPLICA_ID = "flyte-actors.io/replica-id"
ANNOTATION_FLEET = "flyte-actors.io/fleet-key"
ANNOTATION_ENVIRONMENT = "flyte-actors.io/environment"
ANNOTATION_PLACEMENT = "flyte-actors.io/placement"
#: The container that runs the replica worker (whose logs the log links show).
ANNOTATION_CONTAINER = "flyte-actors.io/container"
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
        pod_config: Optional[AgentPodConfig] = None,
        agent_namespace: str = "",
        quota_retry_seconds: float = 10.0,
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
        self.api_client = api_client
        self.api = client.CoreV1Api(api_client)
        self.namespaces = list(namespaces)
        self.pod_config = pod_config or AgentPodConfig()
        #: Where the default pod template is looked for when the replica's namespace has none (propeller's own).
        self.agent_namespace = agent_namespace
        self.quota_retry_seconds = quota_retry_seconds
        self.loop = asyncio.get_running_loop()
        self.pods: Dict[str, tuple] = {}  # replica id -> (namespace, pod name)
        self.placements: Dict[str, Dict[str, Any]] = {}  # replica id -> what log links name (see placement())
        self._reported: set = set()
        self._waiting: Dict[str, str] = {}  # replica id -> why its pod waits
        self._pending_timers: Dict[str, asyncio.TimerHandle] = {}
        self._stopped: set = set()
        self._watches: Dict[str, threading.Event] = {}

    # ---------------------------------------------------------------------------------------------- launch

    async def launch(self, replica: ReplicaLaunch) -> None:
        namespace = replica.placement.namespace or (self.namespaces[0] if self.namespaces else "default")
        if self.namespaces and namespace not in self.namespaces:
            raise ValueError(
                f"namespace {namespace!r} is not one this agent may create replicas in ({self.namespaces}); add it "
                "to the agent's --namespaces (and its RBAC) or run the workflow in an allowed namespace"
            )
        self._ensure_watch(namespace)
        base_template = await asyncio.to_thread(self._default_pod_template, namespace)
        secret, pod = build_replica(replica, namespace, self.pod_config, base_template)
        self.policy.check(pod)  # raises LaunchRefused: nothing is created
        name = pod["metadata"]["name"]
        self.pods[replica.replica_id] = (namespace, name)
        await asyncio.to_thread(self.api.create_namespaced_secret, namespace, secret)
        try:
            created = await self._create_pod(replica.replica_id, namespace, pod)
        except Exception:
            await asyncio.to_thread(self._delete_secret, namespace, name)
            self.pods.pop(replica.replica_id, None)
            raise
        if created is None:  # stopped, or past the pod pending timeout, while it waited for quota
            await asyncio.to_thread(self._delete_secret, namespace, name)
            if replica.replica_id not in self._reported:
                self._gone(replica.replica_id, ReplicaExit(
                    ExitReason.STOPPED, f"pod {namespace}/{name} was stopped before it could be created"))
            return
        self._remember_placement(replica.replica_id, created)
        # The Secret goes when its pod goes, even if the agent is not there to delete it.
        owner = {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": created.metadata.uid}
        await asyncio.to_thread(
            self.api.patch_namespaced_secret, name, namespace, {"metadata": {"ownerReferences": [owner]}}
        )

    async def _create_pod(self, replica_id: str, namespace: str, pod: Dict[str, Any]) -> Optional[client.V1Pod]:
        """Create the pod; while the namespace is over its ResourceQuota, wait (saying so) and try again, as a
        Flyte task waits, until the pod pending timeout. ``None`` if the replica was stopped or timed out."""
        while True:
            try:
                return await asyncio.to_thread(self.api.create_namespaced_pod, namespace, pod)
            except ApiException as e:
                reason = quota_rejection(e)
                if reason is None:
                    raise
            self._set_waiting(replica_id, reason)
            await asyncio.sleep(self.quota_retry_seconds)
            if replica_id in self._stopped or replica_id in self._reported:
                return None

    def _default_pod_template(self, namespace: str) -> Optional[Dict[str, Any]]:
        """``default-pod-template-name`` from the replica's namespace, else the agent's (propeller's
        ``PodTemplateStore.LoadOrDefault``), as JSON; ``None`` when unset or absent."""
        name = self.pod_config.k8s.default_pod_template_name
        if not name:
            return None
        for where in dict.fromkeys(n for n in (namespace, self.agent_namespace) if n):
            try:
                template = self.api.read_namespaced_pod_template(name, where)
            except ApiException as e:
                if e.status == 404:
                    continue
                raise
            return self.api_client.sanitize_for_serialization(template).get("template") or {}
        return None

    def check(self, environment: SerializedEnvironment) -> None:
        """Build a replica pod of ``environment`` without creating it, so a setting the cluster can never honour
        fails the first task that names it, instead of a pod the API server rejects again and again."""
        probe = ReplicaLaunch(replica_id="check", token="", fleet_key=environment.key, environment=environment,
                              agent_address="", placement=Placement())
        build_replica(probe, "default", self.pod_config, None)

    def placement(self, replica_id: str) -> Optional[Dict[str, Any]]:
        """Where a replica runs, for log links: pod name, namespace, uid, container, creation time."""
        return self.placements.get(replica_id)

    def _remember_placement(self, replica_id: str, pod: client.V1Pod) -> None:
        created = pod.metadata.creation_timestamp
        self.placements[replica_id] = {
            "pod_name": pod.metadata.name,
            "namespace": pod.metadata.namespace,
            "pod_uid": pod.metadata.uid or "",
            "container_name": (pod.metadata.annotations or {}).get(ANNOTATION_CONTAINER, DEFAULT_CONTAINER),
            "pod_start_time": created.timestamp() if created else None,
            "hostname": (pod.spec.hostname or "") if pod.spec else "",
            "node_name": (pod.spec.node_name or "") if pod.spec else "",
        }

    def where(self, replica_id: str) -> str:
        pod = self.pods.get(replica_id)
        return f"pod {pod[0]}/{pod[1]}" if pod else ""

    async def stop(self, replica_id: str, reason: str) -> None:
        self._stopped.add(replica_id)
        where = self.pods.get(replica_id)
        if where is None:
            return
        log.info("deleting replica pod %s/%s: %s", where[0], where[1], reason)
        await asyncio.to_thread(self._delete_pod, *where)

    async def close(self) -> None:
        """Stop watching; replica pods stay, for the next agent to adopt."""
        for stop in self._watches.values():
            stop.set()
        for timer in self._pending_timers.values():
            timer.cancel()

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
                self._remember_placement(replica_id, pod)
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
        if replica_id in self.placements and pod.spec is not None and pod.spec.node_name:
            self.placements[replica_id]["node_name"] = pod.spec.node_name
        failure = pod_failure(pod)
        if failure is not None:
            self._fail(replica_id, ReplicaExit(failure.reason, f"{where}: {failure.detail}"), pod.metadata.namespace,
                       pod.metadata.name)
            return
        self._set_waiting(replica_id, pod_waiting(pod))

    def _set_waiting(self, replica_id: str, reason: Optional[str]) -> None:
        """Tell the agent whether the replica waits for resources (and why); arm the pod pending timeout."""
        if (reason or None) == self._waiting.get(replica_id):
            return
        if reason:
            first = replica_id not in self._waiting
            self._waiting[replica_id] = reason
            timeout = self.pod_config.k8s.pod_pending_timeout
            if first and timeout and replica_id in self.pods:
                self._pending_timers[replica_id] = self.loop.call_later(timeout, self._pending_too_long, replica_id)
        else:
            self._waiting.pop(replica_id, None)
            timer = self._pending_timers.pop(replica_id, None)
            if timer is not None:
                timer.cancel()
        if self.on_waiting is not None:
            self.on_waiting(replica_id, reason or None)

    def _pending_too_long(self, replica_id: str) -> None:
        self._pending_timers.pop(replica_id, None)
        reason = self._waiting.get(replica_id)
        where = self.pods.get(replica_id)
        if reason is None or where is None or replica_id in self._reported:
            return
        timeout = self.pod_config.k8s.pod_pending_timeout
        self._fail(replica_id, ReplicaExit(ExitReason.UNSCHEDULABLE, f"pod {where[0]}/{where[1]} was pending for "
                   f"{timeout:g}s (the pod-pending-timeout): {reason}"), *where)

    def _fail(self, replica_id: str, exit: ReplicaExit, namespace: str, name: str) -> None:
        self._gone(replica_id, exit)
        asyncio.ensure_future(asyncio.to_thread(self._delete_pod, namespace, name))

    def _gone(self, replica_id: str, exit: ReplicaExit) -> None:
        self._reported.add(replica_id)
        self.pods.pop(replica_id, None)
        self.placements.pop(replica_id, None)
        self._waiting.pop(replica_id, None)
        self._stopped.discard(replica_id)
        timer = self._pending_timers.pop(replica_id, None)
        if timer is not None:
            timer.cancel()
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


def pod_failure(pod: client.V1Pod) -> Optional[ReplicaExit]:
    """Why a replica pod will not (or no longer) run, or ``None`` while it may still be fine."""
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
    return None


def pod_waiting(pod: client.V1Pod) -> Optional[str]:
    """Why a Pending replica pod waits for resources (``PodScheduled`` false, as propeller's
    ``DemystifyPending`` reads it), or ``None`` once it is scheduled."""
    status = pod.status
    if status is None or status.phase not in (None, "Pending"):
        return None
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return f"{condition.reason or 'Unschedulable'}: {condition.message or ''}".rstrip(": ")
    return None


def quota_rejection(error: ApiException) -> Optional[str]:
    """The API server's reason when it refused a pod because the namespace is over a ResourceQuota (403
    ``exceeded quota``): that is waiting for resources, not a broken pod."""
    if error.status != 403:
        return None
    try:
        message = json.loads(error.body or "{}").get("message") or ""
    except ValueError:
        message = str(error.body or "")
    # "status unknown for quota": the quota controller has not counted the namespace yet; it will.
    if "exceeded quota" not in message and "status unknown for quota" not in message:
        return None
    return f"ResourceQuota: {message}"


def build_replica(replica: ReplicaLaunch, namespace: str, pod_config: Optional[AgentPodConfig] = None,
                  base_template: Optional[Dict[str, Any]] = None):
    """The Secret holding the replica's token and the replica's Pod, as Kubernetes JSON. Raises
    :class:`pods.PodSpecError` naming the setting when the environment asks for a pod that cannot exist."""
    pod_config = pod_config or AgentPodConfig()
    environment = replica.environment
    spec = environment.replica
    # Environment names may hold '.' and '_' (as Union's do); pod and Secret names stay DNS-1123 labels.
    name = f"{environment.name.replace('.', '-').replace('_', '-')}-{replica.replica_id}"[:63].rstrip("-")
    template = spec.get("pod_template") or {}
    pod_spec = copy.deepcopy(template.get("pod_spec") or {"containers": []})
    primary_name = template.get("primary_container_name") or DEFAULT_CONTAINER
    containers = pod_spec.setdefault("containers", [])
    primary = next((c for c in containers if c.get("name") == primary_name), None)
    if primary is None:
        # BuildRawContainer: the task's own container.
        primary = {"name": primary_name, "terminationMessagePolicy": "FallbackToLogsOnError"}
        if pod_config.k8s.image_pull_policy:
            primary["imagePullPolicy"] = pod_config.k8s.image_pull_policy
        containers.insert(0, primary)
    if not primary.get("image"):
        primary["image"] = spec.get("image")
    primary["command"] = ["flyte-actor-replica"]
    primary["args"] = []
    env = [e for e in primary.get("env") or [] if e.get("name") not in replica.worker_env()]
    env += [{"name": k, "value": v} for k, v in sorted((spec.get("environment") or {}).items())]
    env += [{"name": k, "value": v} for k, v in replica.worker_env().items()]
    env.append({"name": "FLYTE_ACTOR_REPLICA_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": TOKEN_KEY}}})
    env.append({"name": "FLYTE_ACTOR_RECONNECT_SECONDS", "value": "300"})
    primary["env"] = env
    # The environment's resources are the task's: they override the template's inline ones (MergeResources).
    resources = primary.setdefault("resources", {})
    for key in ("requests", "limits"):
        values = _resources(spec.get(key) or {})
        if values:
            resources[key] = {**(resources.get(key) or {}), **values}
    accelerator = decode_accelerator(spec.get("accelerator"))
    pod_spec = pods.replica_pod_spec(
        pod_spec,
        primary_name,
        interruptible=bool(spec.get("interruptible")),
        accelerator=accelerator,
        service_account=replica.placement.service_account,
        config=pod_config.k8s,
        platform=pod_config.platform,
        base_template=base_template,
    )
    pods.check_gpu_resources(pod_spec, pod_config.k8s)
    if accelerator and not _has_gpu_limit(pod_spec, pod_config.k8s.gpu_resource_name):
        raise pods.PodSpecError(
            f"actor environment {environment.name!r} names accelerator {accelerator.get('device')!r} but asks for no "
            f"GPU ({pod_config.k8s.gpu_resource_name}); set requests=Resources(gpu=\"1\") or drop the accelerator")
    pod_spec["restartPolicy"] = "Never"
    # Service variables would clash with FLYTE_ACTOR_AGENT_*: off unless the environment's own template turns them
    # on (a base pod template read back from the API server has the default, true).
    pod_spec["enableServiceLinks"] = bool((template.get("pod_spec") or {}).get("enableServiceLinks", False))

    labels = dict(template.get("labels") or {})
    labels.update({
        REPLICA_LABEL: "true",
        LABEL_ENVIRONMENT: environment.name,
        LABEL_VERSION: environment.version,
        LABEL_REPLICA_ID: replica.replica_id,
    })
    placement = replica.placement
    for key, value in (("project", placement.project), ("domain", placement.domain)):
        if value:
            labels[key] = value
    annotations = dict(template.get("annotations") or {})
    annotations[ANNOTATION_FLEET] = replica.fleet_key
    annotations[ANNOTATION_ENVIRONMENT] = json.dumps(environment.to_custom(), sort_keys=True)
    annotations[ANNOTATION_PLACEMENT] = placement.to_json()
    annotations[ANNOTATION_CONTAINER] = primary_name
    secrets = spec.get("secrets") or []
    if secrets:
        labels["inject-flyte-secrets"] = "true"
        annotations.update(flyte_secret_annotations(secrets))
    labels, annotations = pods.object_meta(labels, annotations, base_template, pod_config.k8s)

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


def decode_accelerator(encoded: Optional[str]) -> Optional[Dict[str, Any]]:
    """The environment's accelerator (flyteidl ``GPUAccelerator``, hex of its bytes in the spec) as a dict."""
    if not encoded:
        return None
    from flyteidl.core import tasks_pb2

    message = tasks_pb2.GPUAccelerator.FromString(bytes.fromhex(encoded))
    out: Dict[str, Any] = {"device": message.device}
    kind = message.WhichOneof("partition_size_value")
    if kind == "partition_size":
        out["partition_size"] = message.partition_size
    elif kind == "unpartitioned":
        out["unpartitioned"] = message.unpartitioned
    return out


def _has_gpu_limit(pod_spec: Dict[str, Any], gpu: str) -> bool:
    return any(gpu in ((c.get("resources") or {}).get("limits") or {}) for c in pod_spec.get("containers") or [])


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
    # "gpu" stays as flytekit names it: SanitizeGPUResourceRequirements turns it into gpu-resource-name.
    names = {"cpu": "cpu", "mem": "memory", "gpu": "gpu", "ephemeral_storage": "ephemeral-storage"}
    return {names[k]: v for k, v in values.items() if k in names}
