"""What a replica resets between two tasks, so that one task's state does not leak into the next.

Reset after every task:
  * user modules (not from the standard library or an installed package, editable installs included): either put
    back as they were right after their import (*kept*, see below), or dropped from ``sys.modules`` so that the
    next task imports them afresh. Either way their globals, ``functools.lru_cache`` caches, class attributes and
    mutable default arguments start clean;
  * flytekit's registries of tasks, workflows and launch plans, which those modules added to;
  * ``os.environ``, the working directory and ``sys.path``;
  * the task's temporary directory (``tempfile`` and ``TMPDIR`` point into it while the task runs) and flytekit's
    working directory (downloaded inputs, the engine directory): emptied, not removed, so that a task that wrote
    nothing costs no file system work.

Kept modules. Right after a task's module is imported (before the task runs), the executor asks the sandbox to
snapshot the user modules that import loaded (:meth:`TaskSandbox.snapshot_imports`). A module is kept only when the
sandbox can put every one of its globals back exactly: immutable values, functions (their defaults and closures
checked too), classes (their attributes snapshotted), ``lru_cache`` wrappers (cleared), builtin lists, dicts and
sets of such values (restored in place), and objects of flytekit, the plugin and a few immutable standard types.
Anything else (an instance of a user class, a DataFrame, a lock) and the whole group of modules is dropped and
re-imported, as before. A kept group is also dropped when one of its source files changes (size, mtime, inode), the
task's code root changes, or an environment variable its import read has another value in the next task.

Also put back, ended or run after every task: process-wide state (umask, signal handlers, the socket default
timeout, the recursion limit, logging levels, the C environment, monkeypatches of standard modules and builtins,
``sys.modules`` entries, child processes, atexit handlers): see :class:`ProcessGuard`. A task that leaves a thread
of its own running gets its executor replaced.

Kept: ``@actor_cache`` entries, installed packages a task imported (they stay imported, with their module state;
packages installed in editable mode count as installed), threads and atexit handlers of those packages,
files a task wrote outside its temporary directory.

To reset more between tasks, add a check to :meth:`TaskSandbox.enter` (take the state) and :meth:`TaskSandbox.exit`
(put it back): both run on the fast path and the full path alike.
"""

from __future__ import annotations

import enum
import functools
import io
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import types
from types import ModuleType
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple

from flytekit.core.context_manager import FlyteEntities
from flytekit.core.launch_plan import LaunchPlan

log = logging.getLogger("flyte-actor-executor")

#: Values that cannot change in place.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis), type(NotImplemented))
#: Objects of these packages' classes are library state, kept like the packages themselves; the standard ones
#: listed are immutable.
_LIBRARY_OBJECTS = frozenset({
    "flytekit", "flytekitplugins", "flyteidl", "logging", "typing", "typing_extensions", "re", "pathlib",
    "datetime", "decimal", "fractions", "uuid", "dataclasses", "_abc", "abc", "mashumaro",
})
#: Descriptors and other objects of the interpreter's own types that a class body makes; none holds user state.
_INTERPRETER_TYPES = (
    types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodWrapperType, types.MethodDescriptorType,
    types.ClassMethodDescriptorType, types.GetSetDescriptorType, types.MemberDescriptorType,
)
#: Py_TPFLAGS_HEAPTYPE: set on classes made by a class statement, not on the interpreter's C types.
_HEAP_TYPE = 1 << 9
#: Longest builtin container the sandbox copies to restore it in place; a longer one means a re-import.
_MAX_CONTAINER = 10_000
#: Module attributes the import system owns.
_IMPORT_ATTRIBUTES = frozenset({"__builtins__", "__loader__", "__spec__", "__cached__", "__file__", "__path__"})


def _library_roots() -> List[str]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))}
    return sorted(os.path.realpath(r) + os.sep for r in roots)


@functools.lru_cache(maxsize=None)
def _installed_top_level_names() -> FrozenSet[str]:
    """Top-level packages of installed distributions, editable installs included (they live outside
    site-packages but are libraries all the same). Read once per process (about 0.15 s of CPU: every distribution's
    metadata is parsed); the executors' fork server reads it before forking them, so an executor starts without.
    A package that a task installs at run time (``_F_RUNTIME_PACKAGES``) is then treated as the task's own code:
    re-imported for each task rather than kept, which is slower but never wrong."""
    from importlib import metadata

    return frozenset(metadata.packages_distributions())


