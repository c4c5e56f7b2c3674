"""Unit tests of the scheduling core (``flyte_actor_agent.scheduler``), driven with a fake clock and deterministic ids.

Covered: lease reconciliation on Hello and Heartbeat (ghost leases, leases the agent no longer holds), the reconnect
grace of a replica whose stream dropped, starts ended by signals, scale-up on demand, dispatch to the busiest replica, idempotent submit, at-least-once report de-duplication,
failure phases, lost leases and replicas (re-queue, re-lease, ``max_leases``), replicas that cannot start, refused
connections, cancellation, ``tick`` (TTL, heartbeat timeout, lease deadline, forgetting results), ``next_deadline``,
actor maps (concurrency, output order, ``min_success_ratio``, cancel, empty maps), ``drain`` and the module doctest.
"""

from __future__ import annotations

import doctest
import itertools
from typing import Dict, List, Tuple

import pytest

from flyte_actor_agent import scheduler as scheduler_module
from flyte_actor_agent.scheduler import (
    Ack,
    Assign,
    CancelLease,
    Disconnect,
    ExitReason,
    Finished,
    FleetConfig,
    Launch,
    Outcome,
    Phase,
    ReplicaExit,
    ReplicaRefused,
    ReplicaState,
    Scheduler,
    Stop,
    TaskRequest,
    TaskState,
)


class Clock:
    """A clock that only moves when the test sets ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(clock: Clock, **kwargs) -> Scheduler:
    ids = itertools.count(1)
    tokens = itertools.count(1)
    return Scheduler(
        clock=clock, new_id=lambda: f"id{next(ids)}", new_token=lambda: f"token{next(tokens)}", **kwargs
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sched(clock: Clock) -> Scheduler:
    return make_scheduler(clock)


def fleet_spec(replica_count: int = 1, parallelism: int = 1, ttl_seconds: float = 60, name: str = "env") -> FleetConfig:
    return FleetConfig(
        key=f"{name}-v1", name=name, replica_count=replica_count, ttl_seconds=ttl_seconds, parallelism=parallelism
    )


def request(key: str, fleet: FleetConfig, timeout: float = 0.0) -> TaskRequest:
    return TaskRequest(key=key, fleet=fleet, payload=f"payload of {key}", timeout_seconds=timeout, name=key)


def elements(fleet: FleetConfig, map_key: str = "m", timeout: float = 0.0):
    """``make_element`` for ``submit_map``: element ``i`` is ``m[i]`` with payload ``i``."""
    return lambda i: TaskRequest(key=f"{map_key}[{i}]", fleet=fleet, payload=i, timeout_seconds=timeout)


def only(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def assigned(effects: list) -> Dict[str, Assign]:
    """The Assign effects, by task key."""
    return {e.task.key: e for e in only(effects, Assign)}


def connect(sched: Scheduler, launch: Launch) -> list:
    return sched.replica_connected(launch.replica_id, launch.token, launch.fleet.key, capacity=launch.fleet.parallelism)


def submit_all(sched: Scheduler, fleet: FleetConfig, *keys: str, timeout: float = 0.0) -> List[Launch]:
    """Submit tasks; return the replicas launched for them."""
    launches: List[Launch] = []
    for key in keys:
        launches += only(sched.submit(request(key, fleet, timeout)), Launch)
    return launches


def start_one(sched: Scheduler, fleet: FleetConfig, key: str = "t1", timeout: float = 0.0) -> Assign:
    """Submit one task to an empty fleet and connect the replica launched for it: the task's Assign."""
    (launch,) = submit_all(sched, fleet, key, timeout=timeout)
    return assigned(connect(sched, launch))[key]


def report(sched: Scheduler, assign: Assign, outcome: Outcome = Outcome.SUCCEEDED, **kwargs) -> list:
    return sched.report(assign.replica_id, assign.lease_id, outcome, **kwargs)


# ------------------------------------------------------------------------------------------------ scale and dispatch


def test_replicas_start_on_demand_up_to_replica_count(sched):
    fleet = fleet_spec(replica_count=3, parallelism=2)
    assert sched.replicas == {}
    launches: List[Launch] = []
    launched_after_each_submit = []
    for n in range(1, 9):
        launches += submit_all(sched, fleet, f"t{n}")
        launched_after_each_submit.append(len(launches))
    # ceil(demand / parallelism), capped at replica_count
    assert launched_after_each_submit == [1, 1, 2, 2, 3, 3, 3, 3]
    assert len({launch.replica_id for launch in launches}) == 3
    assert all(launch.fleet == fleet for launch in launches)
    assert all(sched.replicas[launch.replica_id].token == launch.token for launch in launches)


def test_dispatch_prefers_the_busiest_replica_with_a_free_slot(sched):
    fleet = fleet_spec(replica_count=2, parallelism=2)
    a, b = submit_all(sched, fleet, "t1", "t2", "t3")
    on_a = assigned(connect(sched, a))
    assert {k: e.replica_id for k, e in on_a.items()} == {"t1": a.replica_id, "t2": a.replica_id}
    on_b = assigned(connect(sched, b))
    assert {k: e.replica_id for k, e in on_b.items()} == {"t3": b.replica_id}

    report(sched, on_a["t1"])
    report(sched, on_b["t3"])  # a runs one task, b none

    effects = sched.submit(request("t4", fleet))
    assert only(effects, Launch) == []
    assert assigned(effects)["t4"].replica_id == a.replica_id  # b stays idle, so it can expire
    effects = sched.submit(request("t5", fleet))  # a is full now
    assert assigned(effects)["t5"].replica_id == b.replica_id


def test_a_report_that_frees_a_slot_assigns_the_next_queued_task_at_once(sched):
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1", "t2")
    first = assigned(connect(sched, launch))
    assert list(first) == ["t1"]
    assert sched.tasks["t2"].phase is Phase.QUEUED

    effects = report(sched, first["t1"], outputs=b"out")
    assert effects[:2] == [Ack(launch.replica_id, first["t1"].lease_id), Finished("t1")]
    (assign,) = only(effects, Assign)
    assert (assign.replica_id, assign.task.key) == (launch.replica_id, "t2")
    assert sched.tasks["t2"].phase is Phase.RUNNING


def test_submitting_the_same_key_again_is_a_no_op(sched):
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1")
    assert sched.submit(TaskRequest(key="t1", fleet=fleet, payload="other")) == []
    assert list(sched.fleets[fleet.key].queue) == [sched.tasks["t1"]]
    assert sched.tasks["t1"].payload == "payload of t1"

    report(sched, assigned(connect(sched, launch))["t1"], outputs=b"out")
    assert sched.submit(request("t1", fleet)) == []
    assert sched.tasks["t1"].phase is Phase.SUCCEEDED


# ----------------------------------------------------------------------------------------------------------- reports


def test_reports_of_unknown_replicas_or_leases_are_only_acked(sched):
    assert sched.report("ghost", "no-such-lease", Outcome.SUCCEEDED, outputs=b"x") == [Ack("ghost", "no-such-lease")]
    assign = start_one(sched, fleet_spec())
    assert sched.report(assign.replica_id, "no-such-lease", Outcome.FAILED) == [Ack(assign.replica_id, "no-such-lease")]
    assert sched.tasks["t1"].phase is Phase.RUNNING


