"""``@actor_cache``: keep a function's results in the replica process, from task to task.

    @actor_cache
    def load_model(path: str) -> Model:
        return Model.load(path)      # runs once per replica for each path

Replicas drop the user's modules between tasks, so the decorated function is created anew by each task; the
store therefore lives here, in this module (which is never dropped), keyed by the function's module, qualified
name and arguments. Each function keeps at most ``maxsize`` results, least recently used out first: 128 unless
set by ``@actor_cache(maxsize=...)`` or the replica environment variable ``FLYTE_ACTOR_CACHE_MAXSIZE``. It is
safe to use from threads, and two threads asking for the same missing value compute it once.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

DEFAULT_MAXSIZE = 128

_MISSING = object()


class _Store:
    """The results of every decorated function of this process, one least-recently-used map per function."""

    def __init__(self):
        self._lock = threading.RLock()
        self._functions: Dict[Hashable, "OrderedDict[Hashable, Any]"] = {}
        self._key_locks: Dict[Tuple[Hashable, Hashable], threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def default_maxsize(self) -> int:
        return int(os.environ.get("FLYTE_ACTOR_CACHE_MAXSIZE", DEFAULT_MAXSIZE))

    def get_or_compute(self, function: Hashable, key: Hashable, compute: Callable[[], Any], maxsize: int) -> Any:
        with self._lock:
            value = self._lookup(function, key)
            if value is not _MISSING:
                return value
            key_lock = self._key_locks.setdefault((function, key), threading.Lock())
        with key_lock:
            try:
                with self._lock:
                    value = self._lookup(function, key)
                    if value is not _MISSING:
                        return value
                    self.misses += 1
                value = compute()
                with self._lock:
                    entries = self._functions.setdefault(function, OrderedDict())
                    entries[key] = value
                    while len(entries) > maxsize:
                        entries.popitem(last=False)
                return value
            finally:
                with self._lock:
                    self._key_locks.pop((function, key), None)

    def _lookup(self, function: Hashable, key: Hashable) -> Any:
        entries = self._functions.get(function)
        value = _MISSING if entries is None else entries.get(key, _MISSING)
        if value is not _MISSING:
            entries.move_to_end(key)
            self.hits += 1
        return value

    def clear(self) -> None:
        with self._lock:
            self._functions.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._functions.values())


store = _Store()


def actor_cache(fn: Optional[Callable] = None, *, maxsize: Optional[int] = None):
    """Cache ``fn``'s results for the life of the replica process (see the module docstring)."""
    if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1):
        raise ValueError(f"actor_cache maxsize={maxsize!r} is invalid: use a positive integer.")

    def decorate(func: Callable) -> Callable:
        identity = (func.__module__, func.__qualname__)

        @functools.wraps(func)
        def cached(*args, **kwargs):
            return store.get_or_compute(
                identity,
                _freeze(args, kwargs, func),
                lambda: func(*args, **kwargs),
                maxsize if maxsize is not None else store.default_maxsize(),
            )

        cached.cache_clear = store.clear  # type: ignore[attr-defined]
        return cached

    if fn is not None:
        return decorate(fn)
    return decorate


def _freeze(args: Tuple, kwargs: dict, func: Callable) -> Hashable:
    frozen = tuple(_key_of(a, func) for a in args), tuple(sorted((k, _key_of(v, func)) for k, v in kwargs.items()))
    try:
        hash(frozen)
    except TypeError as e:
        raise TypeError(
            f"@actor_cache on {func.__qualname__}: an argument is not hashable ({e}). Pass hashable values "
            "(tuples instead of lists, frozensets instead of sets) or give the argument's class __hash__ and __eq__."
        ) from None
    return frozen


def _key_of(value: Any, func: Callable) -> Hashable:
    """FlyteFile and FlyteDirectory are keyed by where they come from, not by the (per task) local copy."""
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile

    if isinstance(value, (FlyteFile, FlyteDirectory)):
        return (type(value).__name__, str(value.remote_source or value.path))
    if isinstance(value, (list, dict, set)):
        raise TypeError(
            f"@actor_cache on {func.__qualname__}: argument {value!r} is a {type(value).__name__}, which is not "
            "hashable. Pass a tuple, frozenset or another hashable value instead."
        )
    return value
