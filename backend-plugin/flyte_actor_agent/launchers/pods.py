"""Replica pod specs built by the rules flytepropeller applies to task pods: pure functions, JSON dicts in and out.

Each function is a port of the flyteplugins v1.16.8 function it names (``pluginmachinery/flytek8s``:
``pod_helper.go``, ``container_helper.go``, ``k8s_resource_adds.go``), tested against that package's own test
vectors, so an actor environment with ``requests=Resources(gpu="1")``, an accelerator and ``interruptible=True``
gets the limits, affinity, tolerations and node selectors a regular Flyte task with those settings would get.
:func:`replica_pod_spec` runs them in the order ``ToK8sPodSpec`` does.

Kubernetes objects are dicts in Kubernetes' JSON form (camelCase keys, absent rather than empty); quantities
stay strings as given and are compared by value. Where Go writes a zero quantity for a resource nobody set (a
sidecar without CPU), this port leaves the resource out, which Kubernetes reads the same way.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kubernetes.utils import parse_quantity

from .k8s_config import K8sPluginConfig, TaskResources

Json = Dict[str, Any]

DEFAULT_CONTAINER_TEMPLATE = "default"
DEFAULT_INIT_CONTAINER_TEMPLATE = "default-init"
PRIMARY_CONTAINER_TEMPLATE = "primary"
PRIMARY_INIT_CONTAINER_TEMPLATE = "primary-init"
#: The resource name flytekit and flyteidl use for GPUs before propeller renames it (``resourceGPU``).
RESOURCE_GPU = "gpu"


class PodSpecError(ValueError):
    """A replica pod that cannot be built as asked; the message names the setting and the fix."""


# ------------------------------------------------------------------------------------- resources (container_helper)


def _q(value: Optional[str]):
    return parse_quantity(value) if value not in (None, "") else 0


def _is_zero(value: Optional[str]) -> bool:
    return _q(value) == 0


def ensure_resource_limit(value: Optional[str], limit: Optional[str]) -> Optional[str]:
    """``ensureResourceLimit``: ``value`` capped at ``limit`` (a zero on either side caps nothing)."""
    if _is_zero(value) or _is_zero(limit):
        return value
    return limit if _q(value) > _q(limit) else value


def ensure_resource_range(request, limit, platform_limit) -> Tuple[Optional[str], Optional[str]]:
    """``ensureResourceRange``: request and limit within the platform limit, request within the limit."""
    request = ensure_resource_limit(request, platform_limit)
    limit = ensure_resource_limit(limit, platform_limit)
    request = ensure_resource_limit(request, limit)
    return request, limit


def adjust_or_default_resource(request, limit, platform_default, platform_limit) -> Tuple[Optional[str], Optional[str]]:
    """``AdjustOrDefaultResource``: an unset request takes the limit (else the platform default), an unset
    limit takes the request, then both are brought into range."""
    if _is_zero(request):
        request = limit if not _is_zero(limit) else platform_default
    if _is_zero(limit):
        limit = request
    return ensure_resource_range(request, limit, platform_limit)


def _adjust_resource_requirement(name: str, resources: Json, platform: Json, assign_if_unset: bool) -> None:
    requests, limits = resources["requests"], resources["limits"]
    if assign_if_unset:
        request, limit = adjust_or_default_resource(
            requests.get(name), limits.get(name), platform["requests"].get(name), platform["limits"].get(name))
    else:
        request, limit = ensure_resource_range(requests.get(name), limits.get(name), platform["limits"].get(name))
    for target, value in ((requests, request), (limits, limit)):
        if _is_zero(value):
            target.pop(name, None)
        else:
            target[name] = value


def sanitize_gpu_resource_requirements(resources: Json, config: K8sPluginConfig) -> None:
    """``SanitizeGPUResourceRequirements``: the resource ``gpu`` becomes ``gpu-resource-name``."""
    for kind in ("requests", "limits"):
        values = resources.get(kind)
        if values and RESOURCE_GPU in values:
            values[config.gpu_resource_name] = values.pop(RESOURCE_GPU)


def apply_resource_overrides(resources: Json, platform: TaskResources, assign_if_unset: bool,
                             config: K8sPluginConfig) -> Json:
    """``ApplyResourceOverrides``: CPU and memory always, ephemeral storage and GPUs when asked for, defaulted
    (requests from limits and the reverse) and capped by the platform limits. This is what copies a GPU request
    into the limits, where Kubernetes requires extended resources."""
    resources = {"requests": dict(resources.get("requests") or {}), "limits": dict(resources.get("limits") or {})}
    platform_resources = {"requests": dict(platform.requests), "limits": dict(platform.limits)}
    # resolvePlatformDefaults: the k8s config's default-cpus and default-memory back the platform's defaults.
    platform_resources["requests"].setdefault("cpu", config.default_cpus)
    platform_resources["requests"].setdefault("memory", config.default_memory)
    _adjust_resource_requirement("cpu", resources, platform_resources, assign_if_unset)
    _adjust_resource_requirement("memory", resources, platform_resources, assign_if_unset)
    if "ephemeral-storage" in resources["requests"] or "ephemeral-storage" in resources["limits"]:
        _adjust_resource_requirement("ephemeral-storage", resources, platform_resources, assign_if_unset)
    gpu = config.gpu_resource_name
    if gpu in resources["requests"] or gpu in resources["limits"]:
        _adjust_resource_requirement(gpu, resources, platform_resources, assign_if_unset)
    return resources


def merge_resources_if_missing(source: Json, target: Json) -> None:
    """``MergeResourcesIfMissing``: fill in what ``target`` does not set from ``source``."""
    for kind in ("limits", "requests"):
        if source.get(kind):
            values = target.setdefault(kind, {})
            for name, value in source[kind].items():
                values.setdefault(name, value)


def extract_container_resources_from_pod_template(template_spec: Optional[Json], name: str, init: bool) -> Json:
    """``ExtractContainerResourcesFromPodTemplate``: the base template's resources for a container, by exact
    name, then ``primary``/``primary-init``, then ``default``/``default-init``."""
    if template_spec is None:
        return {}
    containers = template_spec.get("initContainers" if init else "containers") or []
    names = [name] + ([PRIMARY_INIT_CONTAINER_TEMPLATE, DEFAULT_INIT_CONTAINER_TEMPLATE] if init
                      else [PRIMARY_CONTAINER_TEMPLATE, DEFAULT_CONTAINER_TEMPLATE])
    for wanted in names:
        for container in containers:
            if container.get("name") == wanted:
                return copy.deepcopy(container.get("resources") or {})
    return {}


def decorate_env_vars(container: Json, config: K8sPluginConfig, environ: Mapping[str, str]) -> None:
    """``DecorateEnvVars``, cluster part: ``default-env-vars``, ``default-env-vars-from-env`` (read from the
    agent's own environment, as propeller reads its own), ``default-env-from-secrets`` and
    ``-configmaps``. The execution's variables are the task's, not the replica's: they travel with each task."""
    env = list(container.get("env") or [])
    env += [{"name": k, "value": v} for k, v in config.default_env_vars.items()]
    env += [{"name": k, "value": environ.get(v, "")} for k, v in config.default_env_vars_from_env.items()]
    if env:
        container["env"] = env
    env_from = list(container.get("envFrom") or [])
    env_from += [{"secretRef": {"name": n, "optional": True}} for n in config.default_env_from_secrets]
    env_from += [{"configMapRef": {"name": n, "optional": True}} for n in config.default_env_from_configmaps]
    if env_from:
        container["envFrom"] = env_from


def customize_container(container: Json, primary: bool, template_resources: Optional[Json],
                        platform: TaskResources, config: K8sPluginConfig, environ: Mapping[str, str]) -> None:
    """``AddFlyteCustomizationsToContainerWithPodTemplate`` for a replica container: cluster variables, GPU
    name, and resources (the primary container's merged and defaulted, the others' only kept in range)."""
    decorate_env_vars(container, config, environ)
    resources = container.get("resources") or {}
    sanitize_gpu_resource_requirements(resources, config)
    merge_resources_if_missing(template_resources or {}, resources)
    resources = apply_resource_overrides(resources, platform, primary, config)
    container["resources"] = {k: v for k, v in resources.items() if v}


# ---------------------------------------------------------------------------------- scheduling (k8s_resource_adds)


def get_pod_tolerations(interruptible: bool, resource_requirements: List[Json], config: K8sPluginConfig) -> List[Json]:
    """``GetPodTolerations``: tolerations for the resources used (``resource-tolerations``), then the
    interruptible ones, then the defaults."""
    names = set()
    for resources in resource_requirements:
        names.update((resources.get("limits") or {}).keys())
        names.update((resources.get("requests") or {}).keys())
    tolerations: List[Json] = []
    for name in sorted(names):
        tolerations += copy.deepcopy(config.resource_tolerations.get(name, []))
    if interruptible:
        tolerations += copy.deepcopy(config.interruptible_tolerations)
    tolerations += copy.deepcopy(config.default_tolerations)
    return tolerations


def add_required_node_selector_requirements(affinity: Json, *requirements: Json) -> None:
    """``AddRequiredNodeSelectorRequirements``: AND the requirements into every required node selector term."""
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or []
    if terms:
        for term in terms:
            term["matchExpressions"] = list(term.get("matchExpressions") or []) + copy.deepcopy(list(requirements))
    else:
        required["nodeSelectorTerms"] = [{"matchExpressions": copy.deepcopy(list(requirements))}]


def apply_interruptible_node_affinity(interruptible: bool, pod_spec: Json, config: K8sPluginConfig) -> None:
    """``ApplyInterruptibleNodeAffinity``: the (non-)interruptible node selector requirement, when configured."""
    affinity = pod_spec.setdefault("affinity", {})
    requirement = (config.interruptible_node_selector_requirement if interruptible
                   else config.non_interruptible_node_selector_requirement)
    if requirement is not None:
        add_required_node_selector_requirements(affinity, requirement)


def update_pod(pod_spec: Json, interruptible: bool, service_account: str, resource_requirements: List[Json],
               config: K8sPluginConfig) -> None:
    """``UpdatePod``: restart policy, tolerations, service account, scheduler, node selectors, affinity,
    security context, host network and DNS defaults, interruptible node affinity."""
    pod_spec.setdefault("restartPolicy", "Never")
    pod_spec["tolerations"] = get_pod_tolerations(interruptible, resource_requirements, config) + list(
        pod_spec.get("tolerations") or [])
    if not pod_spec["tolerations"]:
        del pod_spec["tolerations"]
    if not pod_spec.get("serviceAccountName") and service_account:
        pod_spec["serviceAccountName"] = service_account
    if not pod_spec.get("schedulerName") and config.scheduler_name:
        pod_spec["schedulerName"] = config.scheduler_name
    node_selector = {**config.default_node_selector, **(pod_spec.get("nodeSelector") or {})}
    if interruptible:
        node_selector.update(config.interruptible_node_selector)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if pod_spec.get("affinity") is None and config.default_affinity is not None:
        pod_spec["affinity"] = copy.deepcopy(config.default_affinity)
    if pod_spec.get("securityContext") is None and config.default_pod_security_context is not None:
        pod_spec["securityContext"] = copy.deepcopy(config.default_pod_security_context)
    if config.enable_host_networking_pod is not None:
        pod_spec["hostNetwork"] = config.enable_host_networking_pod
    if pod_spec.get("dnsConfig") is None and config.default_pod_dns_config is not None:
        pod_spec["dnsConfig"] = copy.deepcopy(config.default_pod_dns_config)
    apply_interruptible_node_affinity(interruptible, pod_spec, config)
    if not pod_spec["affinity"]:
        del pod_spec["affinity"]


def apply_gpu_node_selectors(pod_spec: Json, accelerator: Json, config: K8sPluginConfig) -> None:
    """``ApplyGPUNodeSelectors``: for a pod whose containers have a GPU limit, require and tolerate the
    accelerator's device and partition size (``accelerator``: ``device``, and ``partition_size`` or
    ``unpartitioned``, as in flyteidl's ``GPUAccelerator``)."""
    if not any(config.gpu_resource_name in ((c.get("resources") or {}).get("limits") or {})
               for c in pod_spec.get("containers") or []):
        return
    affinity = pod_spec.setdefault("affinity", {})
    tolerations = pod_spec.setdefault("tolerations", [])
    device = accelerator.get("device")
    if device:
        add_required_node_selector_requirements(
            affinity, {"key": config.gpu_device_node_label, "operator": "In", "values": [device]})
        tolerations.append(
            {"key": config.gpu_device_node_label, "value": device, "operator": "Equal", "effect": "NoSchedule"})
    requirement = toleration = None
    if accelerator.get("unpartitioned"):
        requirement = config.gpu_unpartitioned_node_selector_requirement or {
            "key": config.gpu_partition_size_node_label, "operator": "DoesNotExist"}
        toleration = config.gpu_unpartitioned_toleration
    elif accelerator.get("partition_size"):
        size = accelerator["partition_size"]
        requirement = {"key": config.gpu_partition_size_node_label, "operator": "In", "values": [size]}
        toleration = {"key": config.gpu_partition_size_node_label, "value": size, "operator": "Equal",
                      "effect": "NoSchedule"}
    if requirement is not None:
        add_required_node_selector_requirements(affinity, requirement)
    if toleration is not None:
        tolerations.append(copy.deepcopy(toleration))
    if not affinity:
        del pod_spec["affinity"]
    if not tolerations:
        del pod_spec["tolerations"]


def _match_toleration(a: Json, b: Json) -> bool:
    """``Toleration.MatchToleration``: same key, effect, operator and value."""
    return all((a.get(k) or "") == (b.get(k) or "") for k in ("key", "effect", "operator", "value"))


def add_tolerations_for_extended_resources(pod_spec: Json, config: K8sPluginConfig) -> None:
    """``AddTolerationsForExtendedResources``: an ``Exists``/``NoSchedule`` toleration for each resource of
    ``add-tolerations-for-extended-resources`` a container or init container requests, unless one matches."""
    wanted = set()
    for container in list(pod_spec.get("containers") or []) + list(pod_spec.get("initContainers") or []):
        requests = (container.get("resources") or {}).get("requests") or {}
        wanted.update(r for r in config.add_tolerations_for_extended_resources if r in requests)
    for name in sorted(wanted):
        toleration = {"key": name, "operator": "Exists", "effect": "NoSchedule"}
        tolerations = pod_spec.get("tolerations") or []
        if not any(_match_toleration(toleration, t) for t in tolerations):
            pod_spec["tolerations"] = tolerations + [toleration]


# ------------------------------------------------------------------------------------- pod templates (pod_helper)


def _empty(value: Any) -> bool:
    """Go's zero value: what mergo never copies over a set one."""
    if value is None or value is False:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    return value == "" or (isinstance(value, (dict, list)) and not value)


def mergo_merge(target: Json, source: Json) -> Json:
    """``mergo.Merge(target, source, WithOverride, WithAppendSlice)`` on JSON: non-empty values of ``source``
    win, objects merge key by key, lists are appended."""
    for key, value in source.items():
        if _empty(value):
            continue
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            mergo_merge(current, value)
        elif isinstance(value, list) and isinstance(current, list):
            target[key] = current + copy.deepcopy(value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _merge_containers(template: List[Json], base: List[Json], primary: str, default_name: str,
                      primary_template_name: str) -> List[Json]:
    default = next((c for c in template if c.get("name") == default_name), None)
    primary_template = next((c for c in template if c.get("name") == primary_template_name), None)
    merged_containers = []
    for container in base:
        merged = copy.deepcopy(default) if default is not None else None
        if container.get("name") == primary and primary_template is not None:
            merged = copy.deepcopy(primary_template) if merged is None else mergo_merge(merged, primary_template)
        for candidate in template:
            if container.get("name") in (primary, default_name) or candidate.get("name") != container.get("name"):
                continue
            merged = copy.deepcopy(candidate) if merged is None else mergo_merge(merged, candidate)
        merged = copy.deepcopy(container) if merged is None else mergo_merge(merged, container)
        merged_containers.append(merged)
    return merged_containers


def merge_base_pod_spec_onto_template(template_spec: Json, base_spec: Json, primary: str,
                                      primary_init: str = "") -> Json:
    """``MergeBasePodSpecOntoTemplate``: the pod spec over the base template's, containers merged by name, with
    the template's ``default``/``primary`` (``default-init``/``primary-init``) containers under every
    (primary) container."""
    merged = mergo_merge(copy.deepcopy(template_spec), base_spec)
    containers = _merge_containers(template_spec.get("containers") or [], base_spec.get("containers") or [],
                                   primary, DEFAULT_CONTAINER_TEMPLATE, PRIMARY_CONTAINER_TEMPLATE)
    init = _merge_containers(template_spec.get("initContainers") or [], base_spec.get("initContainers") or [],
                             primary_init, DEFAULT_INIT_CONTAINER_TEMPLATE, PRIMARY_INIT_CONTAINER_TEMPLATE)
    merged.pop("containers", None)
    merged.pop("initContainers", None)
    if containers:
        merged["containers"] = containers
    if init:
        merged["initContainers"] = init
    return merged


# --------------------------------------------------------------------------------------------- the whole pod


def replica_pod_spec(
    pod_spec: Json,
    primary: str,
    *,
    interruptible: bool,
    accelerator: Optional[Json],
    service_account: str,
    config: K8sPluginConfig,
    platform: Optional[TaskResources] = None,
    base_template: Optional[Json] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Json:
    """The replica's pod spec, as ``ToK8sPodSpec`` builds a task pod from a raw one (``BuildRawPod``'s result):
    container customizations, ``UpdatePod``, the default security context, the base pod template
    (``default-pod-template-name``, a PodTemplate's ``template``), GPU node selectors and extended resource
    tolerations. ``pod_spec`` is not changed."""
    pod_spec = copy.deepcopy(pod_spec)
    platform = platform or TaskResources()
    environ = os.environ if environ is None else environ
    template_spec = (base_template or {}).get("spec") if base_template is not None else None
    for container in pod_spec.get("initContainers") or []:
        resources = extract_container_resources_from_pod_template(template_spec, container.get("name"), True)
        customize_container(container, True, resources if template_spec is not None else None, platform, config,
                            environ)
    requirements = []
    primary_container = None
    for container in pod_spec.get("containers") or []:
        resources = extract_container_resources_from_pod_template(template_spec, container.get("name"), False)
        is_primary = container.get("name") == primary
        customize_container(container, is_primary, resources if template_spec is not None else None, platform,
                            config, environ)
        requirements.append(container.get("resources") or {})
        if is_primary:
            primary_container = container
    if primary_container is None:
        raise PodSpecError(f"the pod template has no container named {primary!r} (its primary_container_name)")
    update_pod(pod_spec, interruptible, service_account, requirements, config)
    if primary_container.get("securityContext") is None and config.default_security_context is not None:
        primary_container["securityContext"] = copy.deepcopy(config.default_security_context)
    if template_spec is not None:
        pod_spec = merge_base_pod_spec_onto_template(template_spec, pod_spec, primary)
    if accelerator:
        apply_gpu_node_selectors(pod_spec, accelerator, config)
    add_tolerations_for_extended_resources(pod_spec, config)
    return pod_spec


def check_gpu_resources(pod_spec: Json, config: K8sPluginConfig) -> None:
    """Refuse what the API server would refuse for ever: a GPU request that differs from its limit, a GPU
    quantity that is not a whole number (extended resources cannot be overcommitted or split)."""
    gpu = config.gpu_resource_name
    for container in list(pod_spec.get("containers") or []) + list(pod_spec.get("initContainers") or []):
        resources = container.get("resources") or {}
        request = (resources.get("requests") or {}).get(gpu)
        limit = (resources.get("limits") or {}).get(gpu)
        for value in (request, limit):
            if value is not None and _q(value) != int(_q(value)):
                raise PodSpecError(
                    f"container {container.get('name')!r}: GPUs ({gpu}) must be a whole number, got {value!r}; "
                    "set requests/limits=Resources(gpu=\"1\") (use an accelerator partition for a fraction)")
        if request is not None and limit is not None and _q(request) != _q(limit):
            raise PodSpecError(
                f"container {container.get('name')!r}: GPU request {request!r} and limit {limit!r} differ; "
                f"Kubernetes needs them equal for {gpu}: set the same gpu in requests and limits (or only one)")


def object_meta(labels: Mapping[str, str], annotations: Mapping[str, str], base_template: Optional[Json],
                config: K8sPluginConfig) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Labels and annotations of the replica pod: the cluster defaults (``default-labels``,
    ``default-annotations``), the base pod template's, then the pod's own (``UnionMaps`` order: later wins)."""
    template_meta = (base_template or {}).get("metadata") or {}
    out_labels = {**config.default_labels, **(template_meta.get("labels") or {}), **labels}
    out_annotations = {**config.default_annotations, **(template_meta.get("annotations") or {}), **annotations}
    return out_labels, out_annotations