def test_duplicate_terminal_reports_are_acked_and_ignored(sched):
    assign = start_one(sched, fleet_spec())
    assert report(sched, assign, outputs=b"first") == [Ack(assign.replica_id, assign.lease_id), Finished("t1")]
    # At-least-once delivery: the replica sends the same report again, or a different one for the same lease.
    assert report(sched, assign, outputs=b"first") == [Ack(assign.replica_id, assign.lease_id)]
    assert report(sched, assign, Outcome.FAILED, error=b"late") == [Ack(assign.replica_id, assign.lease_id)]
    task = sched.tasks["t1"]
    assert (task.phase, task.outputs, task.error) == (Phase.SUCCEEDED, b"first", None)
    assert sched.replicas[assign.replica_id].tasks_run == 1


@pytest.mark.parametrize("retryable, phase", [(True, Phase.RETRYABLE_FAILED), (False, Phase.FAILED)])
def test_failed_reports_end_the_task_retryably_or_not(sched, retryable, phase):
    assign = start_one(sched, fleet_spec())
    effects = report(sched, assign, Outcome.FAILED, error=b"error pb", message="ValueError: boom", retryable=retryable)
    assert effects == [Ack(assign.replica_id, assign.lease_id), Finished("t1")]
    task = sched.tasks["t1"]
    assert (task.phase, task.message, task.error, task.leases) == (phase, "ValueError: boom", b"error pb", 1)


# -------------------------------------------------------------------------------------------------- lost leases


def test_a_lost_replicas_task_goes_back_to_the_front_of_the_queue(sched):
    fleet = fleet_spec()
    (a,) = submit_all(sched, fleet, "t1", "t2")
    first = assigned(connect(sched, a))["t1"]

    effects = sched.replica_gone(a.replica_id, ReplicaExit(ExitReason.OOM_KILLED, "OOMKilled"))
    (b,) = only(effects, Launch)  # the queue still holds work, so a replacement starts
    assert sched.tasks["t1"].phase is Phase.QUEUED
    assert [t.key for t in sched.fleets[fleet.key].queue] == ["t1", "t2"]

    again = assigned(connect(sched, b))
    assert list(again) == ["t1"]
    assert again["t1"].lease_id != first.lease_id
    assert sched.tasks["t1"].leases == 2
    # The dead replica's report of its old lease arrives late: acked, ignored.
    assert report(sched, first, outputs=b"stale") == [Ack(a.replica_id, first.lease_id)]
    assert sched.tasks["t1"].phase is Phase.RUNNING


def test_a_lost_replicas_task_is_leased_again_to_a_free_replica(sched):
    fleet = fleet_spec(replica_count=2)
    a, b = submit_all(sched, fleet, "t1", "t2")
    on_a = assigned(connect(sched, a))["t1"]
    report(sched, assigned(connect(sched, b))["t2"])  # b is free

    effects = sched.replica_gone(a.replica_id, ReplicaExit(ExitReason.EXITED, "node drained"))
    (again,) = only(effects, Assign)
    assert only(effects, Launch) == []
    assert (again.replica_id, again.task.key) == (b.replica_id, "t1")
    assert again.lease_id != on_a.lease_id
    assert sched.tasks["t1"].lease_id == again.lease_id
    assert on_a.lease_id not in sched.leases


def test_a_task_lost_max_leases_times_fails_retryably_naming_the_replica_and_cause(clock):
    sched = make_scheduler(clock, max_leases=3)
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1")
    for attempt in range(1, 4):
        assign = assigned(connect(sched, launch))["t1"]
        effects = sched.replica_gone(assign.replica_id, ReplicaExit(ExitReason.EXITED, f"pod evicted ({attempt})"))
        if attempt < 3:
            (launch,) = only(effects, Launch)
            assert sched.tasks["t1"].phase is Phase.QUEUED
    assert effects == [Finished("t1")]
    task = sched.tasks["t1"]
    assert task.phase is Phase.RETRYABLE_FAILED
    assert "lost 3 times" in task.message
    assert assign.replica_id in task.message and "pod evicted (3)" in task.message


def test_a_lease_given_back_unstarted_is_leased_again_without_counting_a_failure(clock):
    sched = make_scheduler(clock, max_leases=3)
    assign = start_one(sched, fleet_spec())
    for _ in range(scheduler_module.GIVE_BACK_LIMIT):
        (assign,) = only(report(sched, assign, Outcome.CANCELLED), Assign)
    task = sched.tasks["t1"]
    assert task.phase is Phase.RUNNING and task.system_failures == 0
    # A replica that gives the same task back over and over is misbehaving: from then on it counts as lost.
    for _ in range(2):
        (assign,) = only(report(sched, assign, Outcome.CANCELLED), Assign)
    assert task.system_failures == 2
    assert only(report(sched, assign, Outcome.CANCELLED), Finished)
    assert task.phase is Phase.RETRYABLE_FAILED and "lost 3 times" in task.message


def test_a_lease_reported_lost_is_leased_again_until_max_leases(clock):
    outcome = Outcome.LOST
    sched = make_scheduler(clock, max_leases=3)
    assign = start_one(sched, fleet_spec())
    leases = [assign.lease_id]
    for _ in range(2):
        effects = report(sched, assign, outcome)
        (assign,) = only(effects, Assign)  # the replica's slot is free again: same replica, new lease
        assert assign.task.key == "t1"
        leases.append(assign.lease_id)
    assert len(set(leases)) == 3

    effects = report(sched, assign, outcome)
    assert effects == [Ack(assign.replica_id, assign.lease_id), Finished("t1")]
    task = sched.tasks["t1"]
    assert task.phase is Phase.RETRYABLE_FAILED
    assert "lost 3 times" in task.message and assign.replica_id in task.message


# ---------------------------------------------------------------------------------------------- start failures


def test_replicas_that_cannot_start_fail_the_queue_then_launches_are_retried_later(clock):
    sched = make_scheduler(clock, start_failure_limit=2, start_retry_after=60)
    fleet = fleet_spec(name="gpu-env")
    cause = "ErrImagePull: ghcr.io/x/y:1 not found"
    exit = ReplicaExit(ExitReason.IMAGE_PULL, cause)
    (first,) = submit_all(sched, fleet, "t1")

    (second,) = only(sched.replica_gone(first.replica_id, exit), Launch)  # one failure: try again
    assert sched.tasks["t1"].phase is Phase.QUEUED

    assert sched.replica_gone(second.replica_id, exit) == [Finished("t1")]
    task = sched.tasks["t1"]
    assert task.phase is Phase.FAILED
    assert cause in task.message and "'gpu-env'" in task.message and "2 tries" in task.message

    clock.now = 59.5  # new work fails at once, without a launch
    effects = sched.submit(request("t2", fleet))
    assert effects == [Finished("t2")]
    assert sched.tasks["t2"].phase is Phase.FAILED and cause in sched.tasks["t2"].message

    clock.now = 60.0  # the wait is over: launch again
    (third,) = submit_all(sched, fleet, "t3")
    assert sched.tasks["t3"].phase is Phase.QUEUED
    assert assigned(connect(sched, third))["t3"].replica_id == third.replica_id


# ------------------------------------------------------------------------------------------------ connections


@pytest.mark.parametrize(
    "replica_id, token, fleet_key",
    [
        ("id1", "wrong-token", "env-v1"),
        ("unknown", "token1", "env-v1"),
        ("id1", "token1", "other-v1"),
    ],
    ids=["wrong-token", "unknown-replica", "wrong-fleet"],
)
def test_connections_that_do_not_match_a_launch_are_refused(sched, replica_id, token, fleet_key):
    (launch,) = submit_all(sched, fleet_spec(), "t1")
    assert (launch.replica_id, launch.token, launch.fleet.key) == ("id1", "token1", "env-v1")

    with pytest.raises(ReplicaRefused, match=repr(replica_id)):
        sched.replica_connected(replica_id, token, fleet_key, capacity=1)
    assert sched.replicas["id1"].state is ReplicaState.STARTING
    assert sched.tasks["t1"].phase is Phase.QUEUED


