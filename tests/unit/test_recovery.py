"""Restart without loss, in the pure core and the resource meta: a rebuilt task or map takes back what adopted
replicas still run or already finished, never runs a stored element again, and a meta of another schema version
or that does not parse decodes into a clear problem instead of an error."""

from __future__ import annotations

import json

import pytest
from flytekit import FlyteContextManager
from flytekit.models.literals import Literal, LiteralMap, Primitive, Scalar

from flytekitplugins.actor import ActorEnvironment
from flytekitplugins.actor.local import local_template
from flyte_actor_agent.connector import ActorMetadata
from flyte_actor_agent.recovery import META_VERSION, TaskRecord, TaskRecords, record_uri
from flyte_actor_agent.scheduler import (
    IN_PREFIX,
    Ack,
    CancelLease,
    Launch,
    Outcome,
    Phase,
    element_key,
)
from test_scheduler import (  # noqa: F401 - fixtures and helpers
    assigned,
    clock,
    connect,
    fleet_spec,
    make_scheduler,
    only,
    request,
)


LEASE_KEY = b"k" * 32


@pytest.fixture
def sched(clock):  # noqa: F811 - the scheduler of test_scheduler, with the key the previous agent signed with
    return make_scheduler(clock, lease_key=LEASE_KEY)


def map_elements(fleet, key="m"):
    from flyte_actor_agent.scheduler import TaskRequest

    return lambda i: TaskRequest(key=element_key(key, i), fleet=fleet, payload=i, name=f"{key}[{i}]")


def adopted(sched, fleet, replica_id="old", capacity=4):
    sched.adopt_replica(replica_id, "tok", fleet)
    return replica_id


def lease_of(key, replica="old", n="x"):
    """A lease id an earlier agent with the same signing key issued to ``replica`` for ``key``."""
    from flyte_actor_agent.lease_ids import LeaseIds

    return LeaseIds(LEASE_KEY).issue(n, replica, key)


# ------------------------------------------------------------------------------------------------------- tasks


def test_a_rebuilt_task_nobody_runs_is_queued_once(sched):
    fleet = fleet_spec()
    effects = sched.resume(request("t1", fleet))
    assert sched.tasks["t1"].phase is Phase.QUEUED and sched.tasks["t1"].payload == "payload of t1"
    assert len(effects) == 1  # its replica's launch
    assert sched.resume(request("t1", fleet)) == [], "a second rebuild (a second GetTask) queued it again"


def test_a_rebuilt_task_whose_outputs_are_stored_succeeds_without_running(sched):
    effects = sched.resume(request("t1", fleet_spec()), stored_outputs=b"outs")
    task = sched.tasks["t1"]
    assert (task.phase, task.outputs) == (Phase.SUCCEEDED, b"outs")
    assert not sched.leases and "env-v1" not in sched.fleets, "nothing was queued or launched"
    assert [type(e).__name__ for e in effects] == ["Finished"]


def test_a_task_an_adopted_replica_runs_gets_its_payload_back_and_is_queued_again_if_then_lost(sched):
    fleet = fleet_spec()
    replica = adopted(sched, fleet)
    sched.replica_connected(replica, "tok", fleet.key, 1, [lease_of("t1")])
    assert sched.tasks["t1"].phase is Phase.RUNNING and sched.tasks["t1"].payload is None
    assert sched.resume(request("t1", fleet)) == []
    assert sched.tasks["t1"].payload == "payload of t1", "the rebuilt payload was not attached"
    from flyte_actor_agent.scheduler import ExitReason, ReplicaExit

    sched.replica_gone(replica, ReplicaExit(ExitReason.STREAM_CLOSED, "gone"))
    assert sched.tasks["t1"].phase is Phase.QUEUED, "a lost rebuilt task must be leased again, not failed"


