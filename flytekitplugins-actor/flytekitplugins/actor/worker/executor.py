"""The executor: a long-lived child process of a replica that runs leased tasks one at a time.

It runs each task through flytekit's own ``_dispatch_execute``, so outputs.pb / error.pb and user-versus-system
errors are exactly as in a regular pod, and reads the result back from flytekit's engine directory to report it.
Two paths lead there: the full path is ``pyflyte-execute``'s (``setup_execution``, files, the task's module imported
afresh); the fast path, taken for inline inputs, skips what such a task does not need (fresh directories, copying
the inputs, files for what never leaves the process (:class:`_EngineFiles`), uploading what goes back in-band,
re-reading configuration, re-importing unchanged modules), see :func:`_run_fast`. ``tests/integration/test_fast_path.py`` holds the two to the same bytes. Between tasks a
:class:`TaskSandbox` puts the process back as it was. A task that kills the process (signal, ``os._exit``, out of memory) takes only
the executor with it: the replica reports the task lost and starts a fresh executor.

The replica sends a list of ``(lease_id, TaskRun bytes)`` over a pipe: one task, or a batch of elements of one
actor map (same ``batch_key``), which run one after another in one sandbox session (:func:`run_batch`). It gets
lists of ``(lease_id, result dict)`` back, in the order sent. The outputs of map elements that go back together are
stored together, as one element group (:func:`_store_groups`), before they are sent.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import hashlib
import logging
import os
import selectors
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Tuple

from flyteidl.core import errors_pb2, execution_pb2
from flytekit import __version__ as _flytekit_version
from flytekit.bin.entrypoint import _dispatch_execute, setup_execution
from flytekit.configuration import (
    SERIALIZED_CONTEXT_ENV_VAR, DataConfig, FastSerializationSettings, ImageConfig, SerializationSettings, StatsConfig,
)
from flytekit.core.checkpointer import SyncCheckpoint
from flytekit.core.context_manager import ExecutionParameters, ExecutionState, FlyteContextManager, OutputMetadataTracker
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.interfaces.stats.taggable import get_stats as _get_stats
from flytekit.loggers import logger as flytekit_logger
from flytekit.loggers import user_space_logger
from flytekit.models.core import identifier as _identifier
from flytekit.tools.fast_registration import download_distribution
from flytekit.tools.module_loader import load_object_from_module

# The fork server imports this module before forking executors, so the whole plugin is loaded (and counted as
# state to keep, not task state to wipe) before any task runs: @actor_cache's store and the task type stay put.
from .. import cache, contract, environment, local, map, task  # noqa: F401
from ..protocol import INLINE_OUTPUT_BYTES, element_groups, lease_pb2
from .sandbox import TaskSandbox, _installed_top_level_names, limit_memory

SUCCEEDED, FAILED = "succeeded", "failed"
#: Set to "0" in a replica's environment to run every task on the full path.
FAST_PATH_VARIABLE = "FLYTE_ACTOR_FAST_PATH"
#: Packages ``setup_execution`` installs with pip before a task (flytekit 1.16's
#: ``flytekit.core.constants.RUNTIME_PACKAGES_ENV_NAME``; flytekit 1.14 has no such variable, and none is set).
RUNTIME_PACKAGES_ENV_NAME = "_F_RUNTIME_PACKAGES"
# Listing installed distributions takes ~0.1 s: done once here, in the fork server, and inherited by every executor
# (a replacement executor, after a task that left a thread running or died, starts in milliseconds).
_installed_top_level_names()
#: Bytes of data memory (RLIMIT_DATA) an executor may use; set by the local launcher from ``limits.mem``.
MEMORY_LIMIT_VARIABLE = "FLYTE_ACTOR_MEMORY_LIMIT_BYTES"


def serve(conn: Connection, scratch_root: str, progress: Optional[Any] = None) -> None:
    """Executor process main loop: run tasks until the pipe closes. ``progress`` (shared with the replica, see
    ``replica.Progress``): the position, in the list last received, of the task started last and when it started,
    so that the replica knows which one runs while results of earlier ones wait to be sent with others (a timeout
    or a death is charged to it, and its timeout counts from its own start)."""
    _die_with_parent()
    run_flytekit_coroutines_inline()
    keep_engine_files_in_memory()
    skip_unused_timings()
    os.makedirs(scratch_root, exist_ok=True)
    limit_memory(int(os.environ.get(MEMORY_LIMIT_VARIABLE) or 0))
    sandbox = TaskSandbox(scratch_root)
    while True:
        try:
            runs = [(lease_id, lease_pb2.TaskRun.FromString(run_bytes)) for lease_id, run_bytes in conn.recv()]
        except (EOFError, OSError):
            return
        # Results go back before the sandbox resets the process: the reset still happens before the next task is
        # read, but no longer delays the answer.
        if len(runs) == 1 and not runs[0][1].outputs_group_prefix:
            lease_id, task_run = runs[0]
            result = run_task(task_run, sandbox, scratch_root,
                              report=lambda result, lease_id=lease_id: conn.send([(lease_id, result)]))
            retire = result.get("retire")
        else:
            retire = run_batch(runs, sandbox, scratch_root, conn.send, progress)
        if retire:
            _retire(conn, retire)


#: How long a retiring executor waits for the replica's goodbye (it comes at once from a live replica).
RETIRE_WAIT_SECONDS = 10.0


def _retire(conn: Connection, reason: str) -> None:
    """The task left a thread running: tell the replica (which then sends nothing more and says goodbye), hand
    back what it sent before it knew (never started), and exit; the replica starts a clean executor in this one's
    place. Nothing sent to this executor is lost on the way."""
    conn.send([("", {"retire": reason})])
    while conn.poll(RETIRE_WAIT_SECONDS):
        try:
            runs = conn.recv()
        except (EOFError, OSError):
            break
        if not runs:  # the goodbye
            break
        conn.send([(lease_id, {"not_started": reason}) for lease_id, _ in runs])
    os._exit(0)


class _InlineRunner:
    """Runs flytekit's coroutines for this thread on a loop of its own, in this thread, instead of on a loop thread
    it hands each one to (flytekit's ``_TaskRunner``). The result is the same; the cost is not: each hand-over is
    two thread switches, three per task, which on a busy machine wait for a core (1-3 ms a task measured under
    load, see docs/performance.md). A coroutine that calls back into synchronous flytekit (nesting) goes to
    flytekit's own runner, as it would have."""

    def __init__(self, fallback: Any):
        import asyncio

        self.loop = asyncio.SelectorEventLoop(_BusySelector())
        self.fallback = fallback

    def run(self, coro: Any) -> Any:
        if self.loop.is_running():
            return self.fallback.run(coro)
        return self.loop.run_until_complete(coro)


class _BusySelector(selectors.DefaultSelector):
    """The inline loop's selector: while callbacks are ready (``select(0)``), it asks the kernel for I/O at most
    once a millisecond instead of on every turn of the loop. flytekit's conversions turn the loop ~10 times an
    element, each an ``epoll_wait`` (a tenth of an element's CPU here, and on a busy machine a point where the
    executor is preempted); they do no I/O of their own. When nothing is ready it waits on the kernel as usual, so
    a coroutine that does I/O (an upload) is woken as before, and one that spins on ``sleep(0)`` still lets I/O in."""

    POLL_EVERY_SECONDS = 0.001

    def __init__(self) -> None:
        super().__init__()
        self._polled = 0.0

    def select(self, timeout: Optional[float] = None):
        if timeout is not None and timeout <= 0:
            now = time.monotonic()
            if now - self._polled < self.POLL_EVERY_SECONDS:
                return []
            self._polled = now
        return super().select(timeout)


def run_flytekit_coroutines_inline() -> bool:
    """In this process (an executor, which runs tasks on its main thread only): flytekit's coroutines run on the
    calling thread (:class:`_InlineRunner`), and the label flytekit gives each context it pushes is taken without
    reading source files (``traceback.extract_stack`` stats every file on the stack; the label is only printed by
    flytekit's debug logs, and reads the same). Returns False, changing nothing, where flytekit's internals are not
    the ones this was written against."""
    import threading

    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.utils import asyn

    manager = getattr(asyn, "loop_manager", None)
    runners = getattr(manager, "_runner_map", None)
    runner_type = getattr(asyn, "_TaskRunner", None)
    if not isinstance(runners, dict) or runner_type is None or not hasattr(FlyteContextManager, "get_origin_stackframe"):
        return False
    key = threading.current_thread().name + f"PID:{os.getpid()}"  # flytekit's key: one runner per thread
    if not isinstance(runners.get(key), _InlineRunner):
        runners[key] = _InlineRunner(runners.get(key) or runner_type())
    FlyteContextManager.get_origin_stackframe = staticmethod(_origin_stackframe)
    return True


def _origin_stackframe(limit: int = 2) -> traceback.FrameSummary:
    """``FlyteContextManager.get_origin_stackframe``'s frame (``limit`` frames above its caller's caller, or the
    outermost), without looking up the source line until someone reads it."""
    frame = sys._getframe(1)
    for _ in range(limit):
        if frame.f_back is None:
            break
        frame = frame.f_back
    return traceback.FrameSummary(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, lookup_line=False)


class _EngineFiles:
    """The fast path's ``inputs.pb`` and engine-directory files, kept in memory instead of on disk.

    ``_dispatch_execute`` reads the inputs and writes outputs.pb, error.pb and offloaded literals through
    ``flytekit.core.utils.load_proto_from_file`` / ``write_proto_to_file``; in an executor those read and write this
    store for the paths of the element running now (``expect``), and the files as before for any other path. What
    must reach the output prefix is written there from memory (``_InPlaceFileAccess.put_data``), and the result is
    read from memory (:func:`_result_from`): on this VM's disk each of the five files an element wrote, read back,
    copied and removed cost about 0.1 ms to open, and writing through a directory made per element more."""

    def __init__(self) -> None:
        self.engine_dir = ""
        self.files: Dict[str, bytes] = {}

    def expect(self, engine_dir: str, inputs_path: str, inputs: bytes) -> None:
        self.engine_dir = engine_dir
        self.files = {inputs_path: inputs}

    def done(self) -> None:
        self.engine_dir = ""
        self.files = {}

    def in_engine_dir(self) -> Dict[str, bytes]:
        """Name -> bytes of what was written into the engine directory."""
        return {os.path.basename(path): data for path, data in self.files.items()
                if self.engine_dir and os.path.dirname(path) == self.engine_dir}


_engine_files = _EngineFiles()


def keep_engine_files_in_memory() -> bool:
    """In this process (an executor): the fast path's engine files live in :data:`_engine_files`. Returns False,
    changing nothing, where flytekit has not the two functions this replaces."""
    from flytekit.core import utils

    load, write = getattr(utils, "load_proto_from_file", None), getattr(utils, "write_proto_to_file", None)
    if load is None or write is None:
        return False
    if getattr(load, "_flyte_actor", False):
        return True

    def load_proto_from_file(pb2_type, path):
        data = _engine_files.files.get(path)
        if data is None:
            return load(pb2_type, path)
        message = pb2_type()
        message.ParseFromString(data)
        return message

    def write_proto_to_file(proto, path):
        if _engine_files.engine_dir and os.path.dirname(path) == _engine_files.engine_dir:
            _engine_files.files[path] = proto.SerializeToString()
        else:
            write(proto, path)

    load_proto_from_file._flyte_actor = True  # type: ignore[attr-defined]
    utils.load_proto_from_file, utils.write_proto_to_file = load_proto_from_file, write_proto_to_file
    return True


class _Timings:
    """Whether the task running now on the fast path needs flytekit's ``timeit`` measurements (see
    :func:`skip_unused_timings`)."""

    unused = False


def skip_unused_timings() -> bool:
    """In this process (an executor): flytekit's ``timeit`` (five per task: two CPU-clock syscalls and two wall-clock
    reads each) measures nothing while the fast path runs a task that outputs no deck and flytekit does not log at
    INFO. Its measurements go to the task's Timeline deck, which flytekit writes out only for a task with decks
    enabled, and to an INFO log line; both stay as they were wherever they are written. The one difference: a task
    without decks that reads ``current_context().timeline_deck`` itself finds it empty. Measured: about a fifth of
    a map element's CPU here (docs/performance.md). Returns False, changing nothing, where flytekit has no
    ``timeit`` context manager."""
    from flytekit.core import utils

    timeit = getattr(utils, "timeit", None)
    if timeit is None or not hasattr(timeit, "__enter__") or not hasattr(timeit, "__exit__"):
        return False
    if getattr(timeit.__enter__, "_flyte_actor", False):
        return True
    enter, exit_ = timeit.__enter__, timeit.__exit__

    def __enter__(self):
        return self if _Timings.unused else enter(self)

    def __exit__(self, exc_type, exc_val, exc_tb):
        return None if _Timings.unused else exit_(self, exc_type, exc_val, exc_tb)

    __enter__._flyte_actor = True  # type: ignore[attr-defined]
    timeit.__enter__, timeit.__exit__ = __enter__, __exit__
    return True


def _timings_needed(task: Any) -> bool:
    return not getattr(task, "disable_deck", True) or flytekit_logger.isEnabledFor(logging.INFO)


def _die_with_parent() -> None:
    """Executors are forked by multiprocessing's fork server, which exits with the replica; follow it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_task(task_run: lease_pb2.TaskRun, sandbox: TaskSandbox, scratch_root: str,
             report: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run one task and return its result; with ``report``, also hand the result to it before the sandbox resets
    the process."""
    started = time.monotonic()
    try:
        code_root = _code_root(task_run, scratch_root)
    except BaseException as e:  # noqa: BLE001 - a bundle that cannot be fetched is the replica's problem
        result = _failure(f"Task {task_run.task_name} failed in the actor replica: {e!r}\n{traceback.format_exc()}", True)
        result["run_seconds"] = time.monotonic() - started
        if report is not None:
            report(result)
        return result
    env = dict(task_run.env)
    fast = _fast_path_applies(task_run, env)
    sandbox.enter(env, code_root, keep_modules=fast)
    try:
        _enter_code_root(task_run, code_root)
        if fast:
            result = _run_fast(task_run, sandbox)
        else:
            result = _run(task_run, sandbox)
    except BaseException as e:  # noqa: BLE001 - see _uncaught
        result = _uncaught(task_run, e)
    try:
        sandbox.end_task()
        result["run_seconds"] = time.monotonic() - started
        if report is not None:
            report(result)
    finally:
        sandbox.exit()
    if sandbox.restored:  # into the replica's log: what the task changed in the process and did not undo
        print(f"after task {task_run.task_name}: {'; '.join(sandbox.restored)}", file=sys.stderr, flush=True)
    if sandbox.guard.leaked:
        result["retire"] = sandbox.guard.leaked
    return result


#: A batch sends the results it has at most about this long after the first of them finished, once half the batch
#: has results (so that the agent tops the replica's queue up before it runs dry), and at its end: fewer, larger
#: messages between executor, replica and agent. Each message wakes the replica and then the agent, and on a busy
#: machine each wake-up preempts an executor: with 25 replicas on 2 cores an element took ~30 ms of wall time, so a
#: 10 ms window sent every result alone and the executors' CPU per element doubled (docs/performance.md). Elements
#: that take longer than this send each result as soon as they have it; a timeout is timed from each element's own
#: start (``progress.started``), not from when the results before it were sent.
BATCH_FLUSH_SECONDS = 0.25


def run_batch(runs: List[Tuple[str, lease_pb2.TaskRun]], sandbox: TaskSandbox, scratch_root: str,
              send: Callable[[List[Tuple[str, Dict[str, Any]]]], None], progress: Optional[Any] = None) -> str:
    """Run elements of one actor map (the same task, code and environment; inputs and output prefixes differ) one
    after another in one sandbox session: the task is loaded once, and the state wipe happens after the last
    element rather than between them, as in one pod that runs a map's elements in turn. Each element still goes
    through flytekit's ``_dispatch_execute`` in a context of its own, so its outputs and errors are those of a
    lone run. Elements that the fast path cannot take run as lone tasks. ``send`` gets lists of results, in
    order. Returns why the executor must be replaced ("" if it need not)."""
    first = runs[0][1]
    if not all(_fast_path_applies(run, dict(run.env)) for _, run in runs):
        retire = ""
        for position, (lease_id, run) in enumerate(runs):
            _started(progress, position)
            retire = run_task(run, sandbox, scratch_root,
                              report=lambda result, lease_id=lease_id: send([(lease_id, result)])).get("retire") or retire
        return retire
    started = time.monotonic()
    pending: List[Tuple[str, Dict[str, Any]]] = []
    since = 0.0
    try:
        code_root = _code_root(first, scratch_root)
    except BaseException as e:  # noqa: BLE001 - as in run_task
        failure = _failure(f"Task {first.task_name} failed in the actor replica: {e!r}\n{traceback.format_exc()}", True)
        send([(lease_id, dict(failure, run_seconds=time.monotonic() - started)) for lease_id, _ in runs])
        return ""
    sandbox.enter(dict(first.env), code_root, keep_modules=True)
    try:
        _enter_code_root(first, code_root)
        loaded: List[Any] = []
        by_lease = dict(runs)

        def load_task():
            if not loaded:
                resolver = sandbox.snapshot_imports(lambda: load_object_from_module(first.resolver))
                args = list(first.resolver_args)
                loaded.append(sandbox.snapshot_imports(lambda: resolver.load_task(loader_args=args)))
            return loaded[0]

        for position, (lease_id, run) in enumerate(runs):
            began = _started(progress, position)
            try:
                result = _run_fast(run, sandbox, load_task, grouped=bool(run.outputs_group_prefix))
            except BaseException as e:  # noqa: BLE001 - see _uncaught
                result = _uncaught(run, e)
            now = time.monotonic()
            result["run_seconds"] = now - began
            pending.append((lease_id, result))
            since = since or now
            # Held for the next ones only while one more element as long as this one would still end within the
            # window: a slow element's result (and its stored outputs) goes at once, not one element later.
            if now - since + result["run_seconds"] >= BATCH_FLUSH_SECONDS or 2 * len(pending) >= len(runs):
                _store_groups(pending, by_lease, sandbox)
                send(pending)
                pending, since = [], 0.0
        sandbox.end_task()
        if pending:
            _store_groups(pending, by_lease, sandbox)
            send(pending)
    finally:
        sandbox.exit()
    if sandbox.restored:
        print(f"after a batch of {len(runs)} elements of {first.task_name}: {'; '.join(sandbox.restored)}",
              file=sys.stderr, flush=True)
    return sandbox.guard.leaked or ""


def _started(progress: Optional[Any], position: int) -> float:
    """Tell the replica (``progress``, shared with it) that the element at ``position`` starts now; returns now."""
    now = time.monotonic()
    if progress is not None:
        progress.started = now
        progress.position = position
    return now


def _store_groups(results: List[Tuple[str, Dict[str, Any]]], runs: Dict[str, lease_pb2.TaskRun],
                  sandbox: TaskSandbox) -> None:
    """Store the outputs of the map elements among ``results`` that ran grouped (``TaskRun.outputs_group_prefix``)
    and succeeded with outputs in-band, as one ElementOutputsGroup file per group prefix (protocol/element_groups.py),
    before their results are sent: an element reported done has its outputs stored. Each such result gets
    ``outputs_group``, the file's URI; if the file cannot be written, its elements fail (retryable) instead."""
    by_prefix: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
    first_run: Dict[str, lease_pb2.TaskRun] = {}
    for lease_id, result in results:
        run = runs.get(lease_id)
        if (run is not None and run.outputs_group_prefix and result.get("phase") == SUCCEEDED
                and "outputs_size" in result and not result.get("outputs_in_prefix")):
            by_prefix.setdefault(run.outputs_group_prefix, []).append((run.element_index, result))
            first_run.setdefault(run.outputs_group_prefix, run)
    for prefix, elements in by_prefix.items():
        results_of = {index: result for index, result in elements}
        # The file access the elements ran with (their context base: the same credentials and configuration).
        file_access = _context_base(first_run[prefix], sandbox.workdir, outputs_to_prefix=False).ctx.file_access
        for group in element_groups.split([(index, result["outputs"]) for index, result in elements]):
            uri = f"{prefix.rstrip('/')}/{element_groups.name_of(index for index, _ in group)}"
            try:
                _put_bytes(file_access, element_groups.pack(group), uri)
            except Exception as e:  # noqa: BLE001 - the store refused: these elements run again elsewhere
                for index, _ in group:
                    result = results_of[index]
                    seconds = result.get("run_seconds", 0.0)
                    result.clear()
                    result.update(_failure(f"element {index} succeeded but its outputs could not be stored at {uri}: "
                                           f"{e!r}", True), run_seconds=seconds)
                continue
            for index, _ in group:
                results_of[index]["outputs_group"] = uri


def _enter_code_root(task_run: lease_pb2.TaskRun, code_root: str) -> None:
    if code_root not in sys.path:
        sys.path.insert(0, code_root)
    if task_run.distribution:
        os.chdir(code_root)


def _uncaught(task_run: lease_pb2.TaskRun, e: BaseException) -> Dict[str, Any]:
    """The result of a task that raised past flytekit: its exit, a missing package, or a system error of this
    replica (anything else flytekit did not catch)."""
    if isinstance(e, SystemExit):
        return _failure(f"Task {task_run.task_name} called sys.exit({e.code!r}); return or raise instead.", False)
    if isinstance(e, ImportError):  # the resolver (or a storage plugin) is not in the image: no replica can run it
        return _failure(f"Task {task_run.task_name} cannot run on this environment's image: {e!r}; install the "
                        "missing package into the image, or fix the task's resolver", False)
    return _failure(f"Task {task_run.task_name} failed in the actor replica: {e!r}\n{traceback.format_exc()}", True)


def _code_root(task_run: lease_pb2.TaskRun, scratch_root: str) -> str:
    if task_run.distribution:
        return ensure_bundle(task_run.distribution, os.path.join(scratch_root, "bundles"))
    return task_run.dest_dir or os.getcwd()


def _fast_path_applies(task_run: lease_pb2.TaskRun, env: Dict[str, str]) -> bool:
    """The fast path needs inline inputs (nothing to download) and no packages installed at run time (which
    ``setup_execution`` does with pip); ``FLYTE_ACTOR_FAST_PATH=0`` (the replica's or the task's) turns it off."""
    def variable(name: str) -> str:
        return env.get(name, os.environ.get(name, ""))

    if variable(FAST_PATH_VARIABLE) == "0" or variable(RUNTIME_PACKAGES_ENV_NAME):
        return False
    return bool(task_run.inputs) or not task_run.inputs_uri


def _run(task_run: lease_pb2.TaskRun, sandbox: TaskSandbox) -> Dict[str, Any]:
    """The full path: exactly what ``pyflyte-execute`` does, on files."""
    inputs_path = task_run.inputs_uri
    if task_run.inputs or not task_run.inputs_uri:  # inline (an empty map serializes to no bytes)
        inputs_path = os.path.join(sandbox.tmpdir, "inputs.pb")
        with open(inputs_path, "wb") as f:
            f.write(task_run.inputs)
    with setup_execution(
        raw_output_data_prefix=task_run.raw_output_data_prefix or None,
        output_metadata_prefix=task_run.output_prefix,
        checkpoint_path=task_run.checkpoint_path or None,
        prev_checkpoint=task_run.prev_checkpoint or None,
        dynamic_addl_distro=task_run.distribution or None,
        dynamic_dest_dir=os.getcwd() if task_run.distribution else None,
    ) as ctx:
        resolver = load_object_from_module(task_run.resolver)
        args = list(task_run.resolver_args)
        _dispatch_execute(ctx, lambda: resolver.load_task(loader_args=args), inputs_path, task_run.output_prefix)
        return _result_from(ctx.execution_state.engine_dir, task_run.task_name)


def _run_fast(task_run: lease_pb2.TaskRun, sandbox: TaskSandbox, load_task: Optional[Callable[[], Any]] = None,
              grouped: bool = False) -> Dict[str, Any]:
    """The fast path: flytekit's own ``_dispatch_execute`` (so outputs, errors, offloading, decks and checkpoints are
    flytekit's), in a context made like ``setup_execution`` makes it but in directories that stay between tasks,
    with the inputs handed over in place and the outputs and errors returned in-band instead of uploaded: propeller
    writes ``outputs.pb`` from the agent's answer itself. Files beside them (offloaded literals, a dynamic task's
    futures) are uploaded as usual. The task's modules are kept between tasks when the sandbox can reset them.
    ``grouped``: a map element whose outputs the caller stores with others (:func:`_store_groups`), so its
    outputs.pb comes back in-band when small rather than going to its own prefix."""
    with _task_context(task_run, sandbox.workdir, grouped) as ctx:
        inputs_path = os.path.join(ctx.execution_state.working_dir, "inputs.pb")
        engine_dir = ctx.execution_state.engine_dir
        if _engine_files_kept():
            _engine_files.expect(engine_dir, inputs_path, task_run.inputs)
        else:
            with open(inputs_path, "wb") as f:
                f.write(task_run.inputs)
        if load_task is None:
            resolver = sandbox.snapshot_imports(lambda: load_object_from_module(task_run.resolver))
            args = list(task_run.resolver_args)

            def load_task():
                return sandbox.snapshot_imports(lambda: resolver.load_task(loader_args=args))

        def load_and_time():
            task = load_task()
            _Timings.unused = not _timings_needed(task)
            return task

        try:
            _dispatch_execute(ctx, load_and_time, inputs_path, task_run.output_prefix)
            return _result_from(engine_dir, task_run.task_name, _engine_files.in_engine_dir())
        finally:
            _Timings.unused = False
            _engine_files.done()
            for name in os.listdir(engine_dir):  # the next element of a batch writes its own
                os.remove(os.path.join(engine_dir, name))


def _engine_files_kept() -> bool:
    from flytekit.core import utils

    return getattr(utils.load_proto_from_file, "_flyte_actor", False)


class _InPlaceFileAccess(FileAccessProvider):
    """flytekit's file access for one fast-path task: as flytekit's, except that the inputs are already where
    ``_dispatch_execute`` copies them to, and that the engine directory's ``outputs.pb`` and ``error*.pb`` are not
    uploaded (the executor returns them to the agent)."""

    def __init__(self, *args, engine_dir: str, outputs_to_prefix: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._engine_dir = engine_dir
        self._outputs_to_prefix = outputs_to_prefix

    def get_data(self, remote_path: str, local_path: str, is_multipart: bool = False, **kwargs):
        if remote_path == local_path:
            return local_path
        return super().get_data(remote_path, local_path, is_multipart, **kwargs)

    def put_data(self, local_path, remote_path: str, is_multipart: bool = False, **kwargs):
        if is_multipart and os.fspath(local_path) == self._engine_dir:
            on_disk = os.listdir(self._engine_dir)
            for name, data in _engine_files.in_engine_dir().items():
                if not _returned_in_band(name, len(data), self._outputs_to_prefix):
                    _put_bytes(self, data, self.join(remote_path, name), os.path.join(self._engine_dir, name))
            for name in on_disk:
                path = os.path.join(self._engine_dir, name)
                if not _returned_in_band(name, os.path.getsize(path), self._outputs_to_prefix):
                    super().put_data(path, self.join(remote_path, name))
            return remote_path
        return super().put_data(local_path, remote_path, is_multipart, **kwargs)


def _put_bytes(file_access: FileAccessProvider, data: bytes, uri: str, spool: str = "") -> None:
    """Write ``data`` to ``uri``: to a local path directly (through a temporary name, so that nobody reads half a
    file), anywhere else through the file ``spool`` (default: a temporary file) and flytekit's ``put_data``."""
    if file_access.is_remote(uri):
        with contextlib.ExitStack() as stack:
            if not spool:
                spool = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="actor-put-")), "data")
            with open(spool, "wb") as f:
                f.write(data)
            file_access.put_data(spool, uri)
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def _returned_in_band(name: str, size: int, outputs_to_prefix: bool) -> bool:
    """Whether the agent gets this engine-directory file in the executor's reply instead of from the output prefix:
    errors always; outputs when small enough to send inline, unless the task must leave them in the prefix (an
    actor map's element: a retried map or a restarted agent finds finished elements there)."""
    if name == "outputs.pb":
        return not outputs_to_prefix and size <= INLINE_OUTPUT_BYTES
    return name.startswith("error") and name.endswith(".pb")