def test_a_replica_being_stopped_is_refused(sched):
    (launch,) = submit_all(sched, fleet_spec(), "t1")
    sched.stop_replica(launch.replica_id, "test")
    with pytest.raises(ReplicaRefused, match="being stopped"):
        connect(sched, launch)


# ------------------------------------------------------------------------------------------------------- cancel


def test_cancelling_a_queued_task_removes_it_from_the_queue(sched):
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1")
    assert sched.cancel("t1", "user asked") == [Finished("t1")]
    task = sched.tasks["t1"]
    assert (task.phase, task.message) == (Phase.ABORTED, "user asked")
    assert not sched.fleets[fleet.key].queue
    assert only(connect(sched, launch), Assign) == []
    assert sched.cancel("t1") == []
    assert sched.cancel("never-submitted") == []


def test_cancelling_a_running_task_cancels_its_lease_and_keeps_the_slot_until_the_replica_reports(sched):
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1", "t2")
    running = assigned(connect(sched, launch))["t1"]

    effects = sched.cancel("t1", "user asked")
    assert effects == [CancelLease(launch.replica_id, running.lease_id, "user asked"), Finished("t1")]
    assert sched.tasks["t1"].phase is Phase.ABORTED
    assert sched.tasks["t2"].phase is Phase.QUEUED  # the replica has not given the slot back yet

    effects = report(sched, running, Outcome.CANCELLED)
    assert only(effects, Finished) == []
    assert effects[0] == Ack(launch.replica_id, running.lease_id)
    assert assigned(effects)["t2"].replica_id == launch.replica_id
    assert sched.tasks["t1"].phase is Phase.ABORTED


# ---------------------------------------------------------------------------------------------------------- tick


def test_an_idle_replica_is_stopped_once_its_ttl_has_passed(sched, clock):
    assign = start_one(sched, fleet_spec(ttl_seconds=20))
    clock.now = 5.0
    report(sched, assign)  # idle from now on

    clock.now = 24.9
    assert sched.tick() == []
    clock.now = 25.0
    assert sched.tick() == [Stop(assign.replica_id, "idle for 20s (ttl_seconds)")]
    assert sched.replicas[assign.replica_id].state is ReplicaState.STOPPING
    assert sched.tick() == []
    assert sched.replica_gone(assign.replica_id, ReplicaExit(ExitReason.STOPPED, "stopped")) == []  # no replacement: nothing to do


def test_a_busy_replica_is_not_stopped_by_its_ttl(sched, clock):
    assign = start_one(sched, fleet_spec(ttl_seconds=20))
    for now in range(10, 200, 10):
        clock.now = float(now)
        sched.heartbeat(assign.replica_id)
        assert sched.tick() == []
    assert sched.replicas[assign.replica_id].state is ReplicaState.READY


def test_an_idle_replica_is_not_stopped_while_its_fleet_has_queued_work(sched, clock):
    """Every public call dispatches queued work to free replicas first, so this state is set up by hand: the TTL
    check itself must not stop a replica its fleet still has work for."""
    fleet = fleet_spec(ttl_seconds=20)
    assign = start_one(sched, fleet)
    report(sched, assign)
    queued = TaskState(key="x", fleet_key=fleet.key, payload=None, timeout_seconds=0, name="x", submitted_at=0)
    sched.fleets[fleet.key].queue.append(queued)
    clock.now = 25.0
    assert sched.tick() == []
    sched.fleets[fleet.key].queue.clear()
    assert sched.tick() == [Stop(assign.replica_id, "idle for 20s (ttl_seconds)")]


def test_a_silent_replica_is_stopped_and_its_leases_queued_again(clock):
    sched = make_scheduler(clock, heartbeat_timeout=30)
    fleet = fleet_spec(ttl_seconds=600)
    assign = start_one(sched, fleet)
    clock.now = 20.0
    sched.heartbeat(assign.replica_id)

    clock.now = 50.0
    assert sched.tick() == []
    clock.now = 50.5
    effects = sched.tick()
    assert effects[0] == Stop(assign.replica_id, "no heartbeat")
    (replacement,) = only(effects, Launch)
    assert assign.replica_id not in sched.replicas and assign.lease_id not in sched.leases
    task = sched.tasks["t1"]
    assert (task.phase, task.lease_id) == (Phase.QUEUED, None)
    assert assigned(connect(sched, replacement))["t1"].lease_id != assign.lease_id


def test_a_lease_past_its_timeout_and_grace_is_cancelled_and_fails_retryably(clock):
    sched = make_scheduler(clock, heartbeat_timeout=1e9, lease_grace=30)
    assign = start_one(sched, fleet_spec(), key="train", timeout=100)
    assert sched.next_deadline() == 130.0

    clock.now = 129.9
    assert sched.tick() == []
    clock.now = 130.0
    assert sched.tick() == [CancelLease(assign.replica_id, assign.lease_id, "timed out"), Finished("train")]
    task = sched.tasks["train"]
    assert task.phase is Phase.RETRYABLE_FAILED
    assert "train" in task.message and "timeout of 100s" in task.message
    assert report(sched, assign, outputs=b"late") == [Ack(assign.replica_id, assign.lease_id)]
    assert sched.tasks["train"].phase is Phase.RETRYABLE_FAILED


def test_next_deadline_is_the_earliest_lease_deadline_heartbeat_ttl_or_forget_time(clock):
    sched = make_scheduler(clock, heartbeat_timeout=30, lease_grace=5, retain=100)
    assert sched.next_deadline() is None
    fleet = fleet_spec(parallelism=2, ttl_seconds=20)
    (launch,) = submit_all(sched, fleet, "short", timeout=10)
    submit_all(sched, fleet, "long")
    running = assigned(connect(sched, launch))
    assert sched.next_deadline() == 15.0  # the lease deadline of "short": 0 + 10 + 5

    clock.now = 2.0
    report(sched, running["short"])
    assert sched.next_deadline() == 32.0  # heartbeat; "short" is forgotten at 102, the replica is busy

    clock.now = 3.0
    report(sched, running["long"])
    assert sched.next_deadline() == 23.0  # the idle replica's TTL
    clock.now = 23.0
    assert sched.tick() == [Stop(launch.replica_id, "idle for 20s (ttl_seconds)")]
    assert sched.next_deadline() == 102.0  # only the results are left to forget


def test_finished_results_are_forgotten_after_retain(clock):
    sched = make_scheduler(clock, heartbeat_timeout=1e9, retain=100)
    fleet = fleet_spec(ttl_seconds=10_000)
    assign = start_one(sched, fleet)
    sched.submit_map("empty", fleet, 0, elements(fleet, "empty"))
    clock.now = 5.0
    report(sched, assign, outputs=b"out")

    clock.now = 99.9
    sched.tick()
    assert "empty" in sched.maps and "t1" in sched.tasks
    clock.now = 100.0
    sched.tick()
    assert "empty" not in sched.maps and "t1" in sched.tasks
    clock.now = 105.0
    sched.tick()
    assert "t1" not in sched.tasks
    # The key is free again: a new submission runs on the warm replica.
    assert assigned(sched.submit(request("t1", fleet)))["t1"].replica_id == assign.replica_id