def test_a_result_an_adopted_replica_kept_for_the_previous_agent_completes_the_task(sched):
    fleet = fleet_spec()
    replica = adopted(sched, fleet)
    sched.replica_connected(replica, "tok", fleet.key, 1, [])
    effects = sched.report(replica, lease_of("t1"), Outcome.SUCCEEDED, outputs=b"done")
    assert Ack(replica, lease_of("t1")) in effects
    assert (sched.tasks["t1"].phase, sched.tasks["t1"].outputs) == (Phase.SUCCEEDED, b"done")
    assert sched.resume(request("t1", fleet)) == [], "a finished task was queued again"
    assert sched.tasks["t1"].phase is Phase.SUCCEEDED


def test_delete_of_an_unknown_task_leaves_a_tombstone_that_refuses_its_lease(sched):
    fleet = fleet_spec()
    sched.tombstone("t1", "aborted")
    assert sched.tasks["t1"].phase is Phase.ABORTED
    replica = adopted(sched, fleet)
    sched.replica_connected(replica, "tok", fleet.key, 1, [lease_of("t1")])
    assert sched.abandoned_leases(replica, [lease_of("t1")]) == [lease_of("t1")]
    assert sched.resume(request("t1", fleet)) == [] and sched.tasks["t1"].phase is Phase.ABORTED


# ------------------------------------------------------------------------------------------------------- maps


def test_a_resumed_map_runs_only_elements_neither_stored_nor_running_on_an_adopted_replica(sched):
    fleet = fleet_spec(replica_count=2, parallelism=2)
    replica = adopted(sched, fleet)
    # Element 3 still runs on an adopted replica; element 4 finished there while no agent listened.
    sched.replica_connected(replica, "tok", fleet.key, 2, [lease_of(element_key("m", 3))])
    sched.report(replica, lease_of(element_key("m", 4)), Outcome.SUCCEEDED, outputs=b"o4")
    effects = sched.resume_map("m", fleet, 6, map_elements(fleet), None, 1.0, done={0, 1})
    job = sched.maps["m"]
    assert job.succeeded == 3 and sorted(job.in_flight) == [2, 3, 5]
    assert job.in_flight[3].payload == 3 and job.in_flight[3].phase is Phase.RUNNING
    started = sorted(a.task.index for a in assigned(effects).values())
    assert started == [2], "only the free slot of the adopted replica takes a new element"
    assert not [k for k in sched.tasks if k.startswith("m/")], "element tasks stayed outside their map"
    # Finishing the adopted element and the rest completes the map with every output in order.
    pending = list(assigned(effects).values())
    pending += list(assigned(sched.report(replica, lease_of(element_key("m", 3)), Outcome.SUCCEEDED,
                                          outputs=b"o3")).values())
    for launch in only(effects, Launch):
        pending += list(assigned(connect(sched, launch)).values())
    while pending:
        a = pending.pop()
        pending += list(assigned(sched.report(a.replica_id, a.lease_id, Outcome.SUCCEEDED,
                                              outputs=f"o{a.task.index}".encode())).values())
    assert job.phase is Phase.SUCCEEDED
    # Stored elements stay in the blob store; the map's outputs are assembled from there.
    assert job.outputs == [IN_PREFIX, IN_PREFIX] + [f"o{i}".encode() for i in range(2, 6)]


def test_a_map_whose_elements_are_all_stored_succeeds_at_once(sched):
    fleet = fleet_spec()
    sched.resume_map("m", fleet, 2, map_elements(fleet), None, 1.0, done={0, 1})
    assert sched.maps["m"].phase is Phase.SUCCEEDED and sched.maps["m"].outputs == [IN_PREFIX, IN_PREFIX]


def test_an_element_lease_of_a_resumed_map_is_stale(sched):
    fleet = fleet_spec()
    sched.resume_map("m", fleet, 2, map_elements(fleet), None, 1.0, done=set())
    replica = adopted(sched, fleet)
    sched.replica_connected(replica, "tok", fleet.key, 1, [lease_of(element_key("m", 1))])
    assert element_key("m", 1) not in sched.tasks
    assert sched.abandoned_leases(replica, [lease_of(element_key("m", 1))]) == [lease_of(element_key("m", 1))]


