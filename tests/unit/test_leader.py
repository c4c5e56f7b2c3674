"""The leader-election state machine (``flyte_actor_agent.leader``) over a fake Lease store that enforces
resourceVersion like the API server, and a clock the test moves: one leader at a time, takeover only after the
lease duration on the taker's own clock, fencing before anyone can take over, release on shutdown."""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import List, Optional

import pytest

from flyte_actor_agent.leader import Conflict, LeaderElector, LeaseRecord


class FakeStore:
    """One Lease with resourceVersion checks; ``down`` makes every call fail as an unreachable API server."""

    def __init__(self) -> None:
        self.record: Optional[LeaseRecord] = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("api server unreachable")

    def get(self) -> Optional[LeaseRecord]:
        self._check()
        return self.record

    def create(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.record is not None:
            raise Conflict("exists")
        return self._store(record)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.record is None or record.resource_version != self.record.resource_version:
            raise Conflict("resourceVersion changed")
        return self._store(record)

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        return self.record


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Pod:
    def __init__(self, store: FakeStore, name: str, clock: Clock, wall_skew: float = 0.0):
        self.events: List[str] = []
        base = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        self.elector = LeaderElector(
            store, name, on_elected=lambda: self.events.append("elected"), on_lost=lambda: self.events.append("lost"),
            clock=clock, wall_clock=lambda: base + datetime.timedelta(seconds=clock.now + wall_skew),
            lease_duration=10, renew_deadline=7, retry_period=2)


@pytest.fixture
def setup():
    store, clock = FakeStore(), Clock()
    return store, clock, Pod(store, "a", clock), Pod(store, "b", clock)


def test_the_first_pod_leads_and_the_second_waits_while_the_leader_renews(setup):
    store, clock, a, b = setup
    assert a.elector.step() and a.events == ["elected"]
    for _ in range(20):
        clock.now += 2
        assert a.elector.step()
        assert not b.elector.step()
    assert store.record.holder == "a" and b.events == [] and a.events == ["elected"]


def test_a_dead_leader_is_replaced_after_the_lease_duration_on_the_standbys_clock(setup):
    store, clock, a, b = setup
    a.elector.step()
    assert not b.elector.step()  # b first sees a's record now
    clock.now += 9.9
    assert not b.elector.step(), "took over before the lease duration passed"
    clock.now += 0.2
    assert b.elector.step() and b.events == ["elected"]
    assert store.record.holder == "b" and store.record.transitions == 1


def test_a_leaders_wall_clock_far_ahead_does_not_keep_its_lease_alive(setup):
    store, clock, _, b = setup
    skewed = Pod(store, "a", clock, wall_skew=3600)
    skewed.elector.step()
    b.elector.step()
    clock.now += 10.5
    assert b.elector.step(), "a renewTime in the future must not matter: only change on the standby's clock does"


def test_a_leader_that_cannot_renew_is_fenced_before_anyone_may_take_over(setup):
    store, clock, a, b = setup
    a.elector.step()
    b.elector.step()
    store.down = True
    fenced_at = None
    while fenced_at is None:
        clock.now += 1
        a.elector.step()
        if "lost" in a.events:
            fenced_at = clock.now
    store.down = False
    assert fenced_at < 10, "the leader acted past the point where a standby may take over"
    while not b.elector.step():
        clock.now += 1
    assert clock.now >= 10 and a.events == ["elected", "lost"] and not a.elector.leading


def test_of_two_pods_racing_for_an_expired_lease_only_one_wins(setup):
    store, clock, a, b = setup
    c = Pod(store, "c", clock)
    c.elector.step()
    a.elector.step(), b.elector.step()
    clock.now += 11
    # Both read the expired record, then both write: the second write carries a stale resourceVersion.
    record = store.get()
    assert a.elector._try_acquire_or_renew(clock.now)
    original_get = store.get
    store.get = lambda: record
    try:
        assert not b.elector.step()
    finally:
        store.get = original_get
    assert store.record.holder == "a" and b.events == []


def test_release_hands_over_at_the_standbys_next_try(setup):
    store, clock, a, b = setup
    a.elector.step()
    b.elector.step()
    a.elector.release()
    assert store.record.holder == ""
    clock.now += 2
    assert b.elector.step(), "a released lease must be taken at once, not after the lease duration"
    assert a.events == ["elected"], "releasing is not losing"


def test_a_leader_keeps_leading_through_one_failed_renewal(setup):
    store, clock, a, _ = setup
    a.elector.step()
    store.down = True
    clock.now += 2
    assert a.elector.step(), "one failed try is not a lost lease"
    store.down = False
    clock.now += 2
    assert a.elector.step() and a.events == ["elected"]


def test_inconsistent_timings_are_refused():
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        LeaderElector(FakeStore(), "a", lambda: None, lambda: None, lease_duration=5, renew_deadline=7)


# --------------------------------------------------------------------------------------------- server wiring


def test_serve_flags_for_several_pods_parse_and_a_bad_boolean_is_refused(capsys):
    from flyte_actor_agent.server import parse_args

    args = parse_args(["serve", "--leader-election", "true", "--identity", "agent-1", "--task-records", "false"])
    assert (args.leader_election, args.identity, args.task_records) == (True, "agent-1", False)
    assert parse_args(["serve"]).task_records is True and parse_args(["serve"]).leader_election is False
    with pytest.raises(SystemExit):
        parse_args(["serve", "--leader-election", "maybe"])
    assert "'maybe' is not a boolean" in capsys.readouterr().err


def test_a_standby_refuses_connector_calls_as_unavailable():
    import asyncio
    import threading

    import grpc
    from flyteidl.admin import agent_pb2

    from flyte_actor_agent.server import ActorAgentService

    class Aborted(Exception):
        pass

    class Context:
        async def abort(self, code, details):
            raise Aborted(code, details)

    leading = threading.Event()
    service = ActorAgentService(leading)
    request = agent_pb2.GetTaskRequest(task_category=agent_pb2.TaskCategory(name="actor"), resource_meta=b"{}")
    with pytest.raises(Aborted) as refused:
        asyncio.run(service.GetTask(request, Context()))
    assert refused.value.args[0] is grpc.StatusCode.UNAVAILABLE and "standby" in refused.value.args[1]
    leading.set()
    other = agent_pb2.GetTaskRequest(task_category=agent_pb2.TaskCategory(name="sensor"))
    with pytest.raises(Aborted) as not_ours:
        asyncio.run(service.GetTask(other, Context()))
    assert not_ours.value.args[0] is grpc.StatusCode.NOT_FOUND, "once leading, only the task-type check applies"