# ----------------------------------------------------------------------------------------------------- actor maps


def test_a_map_keeps_at_most_concurrency_elements_in_flight_and_gathers_outputs_in_order(sched):
    fleet = fleet_spec(replica_count=3)
    effects = sched.submit_map("m", fleet, 5, elements(fleet), concurrency=2)
    launches = only(effects, Launch)
    assert len(launches) == 2  # concurrency also bounds the scale-up
    running: Dict[str, Tuple[str, int]] = {}  # lease id -> (replica id, element index)
    started: List[int] = []

    def track(effects: list) -> None:
        for assign in only(effects, Assign):
            running[assign.lease_id] = (assign.replica_id, assign.task.payload)
            started.append(assign.task.payload)

    for launch in launches:
        track(connect(sched, launch))
    job = sched.maps["m"]
    while running:
        assert len(running) <= 2 and len(job.in_flight) <= 2
        # Finish the highest index first, so outputs arrive out of order.
        lease_id, (replica_id, index) = max(running.items(), key=lambda item: item[1][1])
        del running[lease_id]
        effects = sched.report(replica_id, lease_id, Outcome.SUCCEEDED, outputs=f"out{index}".encode())
        track(effects)
    assert started == [0, 1, 2, 3, 4]
    assert effects[-1] == Finished("m")
    assert job.phase is Phase.SUCCEEDED
    assert job.outputs == [b"out0", b"out1", b"out2", b"out3", b"out4"]
    assert len(sched.replicas) == 2


def start_map(sched: Scheduler, size: int, min_success_ratio: float) -> Dict[int, Assign]:
    """A map whose elements all run at once on one replica: the Assign of each element, by index."""
    fleet = fleet_spec(parallelism=size)
    (launch,) = only(sched.submit_map("m", fleet, size, elements(fleet), min_success_ratio=min_success_ratio), Launch)
    running = {assign.task.payload: assign for assign in only(connect(sched, launch), Assign)}
    assert sorted(running) == list(range(size))
    return running


def test_a_map_succeeds_with_failures_that_min_success_ratio_allows(sched):
    running = start_map(sched, 4, min_success_ratio=0.5)
    report(sched, running[0], outputs=b"0")
    report(sched, running[1], Outcome.FAILED, message="bad 1")
    report(sched, running[2], outputs=b"2")
    assert sched.maps["m"].phase is Phase.RUNNING
    effects = report(sched, running[3], Outcome.FAILED, message="bad 3")
    assert effects[-1] == Finished("m")
    job = sched.maps["m"]
    assert job.phase is Phase.SUCCEEDED
    assert job.outputs == [b"0", None, b"2", None]
    assert job.errors == {1: "bad 1", 3: "bad 3"}


def test_a_map_fails_once_failures_exceed_min_success_ratio_and_aborts_the_rest(sched):
    running = start_map(sched, 4, min_success_ratio=0.5)
    report(sched, running[0], Outcome.FAILED, message="bad 0")
    report(sched, running[1], Outcome.FAILED, message="bad 1")
    assert sched.maps["m"].phase is Phase.RUNNING

    effects = report(sched, running[2], Outcome.FAILED, message="bad 2")
    assert effects[0] == Ack(running[2].replica_id, running[2].lease_id)
    (cancel,) = only(effects, CancelLease)
    assert (cancel.replica_id, cancel.lease_id) == (running[3].replica_id, running[3].lease_id)
    assert effects[-1] == Finished("m")
    job = sched.maps["m"]
    assert job.phase is Phase.FAILED
    assert "3 of 4 elements failed" in job.message and "bad 2" in job.message
    assert running[3].task.phase is Phase.ABORTED
    # The aborted element's late result changes nothing.
    assert report(sched, running[3], outputs=b"3") == [Ack(running[3].replica_id, running[3].lease_id)]
    assert job.outputs[3] is None and job.phase is Phase.FAILED


def test_an_empty_map_succeeds_at_once(sched):
    fleet = fleet_spec()
    assert sched.submit_map("m", fleet, 0, elements(fleet)) == [Finished("m")]
    job = sched.maps["m"]
    assert (job.phase, job.outputs) == (Phase.SUCCEEDED, [])
    assert sched.replicas == {}


def test_submitting_a_map_twice_is_a_no_op(sched):
    fleet = fleet_spec()
    first = sched.submit_map("m", fleet, 2, elements(fleet))
    assert only(first, Launch)
    assert sched.submit_map("m", fleet, 5, elements(fleet)) == []
    assert sched.maps["m"].size == 2


def test_cancelling_a_map_aborts_its_running_and_queued_elements(sched):
    fleet = fleet_spec()
    (launch,) = only(sched.submit_map("m", fleet, 3, elements(fleet)), Launch)
    running = assigned(connect(sched, launch))["m[0]"]
    in_flight = dict(sched.maps["m"].in_flight)
    assert sorted(in_flight) == [0, 1, 2]

    effects = sched.cancel("m", "user asked")
    (cancel,) = only(effects, CancelLease)
    assert (cancel.replica_id, cancel.lease_id) == (launch.replica_id, running.lease_id)
    assert effects[-1] == Finished("m")
    assert sched.maps["m"].phase is Phase.ABORTED
    assert all(task.phase is Phase.ABORTED for task in in_flight.values())
    assert not sched.fleets[fleet.key].queue
    assert report(sched, running, Outcome.CANCELLED) == [Ack(launch.replica_id, running.lease_id)]
    assert sched.cancel("m") == []


def test_a_map_ending_in_a_tick_cancels_each_lease_once_and_leaves_aborted_elements_aborted(clock):
    """Two elements pass their deadline in one tick: the first timeout fails the map, which aborts the second."""
    sched = make_scheduler(clock, heartbeat_timeout=1e9, lease_grace=0)
    fleet = fleet_spec(parallelism=2)
    (launch,) = only(sched.submit_map("m", fleet, 2, elements(fleet, timeout=10)), Launch)
    running = assigned(connect(sched, launch))

    clock.now = 10.0
    effects = sched.tick()
    cancelled = [e.lease_id for e in only(effects, CancelLease)]
    assert sorted(cancelled) == sorted(a.lease_id for a in running.values())  # one CancelLease per lease
    assert effects.count(Finished("m")) == 1
    assert sched.maps["m"].phase is Phase.RETRYABLE_FAILED
    phases = sorted(a.task.phase.value for a in running.values())
    assert phases == sorted([Phase.RETRYABLE_FAILED.value, Phase.ABORTED.value])


# ---------------------------------------------------------------------------------------------------------- drain


def test_drain_fails_everything_retryably_and_stops_every_replica(sched):
    fleet = fleet_spec(replica_count=2)
    a, b = submit_all(sched, fleet, "t1", "t2", "t3")
    running = assigned(connect(sched, a))["t1"]  # b never connects
    sched.submit_map("m", fleet, 1, elements(fleet))

    effects = sched.drain()
    assert set(only(effects, Finished)) == {Finished(k) for k in ("t1", "t2", "t3", "m")}
    assert only(effects, CancelLease) == [CancelLease(a.replica_id, running.lease_id, "the actor agent shut down")]
    assert {e.replica_id for e in only(effects, Stop)} == {a.replica_id, b.replica_id}
    assert all(sched.tasks[k].phase is Phase.RETRYABLE_FAILED for k in ("t1", "t2", "t3"))
    assert sched.maps["m"].phase is Phase.RETRYABLE_FAILED
    assert not sched.fleets[fleet.key].queue

    assert sched.submit(request("t4", fleet)) == [Finished("t4")]
    assert sched.tasks["t4"].phase is Phase.RETRYABLE_FAILED
    assert sched.replica_gone(a.replica_id, ReplicaExit(ExitReason.STOPPED, "stopped")) == []  # no replacement while draining