@contextlib.contextmanager
def _task_context(task_run: lease_pb2.TaskRun, workdir: str, grouped: bool = False):
    """``flytekit.bin.entrypoint.setup_execution`` (flytekit 1.16), for the fast path: the same execution parameters,
    file access, execution state and serialization settings, read from the same environment variables, but with
    the user workspace and flytekit's local sandbox in fixed directories (which the sandbox empties after the task)
    instead of fresh random ones (creating and removing directories costs milliseconds on some file systems, and
    ``setup_execution`` never removes the workspace it makes). What does not depend on the task itself but on its
    environment (identity, configuration, stats, file access, serialization settings) is made once for all the
    tasks and elements that run with the same environment variables, prefixes and code (:func:`_context_base`)."""
    base = _context_base(task_run, workdir, task_run.outputs_to_prefix and not grouped)
    checkpointer = None
    if task_run.checkpoint_path:
        checkpointer = SyncCheckpoint(checkpoint_dest=task_run.checkpoint_path,
                                      checkpoint_src=task_run.prev_checkpoint or None)
    execution_parameters = ExecutionParameters(
        execution_id=base.execution_id,
        execution_date=datetime.datetime.now(datetime.timezone.utc),
        stats=base.stats,
        logging=user_space_logger,
        tmp_dir=base.workspace,
        raw_output_prefix=base.raw_output_prefix,
        output_metadata_prefix=task_run.output_prefix,
        checkpoint=checkpointer,
        task_id=base.task_id,
    )
    # ctx.new_execution_state().with_params(mode=TASK_EXECUTION, user_space_params=...), without making the engine
    # directory twice per element (it exists: _ContextBase made it).
    es = copy.copy(base.execution_state)
    object.__setattr__(es, "user_space_params", execution_parameters)
    cb = base.ctx.new_builder().with_execution_state(es).with_output_metadata_tracker(OutputMetadataTracker())
    cb = cb.with_serialization_settings(base.serialization_settings)
    # FlyteContextManager.with_context, without the stack walk it makes to label the context (about a millisecond).
    ctx = FlyteContextManager.push_context(cb.build(), _ORIGIN)
    depth = FlyteContextManager.size()
    try:
        yield ctx
    finally:
        while FlyteContextManager.size() >= depth:
            FlyteContextManager.pop_context()


