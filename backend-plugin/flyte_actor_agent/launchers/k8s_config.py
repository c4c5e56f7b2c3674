"""Cluster-wide defaults for replica pods, read with the same keys and meanings as flytepropeller's configuration.

An admin copies propeller's ``plugins.k8s`` section (flyteplugins ``pluginmachinery/flytek8s/config/config.go``),
its ``plugins.logs`` section (``tasks/logs/config.go``) and flyteadmin's ``task_resources`` into one YAML file
and hands it to the agent (``flyte-actor-agent serve --plugins-config FILE``, the Helm chart's ``flyteConfig``):

    plugins:
      k8s:
        default-env-vars: {FLYTE_AWS_ENDPOINT: "http://minio.flyte:9000"}
        default-tolerations: [{key: dedicated, value: flyte, operator: Equal, effect: NoSchedule}]
        interruptible-node-selector-requirement: {key: spot, operator: In, values: ["true"]}
        gpu-device-node-label: cloud.google.com/gke-accelerator
      logs:
        kubernetes-enabled: true
        kubernetes-template-uri: "https://k8s.example.com/#/log/{{ .namespace }}/{{ .podName }}"
    task_resources:
      defaults: {cpu: 500m, memory: 1Gi}
      limits: {cpu: "8", memory: 32Gi, gpu: "4"}

Kubernetes objects inside (tolerations, affinity, node selector requirements, security contexts) are in
Kubernetes' JSON form, as in propeller's file. Keys propeller has that do not apply to replica pods (co-pilot,
finalizers, grace periods of propeller's own pod watch) are accepted and ignored with a warning, so the whole
section can be copied as it is; unknown keys are an error naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


log = logging.getLogger("flyte-actor-agent.k8s-config")

#: Keys of propeller's k8s section that mean nothing for replica pods: accepted, ignored.
_IGNORED_K8S_KEYS = {
    "inject-finalizer", "co-pilot", "delete-resource-on-finalize", "create-container-error-grace-period",
    "create-container-config-error-grace-period", "image-pull-backoff-grace-period", "default-pod-template-resync",
    "send-object-events", "update-base-backoff-duration", "update-backoff-retries",
    "enable-distributed-error-aggregation",
}


@dataclass
class K8sPluginConfig:
    """Propeller's ``plugins.k8s`` section (field names are the keys with ``-`` as ``_``), with its defaults."""

    default_annotations: Dict[str, str] = field(
        default_factory=lambda: {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"})
    default_labels: Dict[str, str] = field(default_factory=dict)
    default_env_vars: Dict[str, str] = field(default_factory=dict)
    default_env_vars_from_env: Dict[str, str] = field(default_factory=dict)
    default_env_from_configmaps: List[str] = field(default_factory=list)
    default_env_from_secrets: List[str] = field(default_factory=list)
    default_cpus: str = "1000m"
    default_memory: str = "1024Mi"
    default_tolerations: List[Dict[str, Any]] = field(default_factory=list)
    default_node_selector: Dict[str, str] = field(default_factory=dict)
    default_affinity: Optional[Dict[str, Any]] = None
    scheduler_name: str = ""
    interruptible_tolerations: List[Dict[str, Any]] = field(default_factory=list)
    interruptible_node_selector: Dict[str, str] = field(default_factory=dict)
    interruptible_node_selector_requirement: Optional[Dict[str, Any]] = None
    non_interruptible_node_selector_requirement: Optional[Dict[str, Any]] = None
    resource_tolerations: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    image_pull_policy: str = ""
    #: How long a replica pod may stay Pending (unschedulable, over quota) before its tasks fail; 0: wait for ever.
    pod_pending_timeout: float = 0.0
    gpu_device_node_label: str = "k8s.amazonaws.com/accelerator"
    gpu_partition_size_node_label: str = "k8s.amazonaws.com/gpu-partition-size"
    gpu_unpartitioned_node_selector_requirement: Optional[Dict[str, Any]] = None
    gpu_unpartitioned_toleration: Optional[Dict[str, Any]] = None
    gpu_resource_name: str = "nvidia.com/gpu"
    default_pod_security_context: Optional[Dict[str, Any]] = None
    default_security_context: Optional[Dict[str, Any]] = None
    enable_host_networking_pod: Optional[bool] = None
    default_pod_dns_config: Optional[Dict[str, Any]] = None
    default_pod_template_name: str = ""
    add_tolerations_for_extended_resources: List[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]], where: str = "plugins.k8s") -> "K8sPluginConfig":
        config = cls()
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in (data or {}).items():
            name = key.replace("-", "_")
            if key in _IGNORED_K8S_KEYS:
                log.warning("%s.%s does not apply to actor replica pods; ignored", where, key)
                continue
            if name not in names:
                raise ValueError(
                    f"{where}: unknown key {key!r}; the keys are those of propeller's k8s plugin config: "
                    f"{', '.join(sorted(n.replace('_', '-') for n in names))}"
                )
            if value is None:
                continue
            if name == "pod_pending_timeout":
                value = parse_duration(value, f"{where}.{key}")
            elif name in ("default_cpus", "default_memory"):
                value = check_quantity(value, f"{where}.{key}")
            setattr(config, name, value)
        return config


@dataclass
class TemplateLogPlugin:
    """One entry of ``plugins.logs.templates`` (flyteplugins ``tasklog.TemplateLogPlugin``)."""

    display_name: str
    template_uris: List[str]
    message_format: int = 2  # flyteidl TaskLog.JSON, as propeller sets for its built-in links
    show_while_pending: bool = False
    hide_once_finished: bool = False