class _Unrestorable(Exception):
    """A module holds a value the sandbox cannot put back exactly."""


def _file_stat(path: Optional[str]) -> Optional[Tuple[int, int, int]]:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class _KeptGroup:
    """User modules one import loaded, and how to put each back as it was right after that import."""

    def __init__(self, modules: Dict[str, types.ModuleType], is_library: Callable[[types.ModuleType], bool],
                 code_root: str, env_read: Optional[Dict[str, Optional[str]]]):
        self.modules = modules
        self.code_root = code_root
        #: Environment variables the import read, with their values then; ``None``: it read all of them.
        self.env_read = env_read
        self._is_library = is_library
        self._user_module_ids = {id(m) for m in modules.values()}
        self._seen: Set[int] = set()
        self._dicts: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []  # (live namespace, snapshot)
        self._classes: List[Tuple[type, Dict[str, Any]]] = []
        self._containers: List[Tuple[Any, Any]] = []  # (live container, shallow copy)
        self._functions: List[Tuple[types.FunctionType, Any, Any]] = []  # (function, __defaults__, __kwdefaults__)
        self._caches: List[Any] = []
        self.stats = {name: _file_stat(getattr(m, "__file__", None)) for name, m in modules.items()}
        for module in modules.values():
            snapshot = dict(module.__dict__)
            for key, value in snapshot.items():
                if key not in _IMPORT_ATTRIBUTES:
                    self._take(value)
            self._dicts.append((module.__dict__, snapshot))

    # ------------------------------------------------------------------------------------------- snapshot

    def _take(self, value: Any, depth: int = 0) -> None:
        if isinstance(value, _ATOMS) or id(value) in self._seen:
            return
        if depth > 20:
            raise _Unrestorable("nested too deeply")
        self._seen.add(id(value))
        kind = type(value)
        if kind in (tuple, frozenset):
            for item in value:
                self._take(item, depth + 1)
        elif kind in (list, dict, set, bytearray):
            if len(value) > _MAX_CONTAINER:
                raise _Unrestorable(f"a {kind.__name__} of {len(value)} items")
            for item in (value.items() if kind is dict else value):
                self._take(item, depth + 1)
            self._containers.append((value, value.copy()))
        elif isinstance(value, types.ModuleType):
            if id(value) not in self._user_module_ids and not self._is_library(value):
                raise _Unrestorable(f"module {value.__name__}, imported by an earlier task")
        elif isinstance(value, type):
            self._take_class(value, depth)
        elif isinstance(value, types.FunctionType):
            self._take_function(value, depth)
        elif isinstance(value, functools._lru_cache_wrapper):
            self._caches.append(value)
            self._take(value.__wrapped__, depth + 1)
        elif isinstance(value, (staticmethod, classmethod)):
            self._take(value.__func__, depth + 1)
        elif isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                self._take(accessor, depth + 1)
        elif isinstance(value, types.MethodType):
            self._take(value.__func__, depth + 1)
            self._take(value.__self__, depth + 1)
        elif isinstance(value, (enum.Enum, *_INTERPRETER_TYPES)):
            return
        elif kind.__module__.partition(".")[0] in _LIBRARY_OBJECTS:
            return
        elif self._instance_of_user_class(value):
            self._take_class(kind, depth)
            namespace = vars(value)
            for item in namespace.values():
                self._take(item, depth + 1)
            self._dicts.append((namespace, dict(namespace)))
        else:
            raise _Unrestorable(f"a {kind.__module__}.{kind.__qualname__} object")

    def _instance_of_user_class(self, value: Any) -> bool:
        """An object of a class the group's modules define, whose whole state is its ``__dict__``."""
        kind = type(value)
        return (
            sys.modules.get(kind.__module__) is not None
            and id(sys.modules[kind.__module__]) in self._user_module_ids
            and type(getattr(value, "__dict__", None)) is dict
            # Python classes only (no dict or list subclass, whose state is not in __dict__), without slots.
            and all(base.__flags__ & _HEAP_TYPE and not vars(base).get("__slots__") for base in kind.__mro__[:-1])
        )

    def _take_class(self, cls: type, depth: int) -> None:
        if self._defined_in_library(getattr(cls, "__module__", "")) or issubclass(cls, enum.Enum):
            return
        attributes = dict(vars(cls))
        for key, value in attributes.items():
            if key not in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"):
                self._take(value, depth + 1)
        self._classes.append((cls, attributes))

    def _take_function(self, fn: types.FunctionType, depth: int) -> None:
        if self._defined_in_library(fn.__globals__.get("__name__", "")):
            return  # library code (a decorator's wrapper, say): its closure is the library's state
        self._functions.append((fn, fn.__defaults__, fn.__kwdefaults__))
        for value in (fn.__defaults__ or ()):
            self._take(value, depth + 1)
        for value in (fn.__kwdefaults__ or {}).values():
            self._take(value, depth + 1)
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            self._take(contents, depth + 1)
        for value in vars(fn).values():
            self._take(value, depth + 1)

    def _defined_in_library(self, module_name: str) -> bool:
        module = sys.modules.get(module_name)
        if module is None:
            return module_name == "builtins"
        return id(module) not in self._user_module_ids and self._is_library(module)

    # -------------------------------------------------------------------------------------------- restore

    def intact(self) -> bool:
        """Whether every module of the group is still the one in ``sys.modules``."""
        return all(sys.modules.get(name) is module for name, module in self.modules.items())

    def unchanged_on_disk(self) -> bool:
        return all(_file_stat(getattr(m, "__file__", None)) == self.stats[name] for name, m in self.modules.items())

    def restore(self) -> None:
        for live, snapshot in self._dicts:
            for key in [k for k in live if k not in snapshot]:
                del live[key]
            for key, value in snapshot.items():
                if live.get(key, _Unrestorable) is not value:
                    live[key] = value
        for cls, attributes in self._classes:
            for key in [k for k in vars(cls) if k not in attributes]:
                delattr(cls, key)
            for key, value in attributes.items():
                if key not in ("__dict__", "__weakref__") and vars(cls).get(key, _Unrestorable) is not value:
                    setattr(cls, key, value)
        for live, copy in self._containers:
            if live != copy or type(live) is dict and list(live) != list(copy):
                live.clear()
                if isinstance(live, (list, bytearray)):
                    live.extend(copy)
                else:
                    live.update(copy)
        for fn, defaults, kwdefaults in self._functions:
            if fn.__defaults__ is not defaults:
                fn.__defaults__ = defaults
            if fn.__kwdefaults__ is not kwdefaults:
                fn.__kwdefaults__ = kwdefaults
        for cache in self._caches:
            cache.cache_clear()