# -------------------------------------------------------------------------------------------------------- doctest


def test_module_doctest():
    result = doctest.testmod(scheduler_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_a_new_environment_version_stops_the_old_versions_replicas_once_idle():
    clock = Clock()
    s = make_scheduler(clock)
    old = FleetConfig(key="env-v1", name="env", replica_count=2, ttl_seconds=600, parallelism=1, lineage="env.ns")
    new = FleetConfig(key="env-v2", name="env", replica_count=1, ttl_seconds=600, parallelism=1, lineage="env.ns")
    (launch_a,) = s.submit(TaskRequest(key="a", fleet=old, payload="p"))
    (launch_b,) = s.submit(TaskRequest(key="b", fleet=old, payload="p"))
    (assign_a,) = s.replica_connected(launch_a.replica_id, launch_a.token, "env-v1", capacity=1)
    (assign_b,) = s.replica_connected(launch_b.replica_id, launch_b.token, "env-v1", capacity=1)
    s.report(launch_b.replica_id, assign_b.lease_id, Outcome.SUCCEEDED, outputs=b"")  # b's replica is idle
    effects = s.submit(TaskRequest(key="c", fleet=new, payload="p"))
    stops = [e for e in effects if isinstance(e, Stop)]
    assert [e.replica_id for e in stops] == [launch_b.replica_id] and "new version" in stops[0].reason
    assert any(isinstance(e, Launch) and e.fleet.key == "env-v2" for e in effects)
    # The busy old replica finishes its task, then stops instead of waiting for its TTL.
    effects = s.report(launch_a.replica_id, assign_a.lease_id, Outcome.SUCCEEDED, outputs=b"")
    assert [e.replica_id for e in effects if isinstance(e, Stop)] == [launch_a.replica_id]
    assert s.tasks["a"].phase is Phase.SUCCEEDED


# ------------------------------------------------------------------------- actor maps: per-element semantics


def start_elements(sched: Scheduler, size: int, replicas: int = 1, parallelism: int = 1, **options):
    """A map on a fleet of ``replicas`` connected replicas: (fleet, running Assigns by element index)."""
    fleet = fleet_spec(replica_count=replicas, parallelism=parallelism)
    running: Dict[int, Assign] = {}
    for launch in only(sched.submit_map("m", fleet, size, elements(fleet), **options), Launch):
        running.update({a.task.payload: a for a in only(connect(sched, launch), Assign)})
    return fleet, running


def test_a_failed_element_is_retried_alone_up_to_retries_on_another_replica(sched):
    _, running = start_elements(sched, 3, replicas=2, parallelism=2, retries=2)
    first = running[0]
    # Both replicas have a free slot after the failure: the retry goes to the other one.
    (again,) = only(report(sched, first, Outcome.FAILED, retryable=True, message="flaky 1"), Assign)
    assert again.task.payload == 0 and again.replica_id != first.replica_id
    (third,) = only(report(sched, again, Outcome.FAILED, retryable=True, message="flaky 2"), Assign)
    assert third.task.payload == 0 and third.replica_id == first.replica_id
    report(sched, running[1], outputs=b"1")
    report(sched, running[2], outputs=b"2")
    effects = report(sched, third, outputs=b"0")
    job = sched.maps["m"]
    assert effects[-1] == Finished("m") and job.phase is Phase.SUCCEEDED
    assert job.outputs == [b"0", b"1", b"2"] and job.retried == 2 and job.failed == 0
    # Only the failed element ran again.
    assert (third.task.user_failures, third.task.leases) == (2, 3)
    assert running[1].task.leases == running[2].task.leases == 1


def test_a_retried_element_runs_where_it_failed_when_no_other_replica_is_free(sched):
    _, running = start_elements(sched, 1, retries=1)
    (again,) = only(report(sched, running[0], Outcome.FAILED, retryable=True, message="flaky"), Assign)
    assert again.replica_id == running[0].replica_id


def test_an_element_that_keeps_failing_fails_after_retries_and_the_map_with_it(sched):
    _, running = start_elements(sched, 1, retries=1)
    (again,) = only(report(sched, running[0], Outcome.FAILED, retryable=True, message="flaky"), Assign)
    effects = report(sched, again, Outcome.FAILED, retryable=True, message="still flaky")
    job = sched.maps["m"]
    assert effects[-1] == Finished("m")
    assert job.phase is Phase.RETRYABLE_FAILED and "still flaky" in job.message and job.retried == 1


def test_a_non_recoverable_user_error_is_not_retried_as_in_flyte(sched):
    _, running = start_elements(sched, 1, retries=3)
    effects = report(sched, running[0], Outcome.FAILED, retryable=False, message="ValueError: bad input")
    assert only(effects, Assign) == [] and effects[-1] == Finished("m")
    assert sched.maps["m"].phase is Phase.FAILED and sched.maps["m"].retried == 0


def test_system_failures_use_their_own_budget_not_the_tasks_retries(clock):
    sched = make_scheduler(clock, max_leases=3)
    _, running = start_elements(sched, 1, retries=0)
    assign = running[0]
    # retries=0, yet a lost executor and a system error are retried (max_leases system failures in all).
    (assign,) = only(report(sched, assign, Outcome.LOST, message="executor killed"), Assign)
    (assign,) = only(report(sched, assign, Outcome.FAILED, retryable=True, system_error=True, message="sys"), Assign)
    effects = report(sched, assign, Outcome.LOST, message="executor killed again")
    job = sched.maps["m"]
    assert effects[-1] == Finished("m") and job.phase is Phase.RETRYABLE_FAILED
    assert "lost 3 times" in job.message and assign.task.user_failures == 0


def test_a_user_retry_does_not_spend_the_system_budget(clock):
    sched = make_scheduler(clock, max_leases=2)
    _, running = start_elements(sched, 1, retries=2)
    (assign,) = only(report(sched, running[0], Outcome.FAILED, retryable=True, message="user"), Assign)
    (assign,) = only(report(sched, assign, Outcome.LOST, message="lost once"), Assign)
    (assign,) = only(report(sched, assign, Outcome.FAILED, retryable=True, message="user again"), Assign)
    report(sched, assign, outputs=b"ok")
    assert sched.maps["m"].phase is Phase.SUCCEEDED
    assert (assign.task.user_failures, assign.task.system_failures) == (2, 1)


def test_a_timed_out_element_is_retried_within_retries(clock):
    sched = make_scheduler(clock, lease_grace=0)
    fleet = fleet_spec()
    (launch,) = only(sched.submit_map("m", fleet, 1, elements(fleet, timeout=10), retries=1), Launch)
    (assign,) = only(connect(sched, launch), Assign)
    clock.now = 10
    effects = sched.tick()
    assert only(effects, CancelLease) and sched.maps["m"].phase is Phase.RUNNING
    assert sched.maps["m"].retried == 1


def test_min_successes_wins_over_the_ratio_and_failed_elements_are_none(sched):
    _, running = start_elements(sched, 4, parallelism=4, min_successes=2)
    report(sched, running[0], Outcome.FAILED, message="bad 0")
    report(sched, running[1], outputs=b"1")
    report(sched, running[2], Outcome.FAILED, message="bad 2")
    effects = report(sched, running[3], outputs=b"3")
    job = sched.maps["m"]
    assert effects[-1] == Finished("m") and job.phase is Phase.SUCCEEDED
    assert job.outputs == [None, b"1", None, b"3"]


def test_a_map_fails_once_min_successes_cannot_be_reached(sched):
    _, running = start_elements(sched, 3, parallelism=3, min_successes=2)
    report(sched, running[0], Outcome.FAILED, message="bad 0")
    effects = report(sched, running[1], Outcome.FAILED, message="bad 1")
    job = sched.maps["m"]
    assert effects[-1] == Finished("m") and job.phase is Phase.FAILED
    assert "min_successes=2" in job.message and only(effects, CancelLease)


def test_min_successes_above_the_size_fails_the_map_at_once_naming_both(sched):
    fleet = fleet_spec()
    effects = sched.submit_map("m", fleet, 2, elements(fleet), min_successes=3)
    assert effects[-1] == Finished("m")
    assert sched.maps["m"].phase is Phase.FAILED and "min_successes=3" in sched.maps["m"].message


def test_concurrency_zero_means_as_many_as_the_fleet_runs_with_a_bounded_window(sched):
    fleet = fleet_spec(replica_count=2, parallelism=3)
    launches = only(sched.submit_map("m", fleet, 100_000, elements(fleet), concurrency=0), Launch)
    assert len(launches) == 2  # the fleet scales to its full size
    job = sched.maps["m"]
    window = 2 * 3 * scheduler_module.MAP_WINDOW_PER_SLOT
    assert len(job.in_flight) == window  # not 100,000 task states
    running = []
    for launch in launches:
        running += only(connect(sched, launch), Assign)
    assert len(running) == 6
    done = 0
    while running:
        assign = running.pop()
        running += only(report(sched, assign, outputs=b""), Assign)
        # Elements that finish at once make the map very quick: its window grows to QUICK_MAP_WINDOW_PER_SLOT.
        assert len(job.in_flight) <= 2 * 3 * scheduler_module.QUICK_MAP_WINDOW_PER_SLOT
        done += 1
        if done == 500:
            break
    assert job.very_quick and len(job.in_flight) > window
    assert job.succeeded == 500 and job.next_index == 500 + len(job.in_flight)


@pytest.mark.parametrize("seconds, payload, per_slot", [
    (0.01, 100, "QUICK_MAP_WINDOW_PER_SLOT"),
    (0.01, scheduler_module.QUICK_WINDOW_ELEMENT_BYTES + 1, "MAP_WINDOW_PER_SLOT"),  # the window is held in memory
    (0.5, 100, "MAP_WINDOW_PER_SLOT"),
    (5.0, 100, "MAP_WINDOW_PER_SLOT"),
])
def test_a_maps_window_is_deeper_only_while_its_elements_take_milliseconds(clock, seconds, payload, per_slot):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=1, parallelism=1)

    def make(i):
        return TaskRequest(key=f"m[{i}]", fleet=fleet, payload=bytes(payload))

    (launch,) = only(sched.submit_map("m", fleet, 1000, make, concurrency=0), Launch)
    running = only(connect(sched, launch), Assign)
    for _ in range(20):
        clock.now += seconds
        running = running[1:] + only(report(sched, running[0], outputs=b""), Assign)
    assert len(sched.maps["m"].in_flight) == getattr(scheduler_module, per_slot)


