"""Two agent pods with Lease leader election on a real kube-apiserver (issue 12): the leader is killed (SIGKILL) or
stopped for an upgrade (SIGTERM) halfway through a 2,000-element actor map and while 50 tasks are queued. Every
task and element completes with the right outputs, propeller never sees a failure (the same resource meta keeps
answering), elements run twice only if they were running at the kill, and no replica pod is left behind.

Agent pods, the Service and propeller's polling are emulated as ``agent_pods.py`` says; replica pods run through the
test-side kubelet.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections import Counter
from typing import Dict

import grpc
import pytest
from flyteidl.core.execution_pb2 import TaskExecution
from kubernetes import client

import propeller
from flytekitplugins.actor import map as actor_map
from kube import failover_tasks as tasks
from kube.agent_pods import ROLE_LABEL, AgentPod, LeaderService, Poller, inputs_of, replica_pods, template_of, wait_for

pytestmark = pytest.mark.timeout(900)

NAMESPACE = "actors-ha"
MAP_SIZE = 2000
QUEUED = 50


@pytest.fixture(scope="module")
def cluster():
    """The shared cluster fixture, with more time to start: this test runs a heavy fleet on shared machines."""
    from kube.cluster import KubeCluster, find_binaries

    binaries = find_binaries()
    if isinstance(binaries, str):
        pytest.skip(binaries)
    with KubeCluster(binaries, timeout_s=240) as running:
        yield running


# ------------------------------------------------------------------------------------------------------ the test

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["leader-killed", "rolling-upgrade"])
def test_the_leader_goes_away_mid_map_and_with_tasks_queued_and_nothing_is_lost(cluster, kubelet, tmp_path, sig):
    core = client.CoreV1Api(cluster.api_client())
    pods: Dict[str, AgentPod] = {}
    service = LeaderService(cluster, NAMESPACE, pods)
    lease_address = f"127.0.0.1:{service.lease_port}"
    suffix = "k" if sig == signal.SIGKILL else "t"
    for name in (f"agent-{suffix}1", f"agent-{suffix}2"):
        pods[name] = AgentPod(cluster, NAMESPACE, name, lease_address, str(tmp_path))
    # Propeller polls every webApi.caching.resyncInterval (30 s by default); 10 s is a third of that. A failover
    # takes the Lease's 10 s plus the new leader's start (adoption lists pods and reads their Secrets), which on a
    # loaded 2-core machine reached 30 s: with 5 s polling that is 6 errors in a row, one past propeller's limit.
    poller = Poller(service.connector_address, resync=10.0)
    driver = propeller.Propeller(None, service.connector_address, str(tmp_path / "flyte"), namespace=NAMESPACE)
    map_log, queue_log = str(tmp_path / "map.log"), str(tmp_path / "queue.log")
    try:
        wait_for(lambda: service.leader, 90, "an agent pod to lead")
        first_leader = service.leader
        labels = wait_for(lambda: all((roles := {p.metadata.name: (p.metadata.labels or {}).get(ROLE_LABEL) for p in
                                                 core.list_namespaced_pod(NAMESPACE, label_selector="app=agent").items}
                                       ).values()) and roles, 90, "both agent pods to label themselves")
        assert sorted(labels.values()) == ["leader", "standby"], labels

        mapped = actor_map(functools.partial(tasks.double, log=map_log), concurrency=None)
        map_request = driver.create_task_request(template_of(mapped, tasks.IMAGE), inputs_of(
            mapped, i=list(range(MAP_SIZE)), log=map_log), "emap", "n0")
        wait_for(lambda: _create(poller, "map", map_request), 30, "CreateTask of the map")
        poller.thread.start()
        wait_for(lambda: (r := poller.resource("map")) is not None and r.custom_info.fields["succeeded"].number_value
                 >= MAP_SIZE // 3, 600, "a third of the map")
        single = template_of(tasks.slow_triple, tasks.IMAGE)
        for i in range(QUEUED):
            poller.create(f"q{i}", driver.create_task_request(
                single, inputs_of(tasks.slow_triple, i=i, log=queue_log, seconds=0.2), f"eq{i}", "n0"))
        wait_for(lambda: (r := poller.resource("map")) is not None and r.custom_info.fields["succeeded"].number_value
                 >= MAP_SIZE // 2, 600, "half the map")

        done_at_stop = poller.resource("map").custom_info.fields["succeeded"].number_value
        queue_runs_at_stop = len(open(queue_log).read().split()) if os.path.exists(queue_log) else 0
        stopped_at = time.monotonic()
        code = pods[first_leader].stop(sig)
        if sig == signal.SIGTERM:
            assert code == 0, pods[first_leader].log_tail()
            # The upgrade brings a new pod, which stands by.
            pods[f"agent-{suffix}3"] = AgentPod(cluster, NAMESPACE, f"agent-{suffix}3", lease_address,
                                                   str(tmp_path))
        new_leader = wait_for(lambda: service.leader not in (None, first_leader) and service.leader, 60,
                              "a new leader")
        recovered_in = time.monotonic() - stopped_at
        # Progress: more elements done than at the stop, or the whole map done (a terminal answer carries the
        # outputs, not the running counts).
        wait_for(lambda: (r := poller.resource("map")) is not None
                 and (r.phase == TaskExecution.SUCCEEDED
                      or r.custom_info.fields["succeeded"].number_value > done_at_stop), 120,
                 "the map to progress again")
        progress_in = time.monotonic() - stopped_at

        wait_for(poller.done, 600, "every task to end")
        failures = {n: (t["resource"].message, t["phases"]) for n, t in poller.tasks.items()
                    if t["resource"].phase != TaskExecution.SUCCEEDED}
        assert not failures, failures
        visible = {n: t["phases"] for n, t in poller.tasks.items()
                   if set(t["phases"]) & {TaskExecution.RETRYABLE_FAILED, TaskExecution.FAILED}}
        assert not visible, f"propeller saw a failure: {visible}"
        most_errors = max(t["max_errors"] for t in poller.tasks.values())
        assert most_errors <= propeller.MAX_GET_ERRORS, f"{most_errors} GetTask errors in a row fail the attempt"

        outputs = [lit.scalar.primitive.integer
                   for lit in poller.resource("map").outputs.literals["o0"].collection.literals]
        assert outputs == [2 * i for i in range(MAP_SIZE)]
        for i in range(QUEUED):
            assert poller.resource(f"q{i}").outputs.literals["o0"].scalar.primitive.integer == 3 * i

        map_runs = Counter(int(x) for x in open(map_log).read().split())
        queue_runs = Counter(int(x) for x in open(queue_log).read().split())
        assert set(map_runs) == set(range(MAP_SIZE)) and set(queue_runs) == set(range(QUEUED))
        map_twice = sorted(i for i, n in map_runs.items() if n > 1)
        queue_twice = sorted(i for i, n in queue_runs.items() if n > 1)
        slots = tasks.mapped.replica_count * tasks.mapped.parallelism
        # Only what was running at the stop may run again: at most one lease per slot of each fleet.
        assert len(map_twice) <= slots and all(n <= 2 for n in map_runs.values()), map_twice
        assert len(queue_twice) <= 1 and all(n <= 2 for n in queue_runs.values()), queue_twice
        print(f"\n{signal.Signals(sig).name}: {first_leader} -> {new_leader}; new leader serving "
              f"{recovered_in:.1f}s after the stop, the map progressing after {progress_in:.1f}s; "
              f"{int(done_at_stop)} of {MAP_SIZE} elements done and {QUEUED - queue_runs_at_stop} of {QUEUED} tasks "
              f"not yet started at the stop; elements run twice: {len(map_twice)}, tasks run twice: {len(queue_twice)}; "
              f"most GetTask errors in a row: {most_errors}")

        # No orphans: the new leader adopted every replica pod, so it deletes them all once idle past their TTL.
        wait_for(lambda: not replica_pods(core, NAMESPACE), 90, "the adopted replica pods to be deleted after their TTL")
    finally:
        poller.close()
        service.close()
        for pod in pods.values():
            pod.stop(signal.SIGTERM)
        core.delete_collection_namespaced_pod(NAMESPACE, label_selector="app=agent", grace_period_seconds=0)
        from kubernetes.client import CoordinationV1Api

        for lease in CoordinationV1Api(cluster.api_client()).list_namespaced_lease(NAMESPACE).items:
            CoordinationV1Api(cluster.api_client()).delete_namespaced_lease(lease.metadata.name, NAMESPACE)


def _create(poller: Poller, node_id: str, request) -> bool:
    try:
        poller.create(node_id, request)
        return True
    except grpc.RpcError:
        return False  # no leader behind the Service yet
