"""Unit tests of ``@actor_cache`` (``flytekitplugins.actor.cache``).

Covered: one computation per distinct arguments, how positional and keyword arguments are keyed, custom hashable
arguments, containers keyed by their contents, helpful errors for values with no hash and no structure, the LRU bound (``maxsize`` and ``FLYTE_ACTOR_CACHE_MAXSIZE``),
one computation when many threads ask at once, entries that outlive a re-import of the user's module, and
FlyteFile/FlyteDirectory arguments keyed by where they come from.
"""

from __future__ import annotations

import threading
import types
from typing import List

import pytest
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.models.core.types import BlobType
from flytekit.models.literals import Blob, BlobMetadata, Literal, Scalar
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from flytekitplugins.actor import actor_cache
from flytekitplugins.actor.cache import store


@pytest.fixture(autouse=True)
def empty_store():
    store.clear()
    yield
    store.clear()


def cached_counter(name: str = "compute", **cache_kwargs):
    """A cached function named ``name`` (its module and name key its entries) and the list of its real calls."""
    calls: List = []

    def compute(*args, **kwargs):
        calls.append((args, kwargs))
        return {"args": args, "kwargs": kwargs}

    compute.__qualname__ = compute.__name__ = name
    return actor_cache(compute, **cache_kwargs), calls


class Point:
    """A user class made hashable by value."""

    def __init__(self, x: int, y: int):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self):
        return hash((self.x, self.y))


class ByValueNoHash:
    """Defines __eq__ but not __hash__, so Python makes it unhashable."""

    def __eq__(self, other):
        return isinstance(other, ByValueNoHash)


def test_computes_once_per_distinct_arguments():
    f, calls = cached_counter()
    first = f("model-a")
    assert f("model-a") is first
    f("model-b")
    assert f("model-b") is f("model-b")
    assert [args for args, _ in calls] == [("model-a",), ("model-b",)]
    assert (store.hits, store.misses) == (3, 2)


def test_keyword_order_does_not_matter_but_positional_and_keyword_are_distinct_keys():
    f, calls = cached_counter()
    assert f(a=1, b=2) is f(b=2, a=1)
    assert len(calls) == 1
    # Like functools.lru_cache, f(1) and f(a=1) are different keys; each is computed once.
    assert f(1) is f(1)
    assert f(a=1) is f(a=1)
    assert len(calls) == 3


def test_custom_hashable_arguments_share_entries_by_value():
    f, calls = cached_counter()
    assert f(Point(1, 2)) is f(Point(1, 2))
    f(Point(2, 1))
    assert len(calls) == 2


@pytest.mark.parametrize("make", [lambda: [1, 2], lambda: {"a": 1}, lambda: {1, 2}, lambda: (1, [2]),
                                  ByValueNoHash], ids=["list", "dict", "set", "nested-list", "eq-without-hash"])
def test_unhashable_arguments_are_keyed_by_their_contents_at_call_time(make):
    f, calls = cached_counter()
    assert f(make()) is f(make())
    assert f(arg=make()) is f(arg=make())
    assert len(calls) == 2


def test_a_list_changed_after_the_call_does_not_change_the_entry():
    f, calls = cached_counter()
    shards = [1, 2]
    first = f(shards)
    shards.append(3)
    assert f(shards) is not first and f([1, 2]) is first
    assert len(calls) == 2


@pytest.mark.parametrize("value", [bytearray(b"weights"), (1, bytearray(b"x"))], ids=["bytearray", "nested"])
def test_arguments_with_no_hash_and_no_structure_raise_a_helpful_type_error(value):
    f, calls = cached_counter()
    with pytest.raises(TypeError) as error:
        f(value)
    message = str(error.value)
    assert "bytearray" in message and "not hashable" in message and "__hash__" in message and f.__qualname__ in message
    assert calls == []


def test_the_least_recently_used_entry_is_evicted_past_maxsize():
    f, calls = cached_counter(maxsize=2)
    f(1)
    f(2)
    f(1)  # 2 is now the least recently used
    f(3)
    assert len(store) == 2
    f(1)
    assert [args for args, _ in calls] == [(1,), (2,), (3,)]
    f(2)
    assert [args for args, _ in calls] == [(1,), (2,), (3,), (2,)]


def test_maxsize_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLYTE_ACTOR_CACHE_MAXSIZE", "1")
    f, calls = cached_counter()
    f("a")
    f("b")
    f("a")
    assert [args for args, _ in calls] == [("a",), ("b",), ("a",)]
    assert len(store) == 1


def test_a_small_maxsize_on_one_function_does_not_evict_another_functions_entries():
    """``maxsize`` is an argument of one decorated function, so it should bound that function's entries only."""
    load_model, model_calls = cached_counter("load_model")
    tokenize, _ = cached_counter("tokenize", maxsize=1)
    load_model("weights.bin")
    tokenize("hello")
    tokenize("world")
    load_model("weights.bin")
    assert len(model_calls) == 1, "tokenize(maxsize=1) evicted load_model's entry"


def test_threads_asking_for_the_same_key_compute_it_once():
    threads_count = 8
    barrier = threading.Barrier(threads_count)
    lock = threading.Lock()
    computed = []

    @actor_cache
    def load(name):
        with lock:
            computed.append(name)
        return object()

    results = [None] * threads_count
    errors = []

    def worker(i):
        try:
            barrier.wait()
            results[i] = load("model")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert computed == ["model"]
    assert all(result is results[0] for result in results)


USER_MODULE = """
from flytekitplugins.actor import actor_cache

CALLS = []


@actor_cache
def load(path):
    CALLS.append(path)
    return ["model loaded from", path]
"""


def import_user_module():
    """A fresh copy of a user module, as a replica gets each time it re-imports the task's code."""
    module = types.ModuleType("user_models")
    exec(compile(USER_MODULE, "user_models.py", "exec"), module.__dict__)
    return module


def test_entries_survive_a_reimport_of_the_users_module():
    first = import_user_module()
    model = first.load("s3://bucket/model")
    second = import_user_module()
    assert second.load is not first.load
    assert second.load("s3://bucket/model") is model
    assert (first.CALLS, second.CALLS) == (["s3://bucket/model"], [])


def task_input_file(uri: str) -> FlyteFile:
    """A FlyteFile as a task receives it: a fresh local path for each task, the blob's URI as remote_source."""
    blob_type = BlobType(format="", dimensionality=BlobType.BlobDimensionality.SINGLE)
    literal = Literal(scalar=Scalar(blob=Blob(metadata=BlobMetadata(type=blob_type), uri=uri)))
    return TypeEngine.to_python_value(FlyteContextManager.current_context(), literal, FlyteFile)


def test_flyte_file_inputs_are_keyed_by_their_remote_source():
    f, calls = cached_counter()
    first, second = task_input_file("s3://bucket/model.bin"), task_input_file("s3://bucket/model.bin")
    assert first.path != second.path
    assert first.remote_source == second.remote_source == "s3://bucket/model.bin"
    assert f(first) is f(second)
    f(task_input_file("s3://bucket/other.bin"))
    assert len(calls) == 2


def test_local_flyte_files_and_directories_are_keyed_by_path_and_type():
    f, calls = cached_counter()
    assert f(FlyteFile("/data/model.bin")) is f(FlyteFile("/data/model.bin"))
    assert f(FlyteDirectory("/data/shards")) is f(FlyteDirectory("/data/shards"))
    f(FlyteDirectory("/data/model.bin"))  # same path, other type
    assert len(calls) == 3