def test_recovered_elements_are_not_run_again(sched):
    fleet = fleet_spec(parallelism=4)
    (launch,) = only(sched.submit_map("m", fleet, 4, elements(fleet), recovered={0, 2}), Launch)
    running = {a.task.payload: a for a in only(connect(sched, launch), Assign)}
    assert sorted(running) == [1, 3]
    report(sched, running[1], outputs=b"1")
    effects = report(sched, running[3], outputs=b"3")
    job = sched.maps["m"]
    assert effects[-1] == Finished("m") and job.phase is Phase.SUCCEEDED
    assert job.outputs == [scheduler_module.IN_PREFIX, b"1", scheduler_module.IN_PREFIX, b"3"]


def test_a_map_all_of_whose_elements_were_recovered_succeeds_at_once(sched):
    fleet = fleet_spec()
    assert sched.submit_map("m", fleet, 2, elements(fleet), recovered={0, 1})[-1] == Finished("m")
    assert sched.maps["m"].phase is Phase.SUCCEEDED


def test_element_outputs_past_the_memory_budget_are_left_in_the_prefix(clock):
    sched = make_scheduler(clock, map_inline_budget=5)
    _, running = start_elements(sched, 3, parallelism=3)
    report(sched, running[0], outputs=b"abc")
    report(sched, running[1], outputs=b"defg")  # 3 + 4 > 5
    report(sched, running[2], outputs=None, outputs_size=10)  # sent by size only
    assert sched.maps["m"].outputs == [b"abc", scheduler_module.IN_PREFIX, scheduler_module.IN_PREFIX]


def test_element_outputs_past_the_memory_budget_are_read_from_their_group_file(clock):
    sched = make_scheduler(clock, map_inline_budget=5)
    _, running = start_elements(sched, 3, parallelism=3)
    report(sched, running[0], outputs=b"abc", stored_at="s3://b/m/_actor/elements/0-1.pb")  # within the budget
    report(sched, running[1], outputs=b"defg", stored_at="s3://b/m/_actor/elements/0-1.pb")
    report(sched, running[2], outputs=b"hijk")  # stored in its own prefix (a replica before groups)
    assert sched.maps["m"].outputs == [b"abc", "s3://b/m/_actor/elements/0-1.pb", scheduler_module.IN_PREFIX]


def test_outputs_over_the_cap_fail_the_task_naming_the_cap_and_the_setting(clock):
    sched = make_scheduler(clock, max_output_bytes=100)
    assign = start_one(sched, fleet_spec())
    report(sched, assign, outputs=None, outputs_size=101)
    task = sched.tasks["t1"]
    assert task.phase is Phase.FAILED
    assert "101 bytes" in task.message and "100 bytes" in task.message and "--max-output-bytes" in task.message


# ------------------------------------------------------------------------------------ reconciliation and reconnects


def test_a_lease_the_replica_never_received_is_leased_again_when_it_reconnects(sched):
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1")
    lost = assigned(connect(sched, launch))["t1"]  # the Assignment is lost on the way
    sched.stream_lost(launch.replica_id)

    effects = sched.replica_connected(launch.replica_id, launch.token, fleet.key, capacity=1, running=[])
    (again,) = only(effects, Assign)
    assert (again.replica_id, again.task.key) == (launch.replica_id, "t1") and again.lease_id != lost.lease_id
    assert sched.replicas[launch.replica_id].leases == {again.lease_id}
    assert lost.lease_id not in sched.leases


