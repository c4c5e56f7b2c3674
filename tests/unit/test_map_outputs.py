"""Actor-map data in the blob store (``flyte_actor_agent.outputs``): the streamed outputs.pb equals the map's
outputs built in memory, element outputs are read back from the prefix, and finished elements of earlier attempts
are found from the blob store alone."""

from __future__ import annotations

import os

import pytest
from flyteidl.core import literals_pb2

from flyte_actor_agent import outputs as blob
from flyte_actor_agent.connector import gather_map_outputs
from flyte_actor_agent.scheduler import IN_PREFIX
from flytekitplugins.actor.protocol import element_groups


def element(**values) -> bytes:
    return literals_pb2.LiteralMap(literals={
        k: literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(string_value=v)))
        for k, v in values.items()
    }).SerializeToString()


def put(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_streamed_map_outputs_equal_the_in_memory_ones(tmp_path):
    elements = [element(a=str(i) * (i * 300), b=f"b{i}") if i % 3 else None for i in range(40)]
    target = tmp_path / "outputs.pb"
    size = blob.write_map_outputs(["a", "b"], iter(elements), str(target))
    written = literals_pb2.LiteralMap.FromString(target.read_bytes())
    assert size == target.stat().st_size
    assert written == gather_map_outputs(["a", "b"], elements).to_flyte_idl()


def test_a_map_without_outputs_writes_an_empty_literal_map(tmp_path):
    target = tmp_path / "outputs.pb"
    assert blob.write_map_outputs([], iter([b"", b""]), str(target)) == 0
    assert literals_pb2.LiteralMap.FromString(target.read_bytes()) == literals_pb2.LiteralMap()


def test_element_outputs_not_held_are_read_from_their_prefix_or_an_earlier_attempt(tmp_path):
    prefix, earlier = str(tmp_path / "data" / "1"), str(tmp_path / "data" / "0")
    put(f"{prefix}/1/outputs.pb", element(a="from the prefix"))
    put(f"{earlier}/2/outputs.pb", element(a="from attempt 0"))
    held = [element(a="held"), IN_PREFIX, IN_PREFIX, None]
    read = list(blob.element_outputs(held, prefix, {2: f"{earlier}/2/outputs.pb"}))
    assert read == [element(a="held"), element(a="from the prefix"), element(a="from attempt 0"), None]


def test_element_outputs_in_groups_are_read_once_per_group(tmp_path):
    prefix = str(tmp_path / "data" / "1")
    groups = f"{prefix}/{element_groups.GROUP_DIR}"
    put(f"{groups}/0-2.pb", element_groups.pack([(i, element(a=f"g{i}")) for i in range(3)]))
    put(f"{groups}/5.pb", element_groups.pack([(5, element(a="g5"))]))
    reads = []

    def reader(uri):
        reads.append(uri)
        return blob.read(uri)

    # Held in memory, in a group the scheduler named, in a group the connector found after a restart, failed.
    held = [element(a="held"), f"{groups}/0-2.pb", f"{groups}/0-2.pb", None, None, IN_PREFIX]
    read = list(blob.element_outputs(held, prefix, {5: f"{groups}/5.pb"}, reader))
    assert read == [element(a="held"), element(a="g1"), element(a="g2"), None, None, element(a="g5")]
    assert sorted(reads) == [f"{groups}/0-2.pb", f"{groups}/5.pb"], "a group was read once per element"
    with pytest.raises(ValueError, match="element 4 is not in"):
        list(blob.element_outputs([None] * 4 + [f"{groups}/4.pb"], prefix, {}, lambda uri: blob.read(f"{groups}/0-2.pb")))


@pytest.mark.parametrize("reported", [
    "/etc/passwd",  # anything the agent can read
    "{other}/_actor/elements/0.pb",  # another map's group
    "{groups}/1-2.pb",  # this map's, but not listing the element
    "{groups}/../../0/outputs.pb",
    "{groups}/sub/0.pb",
])
def test_a_reported_group_outside_the_maps_own_groups_is_never_read(tmp_path, reported):
    prefix, other = str(tmp_path / "data" / "1"), str(tmp_path / "other")
    groups = f"{prefix}/{element_groups.GROUP_DIR}"
    reads = []
    uri = reported.format(groups=groups, other=other)
    with pytest.raises(ValueError, match="not one of this map's element groups"):
        list(blob.element_outputs([uri], prefix, {}, lambda u: reads.append(u) or b""))
    assert reads == []


def test_publishing_writes_outputs_pb_and_answers_inline_only_when_small(tmp_path, monkeypatch):
    prefix = str(tmp_path / "map")
    held = [element(a="x" * 100), element(a="y")]
    inline = blob.publish_map_outputs(["a"], held, prefix, {})
    on_disk = (tmp_path / "map" / "outputs.pb").read_bytes()
    assert inline == on_disk and literals_pb2.LiteralMap.FromString(on_disk).literals["a"].collection.literals
    monkeypatch.setattr(blob, "INLINE_RESULT_BYTES", 10)
    assert blob.publish_map_outputs(["a"], held, prefix, {}) is None
    monkeypatch.undo()
    # Small in bytes but many elements: only in outputs.pb (converting that many literals for GetTask takes seconds).
    many = [element(a="") for _ in range(blob.INLINE_RESULT_ELEMENTS + 1)]
    assert blob.publish_map_outputs(["a"], many, prefix, {}) is None
    assert blob.publish_map_outputs(["a"], many[:-1], prefix, {}) is not None


def test_finished_elements_are_those_with_outputs_pb_directly_under_the_prefix(tmp_path):
    prefix = tmp_path / "data" / "0"
    put(str(prefix / "0" / "outputs.pb"), b"")
    put(str(prefix / "1" / "error.pb"), b"")
    put(str(prefix / "12" / "outputs.pb"), b"")
    put(str(prefix / "12" / "o0_offloaded_metadata.pb"), b"")
    put(str(prefix / "outputs.pb"), b"")  # the map's own
    put(str(prefix / "inputs" / "3" / "outputs.pb"), b"")  # not an element
    assert blob.finished_elements(str(prefix)) == {0: str(prefix / "0" / "outputs.pb"),
                                                   12: str(prefix / "12" / "outputs.pb")}
    assert blob.finished_elements(str(tmp_path / "nothing")) == {}


def test_finished_elements_include_those_stored_in_groups(tmp_path):
    prefix = tmp_path / "data" / "0"
    groups = prefix / "_actor" / "elements"
    put(str(prefix / "4" / "outputs.pb"), b"")  # too large for a group, or from a replica before groups
    put(str(groups / "0-2_5.pb"), b"")
    put(str(groups / "7.pb"), b"")
    put(str(groups / "8.pb.123.partial"), b"")  # a write in progress
    put(str(groups / "notes.txt"), b"")
    found = blob.finished_elements(str(prefix))
    assert found == {0: str(groups / "0-2_5.pb"), 1: str(groups / "0-2_5.pb"), 2: str(groups / "0-2_5.pb"),
                     4: str(prefix / "4" / "outputs.pb"), 5: str(groups / "0-2_5.pb"), 7: str(groups / "7.pb")}


def test_recovery_looks_at_earlier_attempts_newest_first(tmp_path):
    data = tmp_path / "n0" / "data"
    put(str(data / "0" / "0" / "outputs.pb"), b"")
    put(str(data / "0" / "1" / "outputs.pb"), b"")
    put(str(data / "1" / "1" / "outputs.pb"), b"")
    put(str(data / "1" / "9" / "outputs.pb"), b"")  # past the map's size
    put(str(data / "0" / "_actor" / "elements" / "2-3_9.pb"), b"")
    recovered = blob.recover_elements(str(data / "2"), 2, size=5)
    assert recovered == {0: str(data / "0" / "0" / "outputs.pb"), 1: str(data / "1" / "1" / "outputs.pb"),
                         2: str(data / "0" / "_actor" / "elements" / "2-3_9.pb"),
                         3: str(data / "0" / "_actor" / "elements" / "2-3_9.pb")}


@pytest.mark.parametrize("prefix, attempt", [("s3://b/x/data/3", 2), ("s3://b/x/data/0", 0), ("/x/y", 1)])
def test_no_earlier_attempts_unless_the_prefix_ends_with_the_attempt(prefix, attempt):
    assert blob.earlier_attempts(prefix, attempt) == []


def test_earlier_attempts_are_the_siblings_propeller_names_by_attempt():
    assert blob.earlier_attempts("s3://b/x/n0/data/2/", 2) == ["s3://b/x/n0/data/1", "s3://b/x/n0/data/0"]


def test_map_inputs_load_an_offloaded_list_and_offload_a_large_bound_input_once(tmp_path):
    from flytekit.models.types import LiteralType, SimpleType

    from flyte_actor_agent.connector import OFFLOAD_LITERAL_BYTES, MapElements

    def integer(v):
        return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=v)))

    mapped = literals_pb2.Literal(collection=literals_pb2.LiteralCollection(literals=[integer(i) for i in range(3)]))
    put(str(tmp_path / "up" / "xs.pb"), mapped.SerializeToString())
    big = "b" * (OFFLOAD_LITERAL_BYTES + 1)
    inputs = literals_pb2.LiteralMap(literals={
        "x": literals_pb2.Literal(offloaded_metadata=literals_pb2.LiteralOffloadedMetadata(
            uri=str(tmp_path / "up" / "xs.pb"), size_bytes=mapped.ByteSize())),
        "model": literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(string_value=big))),
    })
    prefix = str(tmp_path / "map")
    elements = MapElements.prepare(inputs, None, ["x"], ["model"], prefix,
                                   {"model": LiteralType(simple=SimpleType.STRING)})
    assert elements.size == 3
    second = literals_pb2.LiteralMap.FromString(elements.inputs(1))
    assert second.literals["x"] == integer(1)
    reference = second.literals["model"].offloaded_metadata
    assert reference.uri == f"{prefix}/inputs/model.pb" and reference.inferred_type.simple == 3  # STRING
    stored = literals_pb2.Literal.FromString((tmp_path / "map" / "inputs" / "model.pb").read_bytes())
    assert stored.scalar.primitive.string_value == big
    assert len(elements.inputs(2)) < 1024  # no element carries the large input itself
