"""``@actor_cache``: keep a function's results in the replica process, from task to task.

    @actor_cache
    def load_model(path: str) -> Model:
        return Model.load(path)      # runs once per replica for each path

Replicas drop the user's modules between tasks, so the decorated function is created anew by each task; the
store therefore lives here, in this module (which is never dropped), keyed by the function's module, qualified
name and arguments. Arguments are keyed by value (see :func:`_key_of`), so a dataclass or an object of the
user's own class that the next task makes anew, after the re-import, finds the entry. Each function keeps at most
``maxsize`` results, least recently used out first: 128 unless set by ``@actor_cache(maxsize=...)`` or the
replica environment variable ``FLYTE_ACTOR_CACHE_MAXSIZE``. It is safe to use from threads, and two threads asking
for the same missing value compute it once.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import sys
import sysconfig
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
    try:
        return tuple(_key_of(a) for a in args), tuple(sorted((k, _key_of(v)) for k, v in kwargs.items()))
    except _Unkeyable as e:
        raise TypeError(
            f"@actor_cache on {func.__qualname__}: cannot key argument {e.args[0]}. Pass hashable values, "
            "containers of them, dataclasses or instances of your own classes, or give the class __hash__ and "
            "__eq__."
        ) from None


class _Unkeyable(Exception):
    """A value that has neither a hash nor a structure to key it by."""


def _key_of(value: Any, path: Tuple[int, ...] = ()) -> Hashable:
    """A key for ``value`` that equal values share, within a task and across tasks.

    A replica re-imports the user's modules for every task, so an object made by an earlier task is an instance of
    an earlier copy of its class: classes from the user's code are keyed by their module, qualified name and
    fields, never by identity. Lists, dicts and sets are keyed by their contents at call time. FlyteFile and
    FlyteDirectory are keyed by where they come from, not by the per-task local copy. Hashable values of other
    classes (the standard library's, installed packages') are their own key."""
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile

    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if id(value) in path:
        raise _Unkeyable(f"{_describe(value)}: it contains itself")
    path = path + (id(value),)
    cls = type(value)
    if isinstance(value, (FlyteFile, FlyteDirectory)):
        return (cls.__name__, str(value.remote_source or value.path))
    if isinstance(value, enum.Enum):
        return ("enum", cls.__module__, cls.__qualname__, value.name)
    if isinstance(value, type):
        return ("class", value.__module__, value.__qualname__)
    if isinstance(value, (tuple, list)):
        items = tuple(_key_of(v, path) for v in value)
        return items if cls is tuple else (cls.__module__, cls.__qualname__, items)
    if isinstance(value, (set, frozenset)):
        return (cls.__qualname__, frozenset(_key_of(v, path) for v in value))
    if isinstance(value, dict):
        return (cls.__qualname__, frozenset((_key_of(k, path), _key_of(v, path)) for k, v in value.items()))
    if dataclasses.is_dataclass(value):
        fields = tuple((f.name, _key_of(getattr(value, f.name), path)) for f in dataclasses.fields(value) if f.compare)
        return ("dataclass", cls.__module__, cls.__qualname__, fields)
    if _from_user_code(cls) and not (cls.__eq__ is not object.__eq__ and cls.__hash__ is not None):
        # The user's own class without its own notion of equality: its fields are its identity.
        return ("object", cls.__module__, cls.__qualname__, tuple(
            (name, _key_of(field, path)) for name, field in sorted(_fields(value).items())))
    try:
        hash(value)
    except TypeError:
        raise _Unkeyable(f"{_describe(value)}: it is not hashable") from None
    return value


def _fields(value: Any) -> Dict[str, Any]:
    fields = dict(getattr(value, "__dict__", {}))
    for cls in type(value).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                fields[name] = getattr(value, name)
    return fields


def _from_user_code(cls: type) -> bool:
    """Whether ``cls`` comes from the user's code (which replicas re-import), not the standard library or an
    installed package (whose classes keep their identity)."""
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__module__ == "__main__"
    module = sys.modules.get(cls.__module__)
    if module is None:
        return True  # its module was dropped since: that happens to user modules only
    path = getattr(module, "__file__", None)
    return bool(path) and not os.path.abspath(path).startswith(_library_roots())


@functools.lru_cache(maxsize=1)
def _library_roots() -> Tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))}
    return tuple(os.path.abspath(r) + os.sep for r in roots)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:77] + '...'} (a {type(value).__module__}.{type(value).__qualname__})"