def test_deleting_an_unknown_map_cancels_the_elements_adopted_replicas_brought_back(sched):
    fleet = fleet_spec()
    replica = adopted(sched, fleet)
    sched.replica_connected(replica, "tok", fleet.key, 1, [lease_of(element_key("m", 0))])
    effects = sched.tombstone("m", "aborted")
    assert only(effects, CancelLease) == [CancelLease(replica, lease_of(element_key("m", 0)), "aborted")]


# ------------------------------------------------------------------------------------------------ resource meta


def test_the_meta_round_trips_and_stays_small_whatever_the_map_size():
    meta = ActorMetadata(key="p/d/" + "e" * 40 + "/n0/3", map_outputs=",".join(f"o{i}" for i in range(20)),
                         optional_outputs=True, record=record_uri("s3://bucket/" + "x" * 300))
    data = meta.encode()
    assert len(data) < 2048
    assert ActorMetadata.decode(data) == meta
    assert json.loads(data)["version"] == META_VERSION


@pytest.mark.parametrize("stored", [{"key": "k"}, {"key": "k", "version": 99}, {"key": "k", "version": "x"}])
def test_a_meta_of_another_version_decodes_into_a_problem_naming_the_version(stored):
    meta = ActorMetadata.decode(json.dumps(stored).encode())
    assert meta.key == "k"
    assert f"schema version {stored.get('version', 1)!r}" in meta.problem
    assert f"reads version {META_VERSION}" in meta.problem


@pytest.mark.parametrize("data", [b"\xff\xfe", b"not json", b"[1, 2]", b'{"version": 2}'])
def test_a_meta_that_does_not_parse_decodes_into_a_problem(data):
    meta = ActorMetadata.decode(data)
    assert meta.key == "" and "does not parse" in meta.problem


# ---------------------------------------------------------------------------------------------- blob store side


def test_done_elements_finds_stored_outputs_and_where_they_are(tmp_path):
    prefix = str(tmp_path / "map")
    for i in (0, 2, 11):
        (tmp_path / "map" / str(i)).mkdir(parents=True)
        (tmp_path / "map" / str(i) / "outputs.pb").write_bytes(f"out{i}".encode())
    (tmp_path / "map" / "3").mkdir()
    (tmp_path / "map" / "3" / "error.pb").write_bytes(b"err")
    (tmp_path / "map" / "_actor" / "elements").mkdir(parents=True)
    (tmp_path / "map" / "_actor" / "elements" / "4-5_12.pb").write_bytes(b"")
    assert TaskRecords().done_elements(prefix, 11) == {
        0: f"{prefix}/0/outputs.pb", 2: f"{prefix}/2/outputs.pb", 4: f"{prefix}/_actor/elements/4-5_12.pb",
        5: f"{prefix}/_actor/elements/4-5_12.pb"}, "indices 11 and 12 are past the map's size"
    assert TaskRecords().done_elements(str(tmp_path / "nothing"), 5) == {}


actor = ActorEnvironment(name="recovery-actor", replica_count=1)


@actor.task
def plus_one(x: int) -> int:
    return x + 1


def test_a_task_record_round_trips_through_the_store(tmp_path):
    template, _ = local_template(plus_one, FlyteContextManager.current_context())
    inputs = LiteralMap({"x": Literal(scalar=Scalar(primitive=Primitive(integer=41)))})
    uri = record_uri(str(tmp_path / "out"))
    TaskRecords().write(uri, TaskRecord(template, str(tmp_path / "out"), inputs, None))
    back = TaskRecords().read(uri)
    assert back.template == template and back.inputs == inputs.to_flyte_idl() and back.output_prefix == str(tmp_path / "out")
    assert back.metadata is None
    with pytest.raises(FileNotFoundError, match="task record .* is missing"):
        TaskRecords().read(record_uri(str(tmp_path / "elsewhere")))