@dataclass
class LogConfig:
    """Propeller's ``plugins.logs`` section (flyteplugins ``tasks/logs/config.go``), with its defaults."""

    cloudwatch_enabled: bool = False
    cloudwatch_region: str = ""
    cloudwatch_log_group: str = ""
    cloudwatch_template_uri: str = ""
    kubernetes_enabled: bool = True
    kubernetes_url: str = ""
    kubernetes_template_uri: str = (
        "http://localhost:30082/#!/log/{{ .namespace }}/{{ .podName }}/pod?namespace={{ .namespace }}")
    stackdriver_enabled: bool = False
    gcp_project: str = ""
    stackdriver_logresourcename: str = ""
    stackdriver_template_uri: str = ""
    templates: List[TemplateLogPlugin] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]], where: str = "plugins.logs") -> "LogConfig":
        config = cls()
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in (data or {}).items():
            name = key.replace("-", "_")
            if key == "dynamic-log-links":
                log.warning("%s.dynamic-log-links needs a task's link_type, which actor tasks do not set; ignored",
                            where)
                continue
            if name not in names:
                raise ValueError(f"{where}: unknown key {key!r}; use the keys of propeller's logs plugin config")
            if name == "templates":
                value = [_template(t, f"{where}.templates[{i}]") for i, t in enumerate(value or [])]
            setattr(config, name, value)
        return config


def _template(data: Dict[str, Any], where: str) -> TemplateLogPlugin:
    uris = data.get("templateUris") or data.get("templateURIs") or []
    if isinstance(uris, str):
        uris = [uris]
    if not data.get("displayName") or not uris:
        raise ValueError(f"{where}: a log template needs displayName and templateUris, got {data!r}")
    formats = {"UNKNOWN": 0, "CSV": 1, "JSON": 2}
    message_format = data.get("messageFormat", 2)
    if isinstance(message_format, str):
        message_format = formats.get(message_format.upper(), 2)
    return TemplateLogPlugin(
        display_name=data["displayName"],
        template_uris=list(uris),
        message_format=int(message_format),
        show_while_pending=bool(data.get("showWhilePending", False)),
        hide_once_finished=bool(data.get("hideOnceFinished", False)),
    )


@dataclass
class TaskResources:
    """flyteadmin's ``task_resources`` (``defaults`` and ``limits``): propeller's platform resources, the
    fallback requests and the ceiling of every replica container. Keys ``cpu``, ``memory``, ``gpu``,
    ``ephemeralStorage``/``storage``."""

    requests: Dict[str, str] = field(default_factory=dict)
    limits: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]], gpu_resource_name: str,
                  where: str = "task_resources") -> "TaskResources":
        data = data or {}
        unknown = set(data) - {"defaults", "limits"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use 'defaults' and 'limits'")
        return cls(
            requests=_resource_list(data.get("defaults"), gpu_resource_name, f"{where}.defaults"),
            limits=_resource_list(data.get("limits"), gpu_resource_name, f"{where}.limits"),
        )


def _resource_list(data: Optional[Dict[str, Any]], gpu_resource_name: str, where: str) -> Dict[str, str]:
    names = {"cpu": "cpu", "memory": "memory", "gpu": gpu_resource_name, "storage": "ephemeral-storage",
             "ephemeralStorage": "ephemeral-storage", "ephemeral-storage": "ephemeral-storage"}
    out = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise ValueError(f"{where}: unknown resource {key!r}; use {sorted(names)}")
        out[names[key]] = check_quantity(value, f"{where}.{key}")
    return out


@dataclass
class AgentPodConfig:
    """Everything the Kubernetes launcher and the log links read from the agent's plugins config file."""

    k8s: K8sPluginConfig = field(default_factory=K8sPluginConfig)
    logs: LogConfig = field(default_factory=LogConfig)
    platform: TaskResources = field(default_factory=TaskResources)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]]) -> "AgentPodConfig":
        data = data or {}
        unknown = set(data) - {"plugins", "task_resources"}
        if unknown:
            raise ValueError(f"unknown top-level keys {sorted(unknown)}: the file has 'plugins' (with 'k8s' and "
                             "'logs', as in propeller's config) and 'task_resources' (as in flyteadmin's)")
        plugins = data.get("plugins") or {}
        k8s = K8sPluginConfig.from_dict(plugins.get("k8s"))
        return cls(
            k8s=k8s,
            logs=LogConfig.from_dict(plugins.get("logs")),
            platform=TaskResources.from_dict(data.get("task_resources"), k8s.gpu_resource_name),
        )

    @classmethod
    def load(cls, path: Optional[str]) -> "AgentPodConfig":
        if not path:
            return cls()
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f)
            return cls.from_dict(data)
        except (OSError, yaml.YAMLError, ValueError, TypeError) as e:
            raise ValueError(f"plugins config {path}: {e}") from None


def check_quantity(value: Any, where: str) -> str:
    """A Kubernetes quantity as a string, or an error naming the setting."""
    # Imported here: kubernetes.utils loads the whole client (~50 MB, 0.7 s), which an agent with local replicas
    # never needs.
    from kubernetes.utils import parse_quantity

    text = str(value)
    try:
        parse_quantity(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a Kubernetes quantity (for example 500m, 2, 4Gi)") from None
    return text


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a Go duration (``90s``, ``5m``, ``1h30m``) or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    import re

    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{where}: {value!r} is not a duration (for example 90s, 10m, 1h)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)
