"""The port of flyteplugins' pod rules (launchers/pods.py), checked against flyteplugins v1.16.8's own test vectors
(pluginmachinery/flytek8s/*_test.go; each test names the Go test it follows)."""

import pytest

from flyte_actor_agent.launchers import pods
from flyte_actor_agent.launchers.k8s_config import AgentPodConfig, K8sPluginConfig, TaskResources
from kubernetes.utils import parse_quantity


def q(value):
    return parse_quantity(value) if value is not None else None


def same(a, b):
    return {k: q(v) for k, v in a.items()} == {k: q(v) for k, v in b.items()}


# --------------------------------------------------------------------------- container_helper_test.go


@pytest.mark.parametrize("request_, limit, default, platform_limit, want", [
    # TestAssignResource
    ("1", "2", "10", "20", ("1", "2")),
    (None, "2", "10", "20", ("2", "2")),
    ("2", None, "10", "20", ("2", "2")),
    (None, None, "10", "20", ("10", "10")),
    ("10", "2", "10", "20", ("2", "2")),
    ("1", "40", "10", "20", ("1", "20")),
    ("40", "50", "10", "20", ("20", "20")),
])
def test_adjust_or_default_resource(request_, limit, default, platform_limit, want):
    got = pods.adjust_or_default_resource(request_, limit, default, platform_limit)
    assert tuple(q(v) for v in got) == tuple(q(v) for v in want)


@pytest.mark.parametrize("request_, limit, want", [
    # TestValidateResource, platform limit 5
    ("4", "3", ("3", "3")), ("6", "5", ("5", "5")), ("4", "6", ("4", "5")), ("1", "2", ("1", "2")),
])
def test_ensure_resource_range(request_, limit, want):
    assert tuple(q(v) for v in pods.ensure_resource_range(request_, limit, "5")) == tuple(q(v) for v in want)


def test_apply_resource_overrides_cpu_and_memory():
    # TestApplyResourceOverrides_OverrideCpu / _OverrideMemory
    config = K8sPluginConfig()
    for name in ("cpu", "memory"):
        platform = TaskResources(requests={name: "3"}, limits={name: "10"})
        got = pods.apply_resource_overrides({"requests": {name: "1"}}, platform, True, config)
        assert q(got["requests"][name]) == q(got["limits"][name]) == 1
        got = pods.apply_resource_overrides({"requests": {name: "1"}, "limits": {name: "2"}}, platform, True, config)
        assert (q(got["requests"][name]), q(got["limits"][name])) == (1, 2)
        got = pods.apply_resource_overrides({"limits": {name: "2"}}, platform, True, config)
        assert q(got["requests"][name]) == q(got["limits"][name]) == 2


def test_apply_resource_overrides_storage_and_gpu():
    # TestApplyResourceOverrides_OverrideEphemeralStorage / _RemoveStorage / _OverrideGpu
    config = K8sPluginConfig()
    got = pods.apply_resource_overrides({"requests": {"ephemeral-storage": "1"}}, TaskResources(), True, config)
    assert got["limits"]["ephemeral-storage"] == "1"
    got = pods.apply_resource_overrides(
        {"requests": {"memory": "1", "cpu": "1", "ephemeral-storage": "1"},
         "limits": {"memory": "1", "ephemeral-storage": "1"}}, TaskResources(), True, config)
    assert same(got["requests"], {"memory": "1", "cpu": "1", "ephemeral-storage": "1"})
    assert same(got["limits"], {"memory": "1", "cpu": "1", "ephemeral-storage": "1"})
    # The point of issue 10: a GPU request alone gets the limit Kubernetes requires for extended resources.
    got = pods.apply_resource_overrides({"requests": {"nvidia.com/gpu": "1"}}, TaskResources(), True, config)
    assert got["requests"]["nvidia.com/gpu"] == got["limits"]["nvidia.com/gpu"] == "1"
    got = pods.apply_resource_overrides({"limits": {"nvidia.com/gpu": "1"}}, TaskResources(), True, config)
    assert got["requests"]["nvidia.com/gpu"] == got["limits"]["nvidia.com/gpu"] == "1"
    # resolvePlatformDefaults: default-cpus / default-memory fill what nobody set.
    got = pods.apply_resource_overrides({}, TaskResources(), True, config)
    assert got == {"requests": {"cpu": "1000m", "memory": "1024Mi"}, "limits": {"cpu": "1000m", "memory": "1024Mi"}}


