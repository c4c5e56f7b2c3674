"""``@actor_cache`` on real replicas: a dataclass and a plain object of the user's module, rebuilt by each task
after the replica re-imported the module, find the entry the previous task stored."""

import pytest

import cache_tasks as ct
from harness import LocalFleet, output

pytestmark = pytest.mark.timeout(300)


def test_dataclass_and_plain_object_arguments_hit_across_tasks():
    fleet = LocalFleet()
    try:
        first = output(fleet.run(ct.model_id, path="s3://models/a"))
        assert output(fleet.run(ct.model_id, path="s3://models/a")) == first, "the entry was missed after the reset"
        other = output(fleet.run(ct.model_id, path="s3://models/b"))
        assert other != first and other.split()[1] == first.split()[1]  # a new entry, on the same replica
    finally:
        fleet.stop()
