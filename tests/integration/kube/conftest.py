"""The Kubernetes tier's replica fixtures: the test module's ``NAMESPACE`` and a kubelet that runs its pods."""

import time

import pytest
from kubernetes import client

from kube.kubelet import FakeKubelet


@pytest.fixture(scope="module")
def kubelet(request, cluster):
    namespace = request.module.NAMESPACE
    api = client.CoreV1Api(cluster.api_client())
    api.create_namespace({"metadata": {"name": namespace}})
    kubelet = FakeKubelet(cluster.api_client(), namespace).start()
    yield kubelet
    # Stopped agents leave their replica pods for a successor; delete them so that the kubelet kills their
    # processes as a pod deletion (not racing the API server's shutdown with status updates).
    started = list(kubelet.processes.values())
    api.delete_collection_namespaced_pod(namespace, label_selector="flyte-actors.io/replica=true", grace_period_seconds=0)
    deadline = time.monotonic() + 20
    while kubelet.processes and time.monotonic() < deadline:
        time.sleep(0.1)
    kubelet.stop()
    for process in started:  # every replica process is gone, not just signalled
        process.wait(timeout=10)