def test_ensure_existing_resources_in_range_only_lowers():
    # TestAddFlyteCustomizationsToContainer_ValidateExistingResources
    platform = TaskResources(requests={"cpu": "1", "memory": "2"}, limits={"cpu": "10", "memory": "20"})
    got = pods.apply_resource_overrides({"requests": {"cpu": "100"}, "limits": {"cpu": "200"}}, platform, False,
                                        K8sPluginConfig())
    assert q(got["requests"]["cpu"]) == q(got["limits"]["cpu"]) == 10
    assert "memory" not in got["requests"]  # Go writes a zero quantity; absent means the same


def test_sanitize_gpu_resource_requirements():
    # TestSanitizeGPUResourceRequirements, and gpu-resource-name honoured
    resources = {"requests": {"gpu": "4"}}
    pods.sanitize_gpu_resource_requirements(resources, K8sPluginConfig())
    assert resources == {"requests": {"nvidia.com/gpu": "4"}}
    resources = {"requests": {"gpu": "1"}, "limits": {"gpu": "1"}}
    pods.sanitize_gpu_resource_requirements(resources, K8sPluginConfig(gpu_resource_name="amd.com/gpu"))
    assert resources == {"requests": {"amd.com/gpu": "1"}, "limits": {"amd.com/gpu": "1"}}


def test_merge_resources_if_missing():
    # TestMergeResourcesIfMissing
    target = {"requests": {"cpu": "1"}}
    pods.merge_resources_if_missing({"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "3"}}, target)
    assert target == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "3"}}


def test_extract_container_resources_from_pod_template():
    # TestExtractContainerResourcesFromPodTemplate: exact name, then primary, then default
    spec = {"containers": [{"name": "default", "resources": {"requests": {"cpu": "1"}}},
                           {"name": "primary", "resources": {"requests": {"cpu": "2"}}},
                           {"name": "side", "resources": {"requests": {"cpu": "3"}}}],
            "initContainers": [{"name": "default-init", "resources": {"requests": {"cpu": "4"}}}]}
    assert pods.extract_container_resources_from_pod_template(spec, "side", False) == {"requests": {"cpu": "3"}}
    assert pods.extract_container_resources_from_pod_template(spec, "other", False) == {"requests": {"cpu": "2"}}
    assert pods.extract_container_resources_from_pod_template(spec, "x", True) == {"requests": {"cpu": "4"}}
    assert pods.extract_container_resources_from_pod_template(None, "x", False) == {}


# --------------------------------------------------------------------------- k8s_resource_adds_test.go