def test_a_reconnecting_replica_keeps_the_leases_it_lists_and_drops_the_ones_we_no_longer_hold(sched):
    fleet = fleet_spec(replica_count=1, parallelism=2)
    (launch,) = submit_all(sched, fleet, "t1", "t2")
    leases = assigned(sched.replica_connected(launch.replica_id, launch.token, fleet.key, capacity=2))
    sched.stream_lost(launch.replica_id)
    sched.cancel("t2")  # its Cancel cannot reach the replica now

    effects = sched.replica_connected(launch.replica_id, launch.token, fleet.key, capacity=2,
                                      running=[leases["t1"].lease_id, "old|gone"])
    assert only(effects, Assign) == []
    assert sched.replicas[launch.replica_id].leases == {leases["t1"].lease_id}
    assert sched.abandoned_leases(launch.replica_id, [leases["t1"].lease_id, "old|gone"]) == ["old|gone"]
    assert sched.tasks["t1"].phase is Phase.RUNNING and sched.tasks["t2"].phase is Phase.ABORTED


def test_a_lease_missing_from_heartbeats_for_the_ghost_grace_is_leased_again_and_the_stream_closed(clock):
    sched = make_scheduler(clock, ghost_grace=5)
    fleet = fleet_spec(replica_count=2, ttl_seconds=600)
    a, b = submit_all(sched, fleet, "t1", "t2")
    ghost = assigned(connect(sched, a))["t1"]
    report(sched, assigned(connect(sched, b))["t2"])  # b is free

    clock.now = 1.0  # sent before the Assignment arrived: not yet a ghost
    assert sched.heartbeat(a.replica_id, []) == []
    clock.now = 5.5
    assert sched.heartbeat(a.replica_id, []) == []
    clock.now = 6.0
    effects = sched.heartbeat(a.replica_id, [])
    assert effects[0] == Disconnect(a.replica_id, f"leases {[ghost.lease_id]} never reached it")
    (again,) = only(effects, Assign)
    assert (again.replica_id, again.task.key) == (b.replica_id, "t1")  # not the replica whose stream lost it
    assert sched.replicas[a.replica_id].state is ReplicaState.DISCONNECTED
    assert sched.replicas[a.replica_id].leases == set()


def test_a_listed_lease_is_not_a_ghost(clock):
    sched = make_scheduler(clock, ghost_grace=5)
    assign = start_one(sched, fleet_spec(ttl_seconds=600))
    for now in (1.0, 6.0, 11.0, 16.0):
        clock.now = now
        assert sched.heartbeat(assign.replica_id, [assign.lease_id]) == []
    clock.now = 17.0  # an old worker that lists nothing is trusted
    assert sched.heartbeat(assign.replica_id) == []
    assert sched.tasks["t1"].lease_id == assign.lease_id


def test_a_heartbeat_listing_a_lease_we_no_longer_hold_cancels_it_on_the_replica(sched):
    assign = start_one(sched, fleet_spec())
    report(sched, assign)
    effects = sched.heartbeat(assign.replica_id, [assign.lease_id])
    assert effects == [CancelLease(assign.replica_id, assign.lease_id, "the agent does not hold this lease")]


def test_a_replica_whose_stream_dropped_keeps_its_leases_for_the_reconnect_grace(clock):
    sched = make_scheduler(clock, reconnect_grace=10)
    fleet = fleet_spec(ttl_seconds=600)
    (launch,) = submit_all(sched, fleet, "t1", "t2")
    assign = assigned(connect(sched, launch))["t1"]

    assert sched.stream_lost(launch.replica_id) == []  # no replacement, no re-lease
    assert sched.replicas[launch.replica_id].state is ReplicaState.DISCONNECTED
    assert sched.next_deadline() == 10.0
    clock.now = 9.0
    assert sched.tick() == []
    assert sched.replica_connected(launch.replica_id, launch.token, fleet.key, capacity=1,
                                   running=[assign.lease_id]) == []
    assert sched.replicas[launch.replica_id].state is ReplicaState.READY
    effects = report(sched, assign)
    assert [a.task.key for a in only(effects, Assign)] == ["t2"]
    assert sched.tasks["t1"].phase is Phase.SUCCEEDED and sched.tasks["t1"].leases == 1


def test_a_replica_that_does_not_reconnect_within_the_grace_is_stopped_and_its_tasks_leased_again(clock):
    sched = make_scheduler(clock, reconnect_grace=10)
    fleet = fleet_spec(ttl_seconds=600)
    assign = start_one(sched, fleet)
    sched.stream_lost(assign.replica_id)
    clock.now = 10.0
    effects = sched.tick()
    assert effects[0] == Stop(assign.replica_id, "did not reconnect")
    (replacement,) = only(effects, Launch)
    assert sched.tasks["t1"].phase is Phase.QUEUED
    assert assigned(connect(sched, replacement))["t1"].lease_id != assign.lease_id
    with pytest.raises(ReplicaRefused):
        sched.replica_connected(assign.replica_id, "token1", fleet.key, capacity=1)


def test_a_stream_of_a_replica_being_stopped_ends_it_at_once(sched):
    assign = start_one(sched, fleet_spec())
    sched.stop_replica(assign.replica_id, "ttl")
    effects = sched.stream_lost(assign.replica_id)
    assert assign.replica_id not in sched.replicas
    assert sched.tasks["t1"].phase is Phase.QUEUED and only(effects, Launch)


@pytest.mark.parametrize("reason", [ExitReason.KILLED, ExitReason.DELETED])
def test_starts_ended_by_a_signal_are_retried_without_failing_anything(clock, reason):
    sched = make_scheduler(clock, start_failure_limit=2, killed_start_limit=5)
    fleet = fleet_spec()
    (launch,) = submit_all(sched, fleet, "t1")
    for _ in range(5):
        (launch,) = only(sched.replica_gone(launch.replica_id, ReplicaExit(reason, "killed by signal 9")), Launch)
    assert sched.tasks["t1"].phase is Phase.QUEUED
    assert only(sched.submit(request("t2", fleet)), Finished) == []  # the environment is not poisoned
    assert assigned(connect(sched, launch))["t1"].replica_id == launch.replica_id


def test_a_replica_killed_on_every_start_fails_the_queue_after_the_killed_start_limit(clock):
    sched = make_scheduler(clock, start_failure_limit=2, killed_start_limit=3)
    (launch,) = submit_all(sched, fleet_spec(), "t1")
    killed = ReplicaExit(ExitReason.KILLED, "replica process was killed by signal 9")
    for _ in range(4):
        (launch,) = only(sched.replica_gone(launch.replica_id, killed), Launch)
    assert sched.replica_gone(launch.replica_id, killed) == [Finished("t1")]
    assert sched.tasks["t1"].phase is Phase.FAILED and "killed by signal 9" in sched.tasks["t1"].message


# ------------------------------------------------------------------------------------------- queued leases (prefetch)


def connect_queueing(sched: Scheduler, launch: Launch, queue_depth: int) -> list:
    return sched.replica_connected(launch.replica_id, launch.token, launch.fleet.key,
                                   capacity=launch.fleet.parallelism, queue_depth=queue_depth)


def test_a_quick_maps_elements_are_queued_on_replicas_that_queue_them_up_to_their_queue_depth(clock):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=2)
    launches = only(sched.submit_map("m", fleet, 40, elements(fleet)), Launch)
    first = assigned(connect_queueing(sched, launches[0], queue_depth=3))
    assert list(first) == ["m[0]"], "no element has finished yet: the map is not known to be quick"
    clock.now = 0.05
    effects = report(sched, first["m[0]"], outputs=b"0")
    # Quick (0.05 s an element): the free slot takes one, the queue three more, and nothing beyond.
    assert sorted(assigned(effects)) == ["m[1]", "m[2]", "m[3]", "m[4]"]
    replica = sched.replicas[launches[0].replica_id]
    assert len(replica.leases) == replica.capacity + 3
    second = assigned(connect_queueing(sched, launches[1], queue_depth=3))
    assert len(second) == 4 and len(sched.replicas[launches[1].replica_id].leases) == 4


