"""Fixtures shared by the integration tiers."""

import os

import pytest


@pytest.fixture(scope="module")
def cluster():
    """A fresh etcd + kube-apiserver for the test module; skipped, with the reason, where it cannot be had."""
    from kube.cluster import KubeCluster, find_binaries

    if os.environ.get("FLYTE_ACTORS_SKIP_KUBE"):
        pytest.skip("FLYTE_ACTORS_SKIP_KUBE is set: the Kubernetes tier is skipped")
    binaries = find_binaries()
    if isinstance(binaries, str):
        pytest.skip(binaries)
    with KubeCluster(binaries) as running:
        yield running