TOL_GPU = {"key": "flyte/gpu", "value": "dedicated", "operator": "Equal", "effect": "NoSchedule"}
TOL_STORAGE = {"key": "ephemeral-storage", "value": "dedicated", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize("resources, resource_tolerations, defaults, want", [
    # TestGetTolerationsForResources
    ({"limits": {"cpu": "1024m", "ephemeral-storage": "100M"}}, {}, [], []),
    ({"limits": {"cpu": "1024m", "ephemeral-storage": "100M"}},
     {"ephemeral-storage": [TOL_STORAGE], "nvidia.com/gpu": [TOL_GPU]}, [], [TOL_STORAGE]),
    ({"requests": {"cpu": "1024m", "ephemeral-storage": "100M"}},
     {"ephemeral-storage": [TOL_STORAGE], "nvidia.com/gpu": [TOL_GPU]}, [], [TOL_STORAGE]),
    ({"limits": {"cpu": "1024m", "ephemeral-storage": "100M", "nvidia.com/gpu": "1"},
      "requests": {"cpu": "1024m", "ephemeral-storage": "100M"}},
     {"ephemeral-storage": [TOL_STORAGE], "nvidia.com/gpu": [TOL_GPU]}, [], [TOL_STORAGE, TOL_GPU]),
    ({}, {}, [TOL_STORAGE], [TOL_STORAGE]),
])
def test_get_pod_tolerations(resources, resource_tolerations, defaults, want):
    config = K8sPluginConfig(resource_tolerations=resource_tolerations, default_tolerations=defaults)
    got = pods.get_pod_tolerations(True, [resources], config)
    assert len(got) == len(want) and all(t in got for t in want)


def test_decorate_env_vars_adds_the_cluster_defaults():
    # TestDecorateEnvVars: default-env-vars, default-env-vars-from-env, env from secrets and config maps
    config = K8sPluginConfig(default_env_vars={"k": "v"}, default_env_vars_from_env={"k2": "HOST_VAR"},
                             default_env_from_secrets=["s"], default_env_from_configmaps=["c"])
    container = {"env": [{"name": "own", "value": "1"}]}
    pods.decorate_env_vars(container, config, {"HOST_VAR": "from-agent"})
    assert container["env"] == [{"name": "own", "value": "1"}, {"name": "k", "value": "v"},
                                {"name": "k2", "value": "from-agent"}]
    assert container["envFrom"] == [{"secretRef": {"name": "s", "optional": True}},
                                    {"configMapRef": {"name": "c", "optional": True}}]


# --------------------------------------------------------------------------- pod_helper_test.go


def test_add_required_node_selector_requirements():
    # TestAddRequiredNodeSelectorRequirements
    new = {"key": "new", "operator": "In", "values": ["new"]}
    affinity = {}
    pods.add_required_node_selector_requirements(affinity, new)
    assert affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [new]}]
    required = {"key": "required", "operator": "In", "values": ["required"]}
    preferred = [{"weight": 1, "preference": {"matchExpressions": [{"key": "preferred", "operator": "In",
                                                                    "values": ["preferred"]}]}}]
    affinity = {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [required]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": preferred}}
    pods.add_required_node_selector_requirements(affinity, new)
    assert affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [required, new]}]
    assert affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == preferred


INTERRUPTIBLE = {"key": "x/interruptible", "operator": "In", "values": ["true"]}
NON_INTERRUPTIBLE = {"key": "x/interruptible", "operator": "DoesNotExist"}


def terms(pod_spec):
    return pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


def test_apply_interruptible_node_affinity():
    # TestApplyInterruptibleNodeAffinity
    config = K8sPluginConfig(interruptible_node_selector_requirement=INTERRUPTIBLE,
                             non_interruptible_node_selector_requirement=NON_INTERRUPTIBLE)
    spec = {}
    pods.apply_interruptible_node_affinity(True, spec, config)
    assert terms(spec) == [{"matchExpressions": [INTERRUPTIBLE]}]
    spec = {}
    pods.apply_interruptible_node_affinity(False, spec, config)
    assert terms(spec) == [{"matchExpressions": [NON_INTERRUPTIBLE]}]
    existing = {"key": "node selector requirement", "operator": "In", "values": ["exists"]}
    spec = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [existing]}]}}}}
    pods.apply_interruptible_node_affinity(True, spec, config)
    assert terms(spec) == [{"matchExpressions": [existing, INTERRUPTIBLE]}]


