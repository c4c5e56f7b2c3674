"""``@actor_cache`` keys that survive a replica's per-task re-import of the user's modules.

Each test writes a user module to a temporary directory, imports it, drops it from ``sys.modules`` (as
``worker/sandbox.py`` does between tasks) and imports it again: the second copy's classes are new class objects,
and arguments made from them must find the entries the first copy stored.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from flytekitplugins.actor.cache import store

USER_MODULE = '''
import dataclasses
import enum
from typing import List, Optional

from flytekitplugins.actor import actor_cache

CALLS = []


@dataclasses.dataclass
class Config:                       # eq=True and not frozen: Python makes it unhashable
    path: str
    layers: List[int]
    note: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Frozen:
    path: str
    inner: Optional["Frozen"] = None


class Plain:                        # no __eq__ or __hash__ at all
    def __init__(self, path, scale):
        self.path, self.scale = path, scale


class Slotted:
    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


class ByScale:                      # the user's own equality: only ``scale`` counts
    def __init__(self, scale, note=""):
        self.scale, self.note = scale, note

    def __eq__(self, other):
        return type(other).__qualname__ == "ByScale" and other.scale == self.scale

    def __hash__(self):
        return hash(self.scale)


@actor_cache
def load(*args, **kwargs):
    CALLS.append((args, kwargs))
    return object()
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Returns a function that imports the user module afresh, as a replica does for each task."""
    (tmp_path / "cache_user_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    store.clear()

    def fresh():
        sys.modules.pop("cache_user_models", None)
        return importlib.import_module("cache_user_models")

    yield fresh
    sys.modules.pop("cache_user_models", None)
    store.clear()


@pytest.mark.parametrize("make", [
    lambda m: m.Config("s3://m", [1, 2], note="task 1"),
    lambda m: m.Frozen("s3://m", inner=m.Frozen("s3://inner")),
    lambda m: m.Plain("s3://m", 2),
    lambda m: m.Slotted("s3://m"),
    lambda m: m.Mode.FAST,
    lambda m: m.Config,
    lambda m: {"config": m.Config("s3://m", [1]), "modes": (m.Mode.FAST, m.Mode.EXACT)},
], ids=["dataclass", "frozen-dataclass", "plain-class", "slots", "enum", "the-class-itself", "nested"])
def test_user_objects_made_by_the_next_task_find_the_entry(user_module, make):
    first = user_module()
    entry = first.load(make(first))
    second = user_module()
    assert second.load is not first.load and second.Config is not first.Config
    assert second.load(make(second)) is entry
    assert len(first.CALLS) == 1 and second.CALLS == []


def test_different_field_values_and_different_classes_are_different_keys(user_module):
    m = user_module()
    a = m.load(m.Config("s3://m", [1, 2]))
    assert m.load(m.Config("s3://m", [1, 2], note="ignored: compare=False")) is a
    assert m.load(m.Config("s3://m", [1, 3])) is not a
    assert m.load(m.Plain("s3://m", 2)) is not m.load(m.Plain("s3://m", 3))
    assert m.load(m.Mode.FAST) is not m.load(m.Mode.EXACT)
    assert m.load(m.Slotted("s3://m")) is not m.load(m.Frozen("s3://m"))


def test_a_class_with_its_own_equality_is_keyed_by_it(user_module):
    """``__eq__``/``__hash__`` written by the user decide (examples/custom_hashable.py): here ``note`` is not part
    of the identity, so objects differing only by it share the entry, across the re-import too."""
    first = user_module()
    entry = first.load(first.ByScale(10, note="a"))
    assert first.load(first.ByScale(10, note="b")) is entry
    second = user_module()
    assert second.load(second.ByScale(10, note="c")) is entry
    assert second.load(second.ByScale(11)) is not entry


def test_an_object_that_contains_itself_is_refused_with_the_value_named(user_module):
    m = user_module()
    loop = m.Plain("s3://m", 1)
    loop.scale = loop
    with pytest.raises(TypeError) as error:
        m.load(loop)
    assert "contains itself" in str(error.value) and "Plain" in str(error.value)