class _ModuleNames:
    """The names in ``sys.modules`` at one moment, and which were added since: cheaply when nothing was (an import
    appends to ``sys.modules``, so an unchanged length and last name mean no name was added)."""

    def __init__(self):
        self._before = sys.modules.copy()  # a C-level copy: cheaper than building a set of the names
        self._last = next(reversed(self._before), None)

    def added(self) -> Set[str]:
        if len(sys.modules) == len(self._before) and next(reversed(sys.modules), None) == self._last:
            return set()
        return sys.modules.keys() - self._before.keys()


class _EnvRecorder:
    """Records which environment variables are read while it is active (``os.environ[k]``, ``get``, ``in`` and
    ``os.getenv`` all go through ``__getitem__``; iterating means all of them)."""

    def __init__(self):
        self.keys: Optional[Set[str]] = set()

    def __enter__(self) -> "_EnvRecorder":
        environ_type = type(os.environ)
        self._getitem, self._iter = environ_type.__getitem__, environ_type.__iter__
        recorder, getitem, iterate = self, self._getitem, self._iter

        def __getitem__(env, key):
            if recorder.keys is not None and env is os.environ:
                recorder.keys.add(key)
            return getitem(env, key)

        def __iter__(env):
            if env is os.environ:
                recorder.keys = None
            return iterate(env)

        environ_type.__getitem__, environ_type.__iter__ = __getitem__, __iter__
        return self

    def __exit__(self, *exc) -> None:
        environ_type = type(os.environ)
        environ_type.__getitem__, environ_type.__iter__ = self._getitem, self._iter