def test_update_pod():
    # updatePod (pod_helper_test.go), with the test config of that file (testdata/config.yaml)
    config = K8sPluginConfig(
        interruptible_tolerations=[{"key": "x/flyte", "value": "interruptible", "operator": "Equal",
                                    "effect": "NoSchedule"}],
        interruptible_node_selector={"x/interruptible": "true"},
        interruptible_node_selector_requirement=INTERRUPTIBLE,
        scheduler_name="flyte-scheduler",
    )
    spec = {"tolerations": [{"key": "my toleration key", "value": "my toleration value"}],
            "nodeSelector": {"user": "also configured"}}
    pods.update_pod(spec, True, "service-account", [], config)
    assert spec["restartPolicy"] == "Never"
    assert spec["tolerations"] == [config.interruptible_tolerations[0],
                                   {"key": "my toleration key", "value": "my toleration value"}]
    assert spec["serviceAccountName"] == "service-account" and spec["schedulerName"] == "flyte-scheduler"
    assert spec["nodeSelector"] == {"x/interruptible": "true", "user": "also configured"}
    assert terms(spec) == [{"matchExpressions": [INTERRUPTIBLE]}]


def test_update_pod_with_default_affinity_and_interruptible_requirement():
    # TestUpdatePodWithDefaultAffinityAndInterruptibleNodeSelectorRequirement: the default is copied, not shared
    default = {"key": "default node affinity", "operator": "In", "values": ["exists"]}
    config = K8sPluginConfig(
        default_affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [default]}]}}},
        interruptible_node_selector_requirement=INTERRUPTIBLE)
    for _ in range(3):
        spec = {}
        pods.update_pod(spec, True, "", [], config)
        assert terms(spec) == [{"matchExpressions": [default, INTERRUPTIBLE]}]


GPU_CONFIG = K8sPluginConfig(gpu_resource_name="nvidia.com/gpu", gpu_device_node_label="gpu-device",
                             gpu_partition_size_node_label="gpu-partition-size")
