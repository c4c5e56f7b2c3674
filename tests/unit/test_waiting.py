"""Waiting is not failing: a replica that waits for resources keeps its tasks queued, with the reason."""

from flyte_actor_agent import scheduler as core


def test_a_waiting_replica_keeps_tasks_queued_past_the_start_timeout_and_runs_them_once_scheduled():
    now = [0.0]
    s = core.Scheduler(clock=lambda: now[0], new_id=iter(f"id{i}" for i in range(100)).__next__,
                       new_token=lambda: "t", start_timeout=600.0)
    env = core.FleetConfig(key="gpu-v1", name="gpu", replica_count=1, ttl_seconds=60, parallelism=1)
    (launch,) = s.submit(core.TaskRequest(key="t1", fleet=env, payload=b""))
    assert s.replica_waiting(launch.replica_id, "Unschedulable: 0/3 nodes have nvidia.com/gpu") == []
    assert s.waiting_reason("gpu-v1") == "Unschedulable: 0/3 nodes have nvidia.com/gpu"
    assert s.next_deadline() is None  # no start timeout while it waits
    now[0] = 10_000.0
    assert s.tick() == []
    assert s.tasks["t1"].phase is core.Phase.QUEUED and s.fleets["gpu-v1"].start_failures == 0
    s.replica_waiting(launch.replica_id, None)  # the node came: the start timeout counts from now
    assert s.next_deadline() == 10_600.0 and s.waiting_reason("gpu-v1") == ""
    (assign,) = s.replica_connected(launch.replica_id, "t", "gpu-v1", capacity=1)
    assert isinstance(assign, core.Assign) and s.tasks["t1"].phase is core.Phase.RUNNING


def test_waiting_of_a_replica_that_connected_or_is_unknown_is_ignored():
    s = core.Scheduler(clock=lambda: 0.0, new_id=iter(["r1", "l1"]).__next__, new_token=lambda: "t")
    env = core.FleetConfig(key="e", name="e", replica_count=1, ttl_seconds=60, parallelism=1)
    s.submit(core.TaskRequest(key="t1", fleet=env, payload=b""))
    s.replica_connected("r1", "t", "e", capacity=1)
    assert s.replica_waiting("r1", "late event") == [] and s.replicas["r1"].waiting == ""
    assert s.replica_waiting("nobody", "x") == []
