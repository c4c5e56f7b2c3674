"""The executor: a long-lived child process of a replica that runs leased tasks one at a time.

It runs each task through flytekit's own ``pyflyte-execute`` path (``setup_execution`` and
``_dispatch_execute``), so outputs.pb / error.pb and user-versus-system errors are exactly as in a regular pod,
and reads the result back from flytekit's engine directory to report it. Between tasks a :class:`TaskSandbox`
puts the process back as it was. A task that kills the process (signal, ``os._exit``, out of memory) takes only
the executor with it: the replica reports the task lost and starts a fresh executor.

The replica sends ``(lease_id, TaskRun bytes)`` over a pipe and gets ``(lease_id, result dict)`` back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Dict

from flyteidl.core import errors_pb2
from flytekit.bin.entrypoint import _dispatch_execute, setup_execution
from flytekit.core.context_manager import FlyteContextManager
from flytekit.tools.fast_registration import download_distribution
from flytekit.tools.module_loader import load_object_from_module

# The fork server imports this module before forking executors, so the whole plugin is loaded (and counted as
# state to keep, not task state to wipe) before any task runs: @actor_cache's store and the task type stay put.
from .. import cache, contract, environment, local, map, task  # noqa: F401
from ..protocol import lease_pb2
from .sandbox import TaskSandbox

SUCCEEDED, FAILED = "succeeded", "failed"


def serve(conn: Connection, scratch_root: str) -> None:
    """Executor process main loop: run tasks until the pipe closes."""
    _die_with_parent()
    os.makedirs(scratch_root, exist_ok=True)
    sandbox = TaskSandbox(scratch_root)
    while True:
        try:
            lease_id, run_bytes = conn.recv()
        except (EOFError, OSError):
            return
        task_run = lease_pb2.TaskRun.FromString(run_bytes)
        conn.send((lease_id, run_task(task_run, sandbox, scratch_root)))


def _die_with_parent() -> None:
    """Executors are forked by multiprocessing's fork server, which exits with the replica; follow it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_task(task_run: lease_pb2.TaskRun, sandbox: TaskSandbox, scratch_root: str) -> Dict[str, Any]:
    started = time.monotonic()
    sandbox.enter(dict(task_run.env))
    try:
        result = _run(task_run, sandbox.tmpdir, scratch_root)
    except SystemExit as e:
        result = _failure(f"Task {task_run.task_name} called sys.exit({e.code!r}); return or raise instead.", False)
    except ImportError as e:  # the resolver (or a storage plugin) is not in the image: no replica of it can run this
        result = _failure(f"Task {task_run.task_name} cannot run on this environment's image: {e!r}; install the "
                          "missing package into the image, or fix the task's resolver", False)
    except BaseException as e:  # noqa: BLE001 - anything flytekit did not catch is a system error of this replica
        result = _failure(f"Task {task_run.task_name} failed in the actor replica: {e!r}\n{traceback.format_exc()}", True)
    finally:
        sandbox.exit()
    result["run_seconds"] = time.monotonic() - started
    return result


def _run(task_run: lease_pb2.TaskRun, tmpdir: str, scratch_root: str) -> Dict[str, Any]:
    inputs_path = task_run.inputs_uri
    if task_run.inputs or not task_run.inputs_uri:  # inline (an empty map serializes to no bytes)
        inputs_path = os.path.join(tmpdir, "inputs.pb")
        with open(inputs_path, "wb") as f:
            f.write(task_run.inputs)
    code_dir = None
    if task_run.distribution:
        code_dir = ensure_bundle(task_run.distribution, os.path.join(scratch_root, "bundles"))
        os.chdir(code_dir)
    code_root = code_dir or task_run.dest_dir or os.getcwd()
    if code_root not in sys.path:
        sys.path.insert(0, code_root)
    with setup_execution(
        raw_output_data_prefix=task_run.raw_output_data_prefix or None,
        output_metadata_prefix=task_run.output_prefix,
        checkpoint_path=task_run.checkpoint_path or None,
        prev_checkpoint=task_run.prev_checkpoint or None,
        dynamic_addl_distro=task_run.distribution or None,
        dynamic_dest_dir=code_dir,
    ) as ctx:
        resolver = load_object_from_module(task_run.resolver)
        args = list(task_run.resolver_args)
        _dispatch_execute(ctx, lambda: resolver.load_task(loader_args=args), inputs_path, task_run.output_prefix)
        return _result_from(ctx.execution_state.engine_dir, task_run.task_name)


def _result_from(engine_dir: str, task_name: str) -> Dict[str, Any]:
    """Read what ``_dispatch_execute`` wrote: outputs.pb on success, error*.pb on failure."""
    names = os.listdir(engine_dir)
    errors = [n for n in names if n.startswith("error") and n.endswith(".pb")]
    if errors:
        with open(os.path.join(engine_dir, errors[0]), "rb") as f:
            raw = f.read()
        error = errors_pb2.ErrorDocument.FromString(raw).error
        retryable = error.kind == errors_pb2.ContainerError.RECOVERABLE
        return {"phase": FAILED, "error": raw, "message": error.message, "retryable": retryable}
    outputs = b""
    if "outputs.pb" in names:
        with open(os.path.join(engine_dir, "outputs.pb"), "rb") as f:
            outputs = f.read()
    return {"phase": SUCCEEDED, "outputs": outputs, "message": f"{task_name} succeeded"}


def _failure(message: str, retryable: bool) -> Dict[str, Any]:
    return {"phase": FAILED, "message": message, "retryable": retryable}


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