class TaskSandbox:
    """Snapshot the process before a task (``enter``) and put it back after (``exit``)."""

    def __init__(self, scratch_root: str):
        self._scratch_root = scratch_root
        self._roots = _library_roots()
        self._installed = _installed_top_level_names()
        self._modules = _ModuleNames()
        self._environ: Dict[bytes, bytes] = {}
        self._cwd = ""
        self._path: List[str] = []
        self._entities = 0
        self._launch_plans: Set[str] = set()
        self._kept: List[_KeptGroup] = []
        self._code_root = ""
        #: The task's temporary directory (``TMPDIR``), the same for every task and emptied after each.
        self.tmpdir = os.path.join(scratch_root, "tmp")
        #: flytekit's working directory for the fast path: inputs, downloads, the engine directory.
        self.workdir = os.path.join(scratch_root, "flytekit")
        #: What ``exit`` did to user modules the last time: "kept", "dropped" or "" (none were loaded).
        self.last_modules = ""
        #: Why the last modules that could not be kept were not (for logs and tests).
        self.not_kept = ""
        self._said: Set[str] = set()
        #: Process-wide state beyond modules (see :class:`ProcessGuard`).
        self.guard = ProcessGuard()
        #: What the last ``exit`` had to put back beyond modules, environment and files (for logs and tests).
        self.restored: List[str] = []
        self._ended: Optional[List[str]] = None

    @property
    def kept_modules(self) -> List[str]:
        return [name for group in self._kept for name in group.modules]

    def enter(self, env: Dict[str, str], code_root: str = "", keep_modules: bool = True) -> None:
        """Take the state to put back; with ``keep_modules`` false, the task imports its modules afresh (the full
        path) and modules kept for earlier tasks are dropped first."""
        self._environ = _environ_snapshot()
        os.environ.update(env)
        self._code_root = code_root
        self._check_kept(keep_modules)
        self._modules = _ModuleNames()
        self._cwd = os.getcwd()
        self._path = list(sys.path)
        self._entities = len(FlyteEntities.entities)
        self._launch_plans = set(LaunchPlan.CACHE)
        os.makedirs(self.tmpdir, exist_ok=True)
        os.environ["TMPDIR"] = self.tmpdir
        tempfile.tempdir = self.tmpdir
        self.guard.take()  # last: what is taken includes the modules kept for this task, and only those

    def snapshot_imports(self, load: Callable[[], Any]) -> Any:
        """Run ``load`` (the resolver importing the task's module) and keep the user modules it imported, if they
        can be put back exactly after the task (see the module docstring)."""
        before = _ModuleNames()
        with _EnvRecorder() as recorder:
            loaded = load()
        fresh = {n: m for n in before.added() if (m := sys.modules.get(n)) is not None and not self._is_library(m)}
        if not fresh:
            return loaded
        env_read = None if recorder.keys is None else {k: os.environ.get(k) for k in recorder.keys}
        try:
            group = _KeptGroup(fresh, self._is_library, self._code_root, env_read)
        except _Unrestorable as e:
            # Dropped at exit, as any module the task imports; said once per set of modules, for whoever wonders
            # why their tasks re-import.
            names = ", ".join(sorted(fresh))
            if names not in self._said:
                self._said.add(names)
                log.info("re-importing %s for every task: it holds %s, which cannot be reset in place", names, e)
            self.not_kept = f"{names}: {e}"
            return loaded
        self._kept.append(group)
        return loaded

    def end_task(self) -> None:
        """End what the task left running (its child processes) and run its atexit handlers: before its result is
        reported, so that whoever gets the result finds them done. The rest of the reset can wait until after."""
        if self._ended is None:
            self._ended = self.guard.before_wipe()

    def exit(self) -> None:
        self.end_task()
        ended, self._ended = self._ended, None
        kept = self._restore_kept()
        dropped = False
        for name in self._modules.added() - kept:
            module = sys.modules.get(name)
            if module is not None and not self._is_library(module):
                del sys.modules[name]
                dropped = True
        self.last_modules = "dropped" if dropped else "kept" if kept else ""
        del FlyteEntities.entities[self._entities :]
        for name in [n for n in LaunchPlan.CACHE if n not in self._launch_plans]:
            del LaunchPlan.CACHE[name]
        _restore_environ(self._environ)
        try:
            os.chdir(self._cwd)
        except OSError:
            pass
        sys.path[:] = self._path
        tempfile.tempdir = None
        _empty(self.tmpdir)
        _empty(self.workdir, keep=_WORKDIR_SKELETON)
        self.restored = ended + self.guard.after_wipe()

    def _check_kept(self, keep_modules: bool) -> None:
        """Drop kept modules that cannot serve this task: changed on disk, another code root, or imported with
        other values of the environment variables they read."""
        for group in list(self._kept):
            stale = (
                not keep_modules
                or not group.intact()
                or group.code_root != self._code_root
                or not group.unchanged_on_disk()
                or group.env_read is None
                or any(os.environ.get(k) != v for k, v in group.env_read.items())
            )
            if stale:
                self._drop(group)

    def _restore_kept(self) -> Set[str]:
        names: Set[str] = set()
        for group in list(self._kept):
            if not group.intact():
                self._drop(group)
                continue
            group.restore()
            names.update(group.modules)
        return names

    def _drop(self, group: _KeptGroup) -> None:
        self._kept.remove(group)
        self.guard.forget_modules(group.modules)  # dropped on purpose: not a deletion to undo
        for name, module in group.modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]

    def _is_library(self, module: types.ModuleType) -> bool:
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.origin in ("built-in", "frozen"):
            return True
        if module.__name__.partition(".")[0] in self._installed:
            return True
        locations = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", None) or [])
        locations = [os.path.realpath(p) for p in locations if isinstance(p, str)]
        if not locations:
            return True  # nothing on disk to re-import from: leave it alone
        return all(any(loc.startswith(root) for root in self._roots) for loc in locations)