_bases: "Dict[Tuple[Any, ...], _ContextBase]" = {}


def _context_base(task_run: lease_pb2.TaskRun, workdir: str, outputs_to_prefix: bool) -> "_ContextBase":
    """The :class:`_ContextBase` for this task: made anew only when what it is made from changed. The environment
    (which the sandbox set for the task) is identified by flytekit's configuration read from it (:func:`_configs`
    returns the same objects for the same variables, and a base holds them, so their ids are not reused)."""
    data_config = _configs()[0]
    key = (id(data_config), task_run.raw_output_data_prefix, outputs_to_prefix, task_run.distribution,
           os.getcwd() if task_run.distribution else "", workdir)
    base = _bases.get(key)
    if base is None:
        if len(_bases) >= 16:
            _bases.clear()
        base = _bases[key] = _ContextBase(task_run, workdir, outputs_to_prefix)
    return base


class _ContextBase:
    """What :func:`_task_context` makes the same way for every task run in one environment (read from its variables
    and its prefixes, never from the task's inputs or output prefix)."""

    def __init__(self, task_run: lease_pb2.TaskRun, workdir: str, outputs_to_prefix: bool):
        exe_project = _one_of("FLYTE_INTERNAL_EXECUTION_PROJECT", "_F_PRJ")
        exe_domain = _one_of("FLYTE_INTERNAL_EXECUTION_DOMAIN", "_F_DM")
        exe_name = _one_of("FLYTE_INTERNAL_EXECUTION_ID", "_F_NM")
        exe_wf = _one_of("FLYTE_INTERNAL_EXECUTION_WORKFLOW", "_F_WF")
        exe_lp = _one_of("FLYTE_INTERNAL_EXECUTION_LAUNCHPLAN", "_F_LP")
        tk_project = _one_of("FLYTE_INTERNAL_TASK_PROJECT", "_F_TK_PRJ")
        tk_domain = _one_of("FLYTE_INTERNAL_TASK_DOMAIN", "_F_TK_DM")
        tk_name = _one_of("FLYTE_INTERNAL_TASK_NAME", "_F_TK_NM")
        tk_version = _one_of("FLYTE_INTERNAL_TASK_VERSION", "_F_TK_V")
        self.raw_output_prefix = task_run.raw_output_data_prefix or None

        self.workspace = os.path.join(workdir, "workspace")
        local_sandbox = os.path.join(workdir, "sandbox")
        engine_dir = os.path.join(local_sandbox, "local_flytekit", "engine_dir")
        if not os.path.isdir(engine_dir):
            os.makedirs(self.workspace, exist_ok=True)
            os.makedirs(engine_dir, exist_ok=True)

        data_config, image_config, stats_config = _configs()
        self.execution_id = _identifier.WorkflowExecutionIdentifier(project=exe_project, domain=exe_domain,
                                                                    name=exe_name)
        self.task_id = _identifier.Identifier(_identifier.ResourceType.TASK, tk_project, tk_domain, tk_name,
                                              tk_version)
        self.stats = _get_stats(
            cfg=stats_config,
            prefix=f"{tk_project}.{tk_domain}.{tk_name}.user_stats",
            tags={"exec_project": exe_project, "exec_domain": exe_domain, "exec_workflow": exe_wf,
                  "exec_launchplan": exe_lp, "api_version": _flytekit_version},
        )
        metadata = {
            "flyte-execution-project": exe_project,
            "flyte-execution-domain": exe_domain,
            "flyte-execution-launchplan": exe_lp,
            "flyte-execution-workflow": exe_wf,
            "flyte-execution-name": exe_name,
        }
        file_access = _InPlaceFileAccess(local_sandbox_dir=local_sandbox, raw_output_prefix=self.raw_output_prefix,
                                         data_config=data_config, execution_metadata=metadata, engine_dir=engine_dir,
                                         outputs_to_prefix=outputs_to_prefix)
        self.ctx = FlyteContextManager.current_context().new_builder().with_file_access(file_access).build()
        self.execution_state = self.ctx.new_execution_state().with_params(mode=ExecutionState.Mode.TASK_EXECUTION)
        compressed = os.environ.get(SERIALIZED_CONTEXT_ENV_VAR, "")
        if compressed:
            ssb = SerializationSettings.from_transport(compressed).new_builder()
        else:
            ssb = SerializationSettings(image_config).new_builder()
        ssb.project = ssb.project or exe_project
        ssb.domain = ssb.domain or exe_domain
        ssb.version = tk_version
        if task_run.distribution:
            ssb.fast_serialization_settings = FastSerializationSettings(
                enabled=True, destination_dir=os.getcwd(), distribution_location=task_run.distribution)
        self.serialization_settings = ssb.build()


