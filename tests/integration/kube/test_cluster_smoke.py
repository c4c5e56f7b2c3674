"""Smoke test of the real-apiserver test tier: objects can be created, RBAC is enforced, helm runs.

Skips (see the reason with ``pytest -rs``) when kube-apiserver has not been built: run build-apiserver.sh.
"""

import subprocess
import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kube.cluster import helm_bin_dir

NAMESPACE = "smoke"
SERVICE_ACCOUNT = "robot"


def _status_of(call) -> int:
    """HTTP status of an API call: 200 when it succeeds."""
    try:
        call()
    except ApiException as e:
        return e.status
    return 200


def _wait_until_allowed(call) -> None:
    """The RBAC authorizer reads roles from an informer cache, so a new binding takes effect a moment later."""
    deadline = time.monotonic() + 10
    while (status := _status_of(call)) != 200:
        assert time.monotonic() < deadline, f"still {status} 10s after the RoleBinding was created"
        time.sleep(0.2)


def test_objects_rbac_and_helm(cluster):
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    core.create_namespaced_secret(NAMESPACE, client.V1Secret(
        metadata=client.V1ObjectMeta(name="creds"), string_data={"token": "s3cret"}))
    core.create_namespaced_pod(NAMESPACE, client.V1Pod(
        metadata=client.V1ObjectMeta(name="p"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")])))
    assert core.read_namespaced_pod("p", NAMESPACE).status.phase == "Pending"  # no scheduler, no kubelet

    core.create_namespaced_service_account(NAMESPACE, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name=SERVICE_ACCOUNT)))
    robot = client.CoreV1Api(cluster.impersonating_client(f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"))
    assert _status_of(lambda: robot.list_namespaced_pod(NAMESPACE)) == 403

    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(NAMESPACE, client.V1Role(
        metadata=client.V1ObjectMeta(name="pod-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])]))
    rbac.create_namespaced_role_binding(NAMESPACE, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="robot-reads-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=SERVICE_ACCOUNT, namespace=NAMESPACE)]))
    _wait_until_allowed(lambda: robot.list_namespaced_pod(NAMESPACE))
    assert _status_of(lambda: robot.list_namespaced_secret(NAMESPACE)) == 403
    assert _status_of(lambda: robot.list_namespaced_pod("default")) == 403

    # Several impersonated groups (the repeated Impersonate-Group header) reach the authorizer.
    rbac.create_namespaced_role_binding(NAMESPACE, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="team-reads-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[client.RbacV1Subject(kind="Group", name="team-b", api_group="rbac.authorization.k8s.io")]))
    alice = client.CoreV1Api(cluster.impersonating_client("alice", ["team-a", "team-b"]))
    _wait_until_allowed(lambda: alice.list_namespaced_pod(NAMESPACE))

    helm = helm_bin_dir() / "helm"
    assert "v3." in subprocess.run([helm, "version", "--short"], check=True, capture_output=True, text=True).stdout
    # helm reaches the apiserver through the kubeconfig (token + self-signed CA).
    subprocess.run([helm, "list", "--all-namespaces", "--kubeconfig", cluster.kubeconfig_path],
                   check=True, capture_output=True)
