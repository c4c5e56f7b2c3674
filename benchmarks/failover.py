"""Benchmark 10: time to recover when the leading agent pod is killed (SIGKILL) halfway through an actor map, with two
agent pods electing their leader through a Lease on a real kube-apiserver (replica pods run as local processes by
the test-side kubelet; see tests/integration/kube/agent_pods.py). Measured from the kill: until the new leader
serves (the Service routes to it), and until the map makes progress again; and how many elements ran twice.

Skipped, with the reason, where the kube-apiserver binary is absent (tests/integration/kube/build-apiserver.sh).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import time
from collections import Counter

from .common import ROOT, Results, log

NAMESPACE = "bench-failover"


def run(results: Results, quick: bool) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    from kube.cluster import KubeCluster, find_binaries

    binaries = find_binaries()
    if isinstance(binaries, str):
        results.add("10", "failover time to recover", "skipped", binaries)
        return
    from kubernetes import client

    from flytekitplugins.actor import map as actor_map
    from kube import failover_tasks as tasks
    from kube.agent_pods import AgentPod, LeaderService, Poller, inputs_of, template_of, wait_for
    from kube.kubelet import FakeKubelet

    import propeller

    size = 200 if quick else 1000
    work = tempfile.mkdtemp(prefix="flyte-actors-failover-")
    with KubeCluster(binaries, timeout_s=240) as cluster:
        core = client.CoreV1Api(cluster.api_client())
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        kubelet = FakeKubelet(cluster.api_client(), NAMESPACE).start()
        pods = {}
        service = LeaderService(cluster, NAMESPACE, pods)
        lease_address = f"127.0.0.1:{service.lease_port}"
        for name in ("agent-1", "agent-2"):
            pods[name] = AgentPod(cluster, NAMESPACE, name, lease_address, work)
        poller = Poller(service.connector_address, resync=0.5)
        driver = propeller.Propeller(None, service.connector_address, os.path.join(work, "flyte"), namespace=NAMESPACE)
        map_log = os.path.join(work, "map.log")
        try:
            first = wait_for(lambda: service.leader, 120, "an agent pod to lead")
            mapped = actor_map(functools.partial(tasks.double, log=map_log))
            request = driver.create_task_request(template_of(mapped, tasks.IMAGE), inputs_of(
                mapped, i=list(range(size)), log=map_log), "emap", "n0")
            wait_for(lambda: _created(poller, request), 60, "CreateTask")
            poller.thread.start()

            def succeeded() -> float:
                resource = poller.resource("map")
                return resource.custom_info.fields["succeeded"].number_value if resource is not None else 0

            wait_for(lambda: succeeded() >= size // 2, 600, "half the map")
            done = succeeded()
            log(f"[10] killing the leader {first} with {int(done)} of {size} elements done")
            killed_at = time.monotonic()
            pods[first].stop(signal.SIGKILL)
            wait_for(lambda: service.leader not in (None, first), 120, "a new leader")
            serving = time.monotonic() - killed_at
            wait_for(lambda: succeeded() > done, 120, "the map to progress again")
            progressing = time.monotonic() - killed_at
            wait_for(poller.done, 600, "the map to end")
            resource = poller.resource("map")
            twice = sum(1 for n in Counter(open(map_log).read().split()).values() if n > 1)
            ok = resource.phase == 3  # SUCCEEDED
            results.add("10", "failover: leader SIGKILLed mid-map -> new leader serving", f"{serving:.1f} s",
                        "lease 10 s, retry 2 s; 1 run (a shared 2-core machine)")
            results.add("10", "  -> the map progressing again", f"{progressing:.1f} s",
                        f"map of {size}; {twice} elements ran twice; map {'SUCCEEDED' if ok else 'FAILED'}")
            results.data["10"] = {"size": size, "serving": serving, "progressing": progressing, "twice": twice}
        finally:
            poller.close()
            service.close()
            for pod in pods.values():
                pod.stop(signal.SIGTERM)
            core.delete_collection_namespaced_pod(NAMESPACE, grace_period_seconds=0)
            kubelet.stop()


def _created(poller, request) -> bool:
    import grpc

    try:
        poller.create("map", request)
        return True
    except grpc.RpcError:
        return False