def test_elements_of_a_slow_map_tasks_not_known_quick_and_replicas_that_do_not_queue_get_no_queued_lease(clock):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=1)
    (launch,) = only(sched.submit_map("m", fleet, 10, elements(fleet)), Launch)
    (assign,) = only(connect_queueing(sched, launch, queue_depth=3), Assign)
    clock.now = scheduler_module.PREFETCH_BELOW_SECONDS + 1
    (assign,) = only(report(sched, assign, outputs=b"0"), Assign)  # slow: one element at a time
    assert sched.maps["m"].element_seconds > scheduler_module.PREFETCH_BELOW_SECONDS

    plain = fleet_spec(name="plain")
    (launch,) = submit_all(sched, plain, "t1", "t2", "t3")
    assert list(assigned(connect_queueing(sched, launch, queue_depth=3))) == ["t1"]

    old = fleet_spec(name="old")
    (launch,) = only(sched.submit_map("o", old, 10, elements(old, "o")), Launch)
    (assign,) = only(connect_queueing(sched, launch, queue_depth=0), Assign)
    clock.now += 0.01
    assert len(only(report(sched, assign, outputs=b"0"), Assign)) == 1, "a replica that did not say queue_depth"


def named(key: str, fleet: FleetConfig, name: str = "noop") -> TaskRequest:
    return TaskRequest(key=key, fleet=fleet, payload=f"payload of {key}", name=name)


def test_tasks_of_a_task_that_finishes_quickly_are_queued_beyond_free_slots_and_topped_up_when_half_empty(clock):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=1)
    depth = scheduler_module.TASK_PREFETCH_PER_SLOT
    (launch,) = only(sched.submit(named("t0", fleet)), Launch)
    for i in range(1, 30):
        assert not assigned(sched.submit(named(f"t{i}", fleet)))
    (first,) = only(connect_queueing(sched, launch, queue_depth=31), Assign)
    assert first.task.key == "t0", "how long noop takes is not known yet: one lease per free slot"
    clock.now = 0.01
    leased = assigned(report(sched, first, outputs=b""))
    assert sorted(leased, key=lambda k: int(k[1:])) == [f"t{i}" for i in range(1, 2 + depth)], \
        "known quick: the free slot and TASK_PREFETCH_PER_SLOT queued (not the replica's 31)"
    replica = sched.replicas[launch.replica_id]
    order = sorted(leased.values(), key=lambda a: int(a.task.key[1:]))
    for done in order[:depth // 2]:
        assert not assigned(report(sched, done, outputs=b"")), "not topped up before its queue is half empty"
    left = depth + 1 - (depth // 2 + 1)
    refill = assigned(report(sched, order[depth // 2], outputs=b""))
    assert len(refill) == depth + 1 - left and len(replica.leases) == depth + 1, "half empty: filled up at once"


def test_tasks_of_a_slow_task_wait_for_a_free_slot_and_finished_tasks_are_remembered_by_name_up_to_a_bound(clock):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=1)
    (launch,) = only(sched.submit(named("s0", fleet, name="slow")), Launch)
    for i in range(1, 5):
        sched.submit(named(f"s{i}", fleet, name="slow"))
    (first,) = only(connect_queueing(sched, launch, queue_depth=31), Assign)
    clock.now = scheduler_module.VERY_QUICK_SECONDS
    assert list(assigned(report(sched, first, outputs=b""))) == ["s1"], "a task that takes 0.25 s is not queued"
    state = sched.fleets[fleet.key]
    assert not state.very_quick("slow") and not state.very_quick("never-ran")
    for i in range(scheduler_module.TASK_SECONDS_KEPT + 10):
        state.task_finished(f"other-{i}", 0.001)
    assert len(state.task_seconds) == scheduler_module.TASK_SECONDS_KEPT
    assert state.very_quick(f"other-{scheduler_module.TASK_SECONDS_KEPT + 9}") and "slow" not in state.task_seconds


def test_the_queue_a_replica_asks_for_is_capped_per_slot(clock):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=1, parallelism=2)
    (launch,) = only(sched.submit_map("m", fleet, 100, elements(fleet)), Launch)
    connect_queueing(sched, launch, queue_depth=1000)
    assert sched.replicas[launch.replica_id].queue_depth == 2 * scheduler_module.PREFETCH_PER_SLOT


def test_a_replica_that_reports_nothing_while_tasks_wait_in_its_queue_has_them_recalled_to_run_elsewhere(clock):
    sched = make_scheduler(clock)
    fleet = fleet_spec(replica_count=2)
    launches = [launch for i in range(30) for launch in only(sched.submit(named(f"t{i}", fleet)), Launch)]
    assert len(launches) == 2
    (first,) = only(connect_queueing(sched, launches[0], queue_depth=31), Assign)
    a = sched.replicas[first.replica_id]
    clock.now = 0.01
    on_a = assigned(report(sched, first, outputs=b""))  # noop is quick now: a free slot and a queue on a
    on_b = assigned(connect_queueing(sched, launches[1], queue_depth=31))
    b = sched.replicas[launches[1].replica_id]
    assert len(on_a) == len(on_b) == 1 + scheduler_module.TASK_PREFETCH_PER_SLOT
    assert sched.next_deadline() == 0.01 + scheduler_module.RECALL_AFTER_SECONDS, "timed from the first leases"
    clock.now = 1.0  # b works through its queue; a's running task takes long
    on_b.update(assigned(report(sched, on_b.pop(min(on_b, key=lambda k: int(k[1:]))), outputs=b"")))
    assert sched.next_deadline() == 0.01 + scheduler_module.RECALL_AFTER_SECONDS, "a's recall is timed"
    clock.now = 0.01 + scheduler_module.RECALL_AFTER_SECONDS
    effects = sched.tick()
    (recall,) = only(effects, scheduler_module.Recall)
    assert recall.replica_id == a.id and "reported no result for 2.0s" in recall.reason
    assert a.recalled and not b.recalled and not only(sched.tick(), scheduler_module.Recall), "recalled once"

    # a gives back what it had queued (its running task, the oldest lease, stays): none of it goes back to a,
    # nor does anything else while it reports no result.
    running, *queued = sorted(on_a.values(), key=lambda e: int(e.task.key[1:]))
    again = {}
    for lease in queued:
        again.update(assigned(report(sched, lease, Outcome.CANCELLED, message="recalled by the agent")))
        assert all(e.replica_id == b.id for e in again.values()), "a recalled lease went back to the busy replica"
    assert [sched.tasks[lease.task.key].given_back for lease in queued] == [1] * len(queued)
    on_b.update(again)
    while on_b:  # b runs everything else, the recalled tasks and those never leased
        lease = on_b.pop(min(on_b, key=lambda k: int(k[1:])))
        for key, e in assigned(report(sched, lease, outputs=b"")).items():
            assert e.replica_id == b.id, f"{key} was queued on a while it reports nothing"
            on_b[key] = e
    assert all(sched.tasks[f"t{i}"].phase is Phase.SUCCEEDED for i in range(30) if f"t{i}" != running.task.key)

    clock.now = 5.0
    report(sched, running, outputs=b"")
    more = [e for i in range(30, 50) for e in only(sched.submit(named(f"t{i}", fleet)), Assign)]
    assert not a.recalled and any(e.replica_id == a.id for e in more), "a reported: it takes tasks again"