GPU_POD = {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
DEVICE_NSR = {"key": "gpu-device", "operator": "In", "values": ["nvidia-tesla-a100"]}
DEVICE_TOL = {"key": "gpu-device", "value": "nvidia-tesla-a100", "operator": "Equal", "effect": "NoSchedule"}


def gpu_pod():
    import copy

    return copy.deepcopy(GPU_POD)


def test_apply_gpu_node_selectors():
    # TestApplyGPUNodeSelectors
    spec = {}
    pods.apply_gpu_node_selectors(spec, {"device": "nvidia-tesla-a100"}, GPU_CONFIG)
    assert "affinity" not in spec
    spec = gpu_pod()
    pods.apply_gpu_node_selectors(spec, {"device": "nvidia-tesla-a100"}, GPU_CONFIG)
    assert terms(spec) == [{"matchExpressions": [DEVICE_NSR]}] and spec["tolerations"] == [DEVICE_TOL]
    spec = gpu_pod()
    pods.apply_gpu_node_selectors(spec, {"device": "nvidia-tesla-a100", "partition_size": "1g.5gb"}, GPU_CONFIG)
    assert terms(spec) == [{"matchExpressions": [
        DEVICE_NSR, {"key": "gpu-partition-size", "operator": "In", "values": ["1g.5gb"]}]}]
    assert spec["tolerations"] == [DEVICE_TOL, {"key": "gpu-partition-size", "value": "1g.5gb", "operator": "Equal",
                                                "effect": "NoSchedule"}]
    spec = gpu_pod()
    pods.apply_gpu_node_selectors(spec, {"device": "nvidia-tesla-a100", "unpartitioned": True}, GPU_CONFIG)
    assert terms(spec) == [{"matchExpressions": [DEVICE_NSR, {"key": "gpu-partition-size",
                                                              "operator": "DoesNotExist"}]}]
    assert spec["tolerations"] == [DEVICE_TOL]
    nsr = {"key": "gpu-unpartitioned", "operator": "In", "values": ["true"]}
    tol = {"key": "gpu-unpartitioned", "value": "true", "operator": "Equal", "effect": "NoSchedule"}
    config = K8sPluginConfig(gpu_resource_name="nvidia.com/gpu", gpu_device_node_label="gpu-device",
                             gpu_partition_size_node_label="gpu-partition-size",
                             gpu_unpartitioned_node_selector_requirement=nsr, gpu_unpartitioned_toleration=tol)
    spec = gpu_pod()
    pods.apply_gpu_node_selectors(spec, {"device": "nvidia-tesla-a100", "unpartitioned": True}, config)
    assert terms(spec) == [{"matchExpressions": [DEVICE_NSR, nsr]}] and spec["tolerations"] == [DEVICE_TOL, tol]


def test_add_tolerations_for_extended_resources():
    # TestAddTolerationsForExtendedResources
    config = K8sPluginConfig(gpu_resource_name="nvidia.com/gpu",
                             add_tolerations_for_extended_resources=["nvidia.com/gpu", "foo/bar"])
    requests = {"nvidia.com/gpu": "1", "foo/bar": "1", "foo/baz": "1"}
    foo = {"key": "foo", "operator": "Exists", "effect": "NoSchedule"}
    for kind in ("containers", "initContainers"):
        spec = {kind: [{"resources": {"requests": requests}}], "tolerations": [foo]}
        pods.add_tolerations_for_extended_resources(spec, config)
        assert [t["key"] for t in spec["tolerations"]] == ["foo", "foo/bar", "nvidia.com/gpu"]
        assert all(t["operator"] == "Exists" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    spec = {"containers": [{"resources": {"requests": requests}}],
            "tolerations": [foo, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    pods.add_tolerations_for_extended_resources(spec, config)
    assert [t["key"] for t in spec["tolerations"]] == ["foo", "nvidia.com/gpu", "foo/bar"]


B1 = {"name": "task-1", "image": "task-image"}
B2 = {"name": "task-2", "image": "task-image"}
I1 = {"name": "task-init-1", "image": "task-init-image"}
I2 = {"name": "task-init-2", "image": "task-init-image"}


@pytest.mark.parametrize("template, base, primary, primary_init, want", [
    # TestMergeBasePodSpecsOntoTemplate
    ({"schedulerName": "templateScheduler"}, {"serviceAccountName": "baseServiceAccount"}, "", "",
     {"schedulerName": "templateScheduler", "serviceAccountName": "baseServiceAccount"}),
    ({"schedulerName": "templateScheduler"}, {"schedulerName": "baseScheduler", "serviceAccountName": "baseServiceAccount"},
     "", "", {"schedulerName": "baseScheduler", "serviceAccountName": "baseServiceAccount"}),
    ({"containers": [{"name": "default", "image": "default-image"}],
      "initContainers": [{"name": "default-init", "image": "default-init-image"}]},
     {"schedulerName": "baseScheduler"}, "", "", {"schedulerName": "baseScheduler"}),
    ({}, {"containers": [B1], "initContainers": [I1], "schedulerName": "baseScheduler"}, "", "",
     {"containers": [B1], "initContainers": [I1], "schedulerName": "baseScheduler"}),
    ({"containers": [{"name": "task-1", "image": "default-task-image", "terminationMessagePath": "/dev/t"}],
      "initContainers": [{"name": "task-init-1", "image": "default-task-init-image", "terminationMessagePath": "/dev/i"}]},
     {"containers": [B1], "initContainers": [I1], "schedulerName": "baseScheduler"}, "", "",
     {"containers": [{**B1, "terminationMessagePath": "/dev/t"}],
      "initContainers": [{**I1, "terminationMessagePath": "/dev/i"}], "schedulerName": "baseScheduler"}),
    ({"containers": [{"name": "not-matching", "image": "x", "terminationMessagePath": "/dev/t"}],
      "initContainers": [{"name": "not-matching-init", "image": "x", "terminationMessagePath": "/dev/i"}]},
     {"containers": [B1], "initContainers": [I1], "schedulerName": "baseScheduler"}, "", "",
     {"containers": [B1], "initContainers": [I1], "schedulerName": "baseScheduler"}),
    ({"containers": [{"name": "default", "image": "x", "terminationMessagePath": "/dev/t"}],
      "initContainers": [{"name": "default-init", "image": "x", "terminationMessagePath": "/dev/i"}]},
     {"containers": [B1, B2], "initContainers": [I1, I2], "schedulerName": "baseScheduler"}, "", "",
     {"containers": [{**B1, "terminationMessagePath": "/dev/t"}, {**B2, "terminationMessagePath": "/dev/t"}],
      "initContainers": [{**I1, "terminationMessagePath": "/dev/i"}, {**I2, "terminationMessagePath": "/dev/i"}],
      "schedulerName": "baseScheduler"}),
    ({"containers": [{"name": "primary", "image": "x", "terminationMessagePath": "/dev/t"}],
      "initContainers": [{"name": "primary-init", "image": "x", "terminationMessagePath": "/dev/i"}]},
     {"containers": [B1, B2], "initContainers": [I1, I2], "schedulerName": "baseScheduler"}, "task-1", "task-init-1",
     {"containers": [{**B1, "terminationMessagePath": "/dev/t"}, B2],
      "initContainers": [{**I1, "terminationMessagePath": "/dev/i"}, I2], "schedulerName": "baseScheduler"}),
    ({"containers": [{"name": "default", "image": "x", "env": [{"name": "FOO", "value": "BAR"}]}]},
     {"containers": [{"name": "default", "image": "task-image"}]}, "primary", "primary-init",
     {"containers": [{"name": "default", "image": "task-image", "env": [{"name": "FOO", "value": "BAR"}]}]}),
    ({"containers": [{"name": "primary", "image": "x", "env": [{"name": "FOO", "value": "BAR"}]}]},
     {"containers": [{"name": "primary", "image": "task-image"}]}, "primary", "primary-init",
     {"containers": [{"name": "primary", "image": "task-image", "env": [{"name": "FOO", "value": "BAR"}]}]}),
])
def test_merge_base_pod_spec_onto_template(template, base, primary, primary_init, want):
    assert pods.merge_base_pod_spec_onto_template(template, base, primary, primary_init) == want


# --------------------------------------------------------------------------- the whole replica pod


def test_gpu_accelerator_interruptible_pod_is_what_propeller_builds():
    """toK8sPodInterruptible and TestToK8sPod's GPU case, on one pod: the GPU request gets its limit, the
    resource toleration, the interruptible toleration and node selector, the accelerator's affinity."""
    config = AgentPodConfig.from_dict({"plugins": {"k8s": {
        "resource-tolerations": {"nvidia.com/gpu": [TOL_GPU]},
        "interruptible-tolerations": [{"key": "x/flyte", "value": "interruptible", "operator": "Equal",
                                       "effect": "NoSchedule"}],
        "interruptible-node-selector": {"x/interruptible": "true"},
        "interruptible-node-selector-requirement": INTERRUPTIBLE,
        "default-node-selector": {"x/default": "true"},
        "default-env-vars": {"FLYTE_AWS_ENDPOINT": "http://minio:9000"},
        "gpu-device-node-label": "gpu-device",
        "gpu-partition-size-node-label": "gpu-partition-size",
    }}}).k8s
    raw = {"containers": [{"name": "actor", "image": "img", "resources": {"requests": {"gpu": "1", "cpu": "2"}}}]}
    spec = pods.replica_pod_spec(raw, "actor", interruptible=True, accelerator={"device": "nvidia-tesla-a100"},
                                 service_account="sa", config=config, environ={})
    (container,) = spec["containers"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "1024Mi", "nvidia.com/gpu": "1"},
                                      "limits": {"cpu": "2", "memory": "1024Mi", "nvidia.com/gpu": "1"}}
    assert {"name": "FLYTE_AWS_ENDPOINT", "value": "http://minio:9000"} in container["env"]
    assert [t["key"] for t in spec["tolerations"]] == ["flyte/gpu", "x/flyte", "gpu-device"]
    assert spec["nodeSelector"] == {"x/default": "true", "x/interruptible": "true"}
    assert terms(spec) == [{"matchExpressions": [INTERRUPTIBLE, DEVICE_NSR]}]
    assert spec["serviceAccountName"] == "sa" and spec["restartPolicy"] == "Never"
    assert raw["containers"][0]["resources"] == {"requests": {"gpu": "1", "cpu": "2"}}  # input untouched


def test_default_pod_template_lies_under_the_replica_pod():
    config = K8sPluginConfig()
    base = {"metadata": {"labels": {"team": "platform"}},
            "spec": {"priorityClassName": "batch", "containers": [
                {"name": "default", "resources": {"requests": {"memory": "3Gi"}}, "env": [{"name": "T", "value": "1"}]}]}}
    raw = {"containers": [{"name": "actor", "image": "img"}, {"name": "sidecar", "image": "s"}]}
    spec = pods.replica_pod_spec(raw, "actor", interruptible=False, accelerator=None, service_account="",
                                 config=config, base_template=base, environ={})
    primary, sidecar = spec["containers"]
    assert spec["priorityClassName"] == "batch"
    assert primary["resources"]["requests"] == {"cpu": "1000m", "memory": "3Gi"}  # template's, then defaults
    assert primary["env"] == [{"name": "T", "value": "1"}] and primary["image"] == "img"
    assert sidecar["resources"] == {"requests": {"memory": "3Gi"}}  # a sidecar is only kept in range
    labels, annotations = pods.object_meta({"mine": "1"}, {}, base, config)
    assert labels == {"team": "platform", "mine": "1"}
    assert annotations == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}


def test_platform_limits_cap_the_replica():
    platform = TaskResources(requests={"cpu": "500m"}, limits={"cpu": "4", "memory": "8Gi"})
    raw = {"containers": [{"name": "actor", "resources": {"requests": {"cpu": "16", "memory": "64Gi"}}}]}
    spec = pods.replica_pod_spec(raw, "actor", interruptible=False, accelerator=None, service_account="",
                                 config=K8sPluginConfig(), platform=platform, environ={})
    assert spec["containers"][0]["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                                                  "limits": {"cpu": "4", "memory": "8Gi"}}


def test_pods_the_api_server_would_refuse_are_errors_naming_the_setting():
    config = K8sPluginConfig()
    with pytest.raises(pods.PodSpecError, match="no container named 'main'"):
        pods.replica_pod_spec({"containers": [{"name": "x"}]}, "main", interruptible=False, accelerator=None,
                              service_account="", config=config, environ={})
    with pytest.raises(pods.PodSpecError, match="GPU request '1' and limit '2' differ"):
        pods.check_gpu_resources({"containers": [{"name": "a", "resources": {
            "requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "2"}}}]}, config)
    with pytest.raises(pods.PodSpecError, match="whole number"):
        pods.check_gpu_resources({"containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "500m"}}}]},
                                 config)


def test_config_reads_propellers_keys_and_refuses_unknown_ones():
    config = AgentPodConfig.from_dict({
        "plugins": {"k8s": {"pod-pending-timeout": "15m", "default-cpus": "500m", "co-pilot": {"image": "x"},
                            "gpu-resource-name": "amd.com/gpu"},
                    "logs": {"cloudwatch-enabled": True, "templates": [
                        {"displayName": "Grafana", "templateUris": ["https://g/{{ .podName }}"]}]}},
        "task_resources": {"defaults": {"cpu": "100m"}, "limits": {"gpu": 2, "storage": "5Gi"}},
    })
    assert config.k8s.pod_pending_timeout == 900.0 and config.k8s.default_cpus == "500m"
    assert config.platform.limits == {"amd.com/gpu": "2", "ephemeral-storage": "5Gi"}
    assert config.logs.cloudwatch_enabled and config.logs.templates[0].display_name == "Grafana"
    with pytest.raises(ValueError, match="unknown key 'default-toleration'"):
        AgentPodConfig.from_dict({"plugins": {"k8s": {"default-toleration": []}}})
    with pytest.raises(ValueError, match="'lots' is not a Kubernetes quantity"):
        AgentPodConfig.from_dict({"plugins": {"k8s": {"default-memory": "lots"}}})
    with pytest.raises(ValueError, match="not a duration"):
        AgentPodConfig.from_dict({"plugins": {"k8s": {"pod-pending-timeout": "soon"}}})