def _environ_snapshot() -> Dict[bytes, bytes]:
    # os.environ's own encoded store (shared with os.environb): a C-level dict copy, not a Python loop.
    return os.environ._data.copy()  # noqa: SLF001


def _restore_environ(snapshot: Dict[bytes, bytes]) -> None:
    """Put the environment back through ``os.environb`` (so ``putenv`` and ``unsetenv`` run), touching only the
    variables that changed."""
    current = os.environb
    if current._data == snapshot:  # noqa: SLF001 - same store, compared without decoding
        return
    for key in [k for k in current._data if k not in snapshot]:  # noqa: SLF001
        del current[key]
    for key, value in snapshot.items():
        if current._data.get(key) != value:  # noqa: SLF001
            current[key] = value


#: Directories of the fast path's flytekit working directory that stay between tasks (emptied, not removed:
#: removing a directory costs milliseconds on some file systems).
_WORKDIR_SKELETON = frozenset({"sandbox", "workspace", os.path.join("sandbox", "local_flytekit"),
                               os.path.join("sandbox", "local_flytekit", "engine_dir")})


def _empty(directory: str, keep: frozenset = frozenset(), relative: str = "") -> None:
    """Remove what ``directory`` holds, except the subdirectories named in ``keep`` (which are emptied)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        name = os.path.join(relative, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if name in keep:
                _empty(entry.path, keep, name)
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


# ------------------------------------------------------------------------------ process-wide state of a task


class ProcessGuard:
    """What a task can change in the process beyond its modules, taken before the task and put back after it.

    Each check is a cheap snapshot and compare (see ``docs/reliability.md`` for the cost per task). Put back: the
    umask, signal handlers (set through :func:`signal.signal`), the signal mask, interval timers and alarms, the
    socket default timeout, the recursion limit, ``sys.stdin``, ``stdout`` and ``stderr``, the C-level environment
    (``os.putenv``/``unsetenv`` bypass ``os.environ``), logger levels, ``logging.disable`` and the root logger's
    handlers; functions, classes and modules of standard-library modules and ``builtins`` that the task replaced,
    deleted or added (monkeypatches); modules of ``sys.modules`` that the task replaced or deleted, and modules it
    made by hand. Ended: child processes the task left (the executor is a child subreaper, so daemonized
    grandchildren come back to it and are ended too). Run: ``atexit`` handlers the task's own code registered, at
    the end of the task. Not put back: a thread that the task's own code started (recorded as
    it starts) and that is still running; :attr:`leaked` then says so, and the executor is replaced. Threads that
    libraries start (an I/O loop, a pool's workers) are library state and stay.
    """

    def __init__(self) -> None:
        _become_subreaper()
        _restore_c_environ()  # from now on, differences are a task's doing
        self._watched = 0
        self._watch_stdlib()
        self._modules: Dict[str, ModuleType] = {}
        self._environ_keys: Set[object] = set()
        self._started: List[tuple] = []  # (thread, the module that started it) during the task
        self._umask = 0
        self._signals: Dict[int, object] = {}
        self._signal_mask: Set[int] = set()
        self._settings: tuple = ()
        self._loggers: Dict[str, int] = {}
        self._logging: tuple = ()
        self._exits: List[tuple] = []
        self._originals: tuple = ()
        #: Why the executor must be replaced after the last task ("" when it need not be).
        self.leaked = ""

    # ----------------------------------------------------------------------------------------------- take

    def take(self) -> None:
        import atexit
        import logging
        import signal
        import socket
        import threading

        self.leaked = ""
        self._modules = sys.modules.copy()
        self._started = []
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._signal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        self._settings = (socket.getdefaulttimeout(), sys.getrecursionlimit()) + _sys_hooks()
        manager = logging.Logger.manager
        self._loggers = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
        self._logging = (logging.root.level, manager.disable, list(logging.root.handlers))
        # Signal handlers, atexit handlers and C-level variables are recorded as the task sets them (reading all
        # of them after every task costs more). Set past the module watch: these are not the task's patches.
        self._signals = {}
        self._exits = []
        self._environ_keys = set()
        self._originals = (signal.signal, atexit.register, atexit.unregister, os.putenv, os.unsetenv)
        for module, name, value in self._wrappers():
            ModuleType.__setattr__(module, name, value)
        start = self._thread_start = threading.Thread.start
        started = self._started

        def record_start(thread, *args, **kwargs):
            started.append((thread, sys._getframe(1).f_globals.get("__name__", "")))
            return start(thread, *args, **kwargs)

        threading.Thread.start = record_start

    def _wrappers(self) -> List[tuple]:
        import atexit
        import signal

        return [(signal, "signal", self._set_signal), (atexit, "register", self._register_exit),
                (atexit, "unregister", self._unregister_exit), (os, "putenv", self._putenv),
                (os, "unsetenv", self._unsetenv)]

    def _putenv(self, key, value) -> None:
        self._environ_keys.add(key)
        self._originals[3](key, value)

    def _unsetenv(self, key) -> None:
        self._environ_keys.add(key)
        self._originals[4](key)

    def _set_signal(self, signum, handler):
        previous = self._originals[0](signum, handler)
        self._signals.setdefault(int(signum), previous)
        return previous

    def _register_exit(self, func, *args, **kwargs):
        owner = getattr(func, "__module__", None) or ""
        if _top_level(owner) in _library_packages():
            return self._originals[1](func, *args, **kwargs)  # a library's: it stays loaded, so at process exit
        self._exits.append((func, args, kwargs))
        return func

    def _unregister_exit(self, func) -> None:
        self._exits = [e for e in self._exits if e[0] != func]
        self._originals[2](func)

    # -------------------------------------------------------------------------------------------- restore

    def before_wipe(self) -> List[str]:
        """Run the task's atexit handlers (while its modules are still loaded) and end the processes it left."""
        import threading

        for (module, name, _), original in zip(self._wrappers(), self._originals):
            ModuleType.__setattr__(module, name, original)
        threading.Thread.start = self._thread_start
        done = []
        if self._exits:
            done.append(f"{len(self._exits)} atexit handlers run")
            for func, args, kwargs in reversed(self._exits):
                try:
                    func(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - as at interpreter exit: say so, go on
                    print(f"an atexit handler of the task failed: {e!r}", file=sys.stderr)
            self._exits = []
        ended = end_children()
        if ended:
            done.append(f"{ended} child processes ended")
        return done

    def after_wipe(self) -> List[str]:
        """Put the rest back (after the task's modules were dropped); returns what had to be put back."""
        import signal
        import socket

        done: List[str] = []
        if os.umask(self._umask) != self._umask:
            done.append("umask")
        for signum, handler in self._signals.items():
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
                done.append(f"handler of {signal.Signals(signum).name}")
        if signal.pthread_sigmask(signal.SIG_SETMASK, self._signal_mask) != self._signal_mask:
            done.append("signal mask")
        for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
            if signal.setitimer(timer, 0) != (0.0, 0.0):
                done.append("interval timer or alarm")
        if (socket.getdefaulttimeout(), sys.getrecursionlimit()) + _sys_hooks() != self._settings:
            socket.setdefaulttimeout(self._settings[0])
            sys.setrecursionlimit(self._settings[1])
            for name, value in zip(_SYS_HOOKS, self._settings[2:]):
                setattr(sys, name, value)
            done.append("socket default timeout, recursion limit, standard streams or sys hooks")
        if self._environ_keys and _restore_c_environ(self._environ_keys):
            done.append("C environment")
        done += self._restore_logging()
        done += self._restore_stdlib()
        done += self._restore_modules()
        leaked = [t.name for t, starter in self._started if t.is_alive() and _top_level(starter) not in _library_packages()]
        self.leaked = f"the task left threads running: {', '.join(leaked)}" if leaked else ""
        self._started = []
        return done

    def _restore_logging(self) -> List[str]:
        import logging

        manager = logging.Logger.manager
        level, disable, handlers = self._logging
        changed = [lg for name, lg in manager.loggerDict.items()
                   if isinstance(lg, logging.Logger) and lg.level != self._loggers.get(name, logging.NOTSET)]
        if not changed and (logging.root.level, manager.disable, logging.root.handlers) == self._logging:
            return []
        for logger in changed:
            logger.setLevel(self._loggers.get(logger.name, logging.NOTSET))
        logging.root.setLevel(level)
        logging.disable(disable)
        logging.root.handlers[:] = handlers
        return ["logging levels or handlers"]

    def _watch_stdlib(self) -> None:
        """Record assignments to standard modules from outside them (what a monkeypatch is), by giving each a
        module class that records them: checking after a task costs nothing when no one patched anything."""
        if len(sys.modules) == self._watched:
            return
        for name, module in list(sys.modules.items()):
            if type(module) is ModuleType and name != "sys" and _top_level(name) in sys.stdlib_module_names:
                module.__class__ = _WatchedModule  # never sys: the import system makes new modules of type(sys)
        self._watched = len(sys.modules)

    def _restore_stdlib(self) -> List[str]:
        """Put back functions, classes and modules that the task replaced or deleted in standard modules, and
        remove functions and classes it added; data attributes are the module's state and stay."""
        done = []
        for module, name, original in _PATCHES.values():
            current = module.__dict__.get(name, _MISSING)
            if current is original:
                continue
            if isinstance(original, _PATCHABLE):
                ModuleType.__setattr__(module, name, original)
                done.append(f"{module.__name__}.{name}")
            elif original is _MISSING and isinstance(current, _PATCHABLE) and not isinstance(current, ModuleType):
                ModuleType.__delattr__(module, name)
                done.append(f"{module.__name__}.{name} (added)")
        _PATCHES.clear()
        self._watch_stdlib()  # standard modules the task loaded first
        return done

    def forget_modules(self, names) -> None:
        """The sandbox drops these modules itself: do not put them back."""
        for name in names:
            self._modules.pop(name, None)

    def _restore_modules(self) -> List[str]:
        """Put back modules the task replaced in or deleted from ``sys.modules``; drop what it put there by hand
        (objects that are not modules, modules of no file and no library)."""
        done = []
        modules = sys.modules
        if not self._modules.items() <= modules.items():  # one C-level pass: modules compare by identity
            for name, module in self._modules.items():
                if modules.get(name) is not module:
                    modules[name] = module
                    done.append(f"sys.modules[{name!r}]")
        if len(modules) > len(self._modules):
            for name in modules.keys() - self._modules.keys():
                module = modules[name]
                if not isinstance(module, ModuleType) or (
                        getattr(module, "__spec__", None) is None and _top_level(name) not in _library_packages()):
                    del modules[name]
                    done.append(f"sys.modules[{name!r}] (made by the task)")
        return done


#: (module id, attribute) -> (module, attribute, its value before the first assignment) since the last task.
_PATCHES: Dict[tuple, tuple] = {}
_MISSING = object()


class _WatchedModule(ModuleType):
    """A standard module whose attribute assignments from outside are recorded in ``_PATCHES`` (a module's own
    ``global`` statements write its namespace directly and are not)."""

    def __setattr__(self, name: str, value) -> None:
        _PATCHES.setdefault((id(self), name), (self, name, self.__dict__.get(name, _MISSING)))
        ModuleType.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        _PATCHES.setdefault((id(self), name), (self, name, self.__dict__.get(name, _MISSING)))
        ModuleType.__delattr__(self, name)


#: ``sys`` attributes a task may replace (``sys`` itself cannot be watched as other standard modules are).
_SYS_HOOKS = ("stdin", "stdout", "stderr", "excepthook", "displayhook", "breakpointhook", "unraisablehook")


def _sys_hooks() -> tuple:
    return tuple(getattr(sys, name, None) for name in _SYS_HOOKS)

#: What a monkeypatch replaces: functions, classes, modules (data attributes are module state, not patches).
_PATCHABLE = (types.FunctionType, types.BuiltinFunctionType, type, ModuleType, functools.partial)


@functools.lru_cache(maxsize=1)
def _library_packages() -> frozenset:
    """Top-level packages of the standard library and of installed distributions."""
    return frozenset(sys.stdlib_module_names) | _installed_top_level_names()


def _top_level(name: str) -> str:
    return name.partition(".")[0]


def _become_subreaper() -> None:
    """Orphaned descendants of this process's tasks are re-parented to it, so :func:`end_children` sees them."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _children() -> List[int]:
    pids: List[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with io.open(f"/proc/self/task/{tid}/children") as f:  # the task may have patched open
                pids += [int(p) for p in f.read().split()]
    except OSError:  # no /proc, or a kernel without CONFIG_PROC_CHILDREN: nothing to see
        pass
    return pids


def end_children(rounds: int = 50) -> int:
    """Kill every child process (and, as they are re-parented here, their descendants) and reap them; returns
    how many were killed."""
    import signal
    import time

    killed = 0
    for _ in range(rounds):
        pids = _children()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # all reaped
            if pid == 0:
                time.sleep(0.002)  # killed, not dead yet
        time.sleep(0.005)  # grandchildren of a killed child are re-parented here a moment later
    return killed


def _c_environ() -> Dict[bytes, bytes]:
    import ctypes

    environ = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    out = {}
    i = 0
    while environ[i] is not None:
        key, _, value = environ[i].partition(b"=")
        out[key] = value
        i += 1
    return out


def _restore_c_environ(keys=None) -> bool:
    """Make the C-level environment (what child processes inherit) equal ``os.environ`` again, for ``keys`` (str
    or bytes; default: all); returns whether anything differed."""
    if not sys.platform.startswith("linux"):
        return False
    wanted = os.environb
    actual = _c_environ()
    keys = actual.keys() | wanted.keys() if keys is None else {k.encode() if isinstance(k, str) else k for k in keys}
    differed = False
    for key in keys:
        if actual.get(key) != wanted.get(key):
            differed = True
            if key in wanted:
                os.putenv(key, wanted[key])
            else:
                os.unsetenv(key)
    return differed


def limit_memory(limit_bytes: int) -> None:
    """Cap this process's data (heap and private mappings, RLIMIT_DATA) at ``limit_bytes``: an allocation past it
    raises MemoryError in the task instead of eating the machine. Used where no container enforces ``limits.mem``
    (the local launcher)."""
    import resource

    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))
