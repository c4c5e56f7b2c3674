"""What a replica resets between two tasks, so that one task's state does not leak into the next.

Reset after every task:
  * user modules imported by the task: every module that was not loaded before the task and does not come from
    the standard library or an installed package (site-packages) is dropped from ``sys.modules``, so the next
    task imports it afresh: its globals, ``functools.lru_cache`` and class attributes start clean;
  * flytekit's registries of tasks, workflows and launch plans, which those modules added to;
  * ``os.environ``, the working directory and ``sys.path``;
  * the task's temporary directory (``tempfile`` and ``TMPDIR`` point into it while the task runs), which also
    holds flytekit's sandbox of downloaded inputs.

Also put back, ended or run after every task: process-wide state (umask, signal handlers, the socket default
timeout, the recursion limit, logging levels, the C environment, monkeypatches of standard modules and builtins,
``sys.modules`` entries, child processes, atexit handlers): see :class:`ProcessGuard`. A task that leaves a thread
of its own running gets its executor replaced.

Kept: ``@actor_cache`` entries, installed packages a task imported (they stay imported, with their module state;
packages installed in editable mode count as installed), threads and atexit handlers of those packages,
files a task wrote outside its temporary directory.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import sys
import sysconfig
import tempfile
import types
from types import ModuleType
from typing import Dict, List, Set

from flytekit.core.context_manager import FlyteEntities
from flytekit.core.launch_plan import LaunchPlan


def _library_roots() -> List[str]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))}
    return sorted(os.path.realpath(r) + os.sep for r in roots)


@functools.lru_cache(maxsize=1)
def _installed_top_level_names() -> Set[str]:
    """Top-level packages of installed distributions, editable installs included (they live outside
    site-packages but are libraries all the same)."""
    from importlib import metadata

    return set(metadata.packages_distributions())


class TaskSandbox:
    """Snapshot the process before a task (``enter``) and put it back after (``exit``)."""

    def __init__(self, scratch_root: str):
        self._scratch_root = scratch_root
        self._roots = _library_roots()
        self._installed = _installed_top_level_names()
        self._modules: Set[str] = set()
        self._environ: Dict[str, str] = {}
        self._cwd = ""
        self._path: List[str] = []
        self._entities = 0
        self._launch_plans: Set[str] = set()
        self.tmpdir = ""
        #: Process-wide state beyond modules (see :class:`ProcessGuard`).
        self.guard = ProcessGuard()
        #: What the last ``exit`` had to put back beyond modules, environment and files (for logs and tests).
        self.restored: List[str] = []

    def enter(self, env: Dict[str, str]) -> None:
        self.guard.take()
        self._modules = set(sys.modules)
        self._environ = dict(os.environ)
        self._cwd = os.getcwd()
        self._path = list(sys.path)
        self._entities = len(FlyteEntities.entities)
        self._launch_plans = set(LaunchPlan.CACHE)
        self.tmpdir = tempfile.mkdtemp(prefix="task-", dir=self._scratch_root)
        os.environ.update(env)
        os.environ["TMPDIR"] = self.tmpdir
        tempfile.tempdir = self.tmpdir

    def exit(self) -> None:
        ended = self.guard.before_wipe()
        for name in [n for n in sys.modules if n not in self._modules]:
            module = sys.modules.get(name)
            if module is not None and not self._is_library(module):
                del sys.modules[name]
        del FlyteEntities.entities[self._entities :]
        for name in [n for n in LaunchPlan.CACHE if n not in self._launch_plans]:
            del LaunchPlan.CACHE[name]
        os.environ.clear()
        os.environ.update(self._environ)
        try:
            os.chdir(self._cwd)
        except OSError:
            pass
        sys.path[:] = self._path
        tempfile.tempdir = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.restored = ended + self.guard.after_wipe()

    def _is_library(self, module: ModuleType) -> bool:
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
        import atexit
        import signal

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
    return frozenset(sys.stdlib_module_names) | frozenset(_installed_top_level_names())


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
