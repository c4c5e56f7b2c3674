"""Element group files (protocol/element_groups.py): the names both ends agree on, and the bytes inside."""

import pytest

from flytekitplugins.actor.protocol import element_groups as groups


@pytest.mark.parametrize("indices, name", [
    ([7], "7.pb"),
    ([3, 4, 5, 6, 7, 8, 9, 12], "3-9_12.pb"),
    ([12, 3, 5, 4], "3-5_12.pb"),  # any order, as sorted
    ([0, 2, 4], "0_2_4.pb"),
    ([99, 100, 101, 5000], "99-101_5000.pb"),
])
def test_a_group_is_named_by_its_indices_and_the_name_gives_them_back(indices, name):
    assert groups.name_of(indices) == name
    assert groups.indices_of(name) == sorted(indices)


@pytest.mark.parametrize("name", ["outputs.pb", "3-9_12", "3-9_12.pb.41.partial", "9-3.pb", "-1.pb", "3__4.pb",
                                  "a.pb", ".pb", "3-4-5.pb"])
def test_names_that_are_not_groups_are_refused(name):
    with pytest.raises(ValueError, match="not the name of an element group file"):
        groups.indices_of(name)


def test_a_group_keeps_each_elements_outputs_byte_for_byte():
    elements = [(5, b"\n\x05five"), (2, b""), (900_000, b"x" * 1000)]
    assert groups.unpack(groups.pack(elements)) == dict(elements)


def test_groups_whose_names_would_be_too_long_are_split():
    scattered = [(i * 2, b"o") for i in range(200)]  # no two consecutive: a long name
    parts = groups.split(scattered)
    assert len(parts) > 1
    assert all(len(groups.name_of(i for i, _ in part)) - len(groups.SUFFIX) <= groups.MAX_NAME_CHARS for part in parts)
    assert sorted(e for part in parts for e in part) == scattered, "an element was lost or duplicated"
    consecutive = [(i, b"o") for i in range(10_000)]
    assert groups.split(consecutive) == [consecutive], "one range fits any number of elements"