#: The label of the fast path's context in flytekit's context stack (flytekit's debug logs print it).
_ORIGIN = traceback.FrameSummary(__file__, 0, "_task_context")
_config_cache: Dict[frozenset, Tuple[Any, Any, Any]] = {}


def _configs() -> Tuple[DataConfig, ImageConfig, StatsConfig]:
    """flytekit's data, image and stats configuration as ``setup_execution`` reads it (``X.auto()``: environment
    variables and the config file they name), read once per distinct environment rather than for every task."""
    environ = getattr(os.environ, "_data", None)  # the raw bytes: hashed without decoding every variable
    key = frozenset((environ if isinstance(environ, dict) else os.environ).items())
    found = _config_cache.get(key)
    if found is None:
        if len(_config_cache) >= 16:
            _config_cache.clear()
        found = _config_cache[key] = (DataConfig.auto(), ImageConfig.auto(), StatsConfig.auto())
    return found


def _one_of(*names: str) -> str:
    for name in names:
        if name in os.environ:
            return os.environ[name]
    return ""


def _result_from(engine_dir: str, task_name: str, in_memory: Optional[Dict[str, bytes]] = None) -> Dict[str, Any]:
    """Read what ``_dispatch_execute`` wrote: outputs.pb on success, error*.pb on failure; from ``in_memory`` (name ->
    bytes, see :class:`_EngineFiles`) where it is there, else from the engine directory."""
    in_memory = in_memory or {}
    names = list(in_memory) + os.listdir(engine_dir)
    errors = [n for n in names if n.startswith("error") and n.endswith(".pb")]
    if errors:
        raw = in_memory.get(errors[0])
        if raw is None:
            raw = _read(os.path.join(engine_dir, errors[0]))
        error = errors_pb2.ErrorDocument.FromString(raw).error
        retryable = error.kind == errors_pb2.ContainerError.RECOVERABLE
        system = error.origin == execution_pb2.ExecutionError.SYSTEM
        return {"phase": FAILED, "error": raw, "message": error.message, "retryable": retryable, "system_error": system}
    result = {"phase": SUCCEEDED, "outputs": b"", "message": f"{task_name} succeeded"}
    if "outputs.pb" in in_memory:
        data = in_memory["outputs.pb"]
        result.update(_outputs(len(data), lambda: data))
    elif "outputs.pb" in names:
        path = os.path.join(engine_dir, "outputs.pb")
        result.update(_outputs(os.path.getsize(path), lambda: _read(path)))
    return result


def _outputs(size: int, read: Callable[[], bytes]) -> Dict[str, Any]:
    """Small outputs are sent inline (``read`` gives them); large ones only by size (outputs.pb is in the output
    prefix: flytekit uploaded it, on the fast path too, see ``_returned_in_band``), so a big result never rides the
    lease stream."""
    if size > INLINE_OUTPUT_BYTES:
        return {"outputs_in_prefix": True, "outputs_size": size}
    return {"outputs": read(), "outputs_size": size}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _failure(message: str, retryable: bool) -> Dict[str, Any]:
    return {"phase": FAILED, "message": message, "retryable": retryable, "system_error": retryable}


def ensure_bundle(distribution: str, root: str) -> str:
    """Unpack a fast-registered code bundle once per distinct bundle and return its directory."""
    target = os.path.join(root, hashlib.sha256(distribution.encode()).hexdigest()[:20])
    done = os.path.join(target, ".flyte-actor-complete")
    if os.path.exists(done):
        return target
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(root, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # executors of one replica share the cache
        if not os.path.exists(done):
            with FlyteContextManager.with_context(FlyteContextManager.current_context().new_builder()):
                download_distribution(distribution, target)
            open(done, "w").close()
    return target
