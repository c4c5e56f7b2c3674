"""A warm parent for local replicas: imports the replica worker and flytekit once, then forks each replica from
itself, so a replica starts in milliseconds instead of importing flytekit (about a second of CPU) on its own.

The local launcher starts one per agent (``python -m flytekitplugins.actor.worker.zygote WORKER_MODULE``) and
talks to it in JSON lines: on stdin ``{"id": ..., "env": {...}, "log": PATH}`` asks for a replica; on stdout
``{"id": ..., "pid": N}`` answers (or ``{"id": ..., "error": ...}``), and ``{"pid": N, "exit": CODE}`` reports a
replica that exited (``CODE`` as ``subprocess`` gives it: negative for a signal). Each replica runs
``WORKER_MODULE.main()`` in a session of its own with the environment it was given, its output in ``PATH``. When
stdin closes (the launcher went away) the zygote kills its replicas' process groups and exits.

The zygote never starts a thread or a gRPC channel, so forking it is safe; a replica forked from it starts its
executors' fork server by forking too (see ``replica.start_forkserver``), inheriting flytekit from here, and uses
the zygote's multiprocessing resource tracker instead of starting one.
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import sys
from multiprocessing import resource_tracker
from typing import Dict


def main() -> None:
    worker = importlib.import_module(sys.argv[1])
    importlib.import_module("flytekitplugins.actor.worker.executor")  # flytekit and the plugin: what forks share
    # One resource tracker for every replica forked from here (and their fork servers and executors): a replica
    # would otherwise start its own when it starts its fork server, each a fresh interpreter (tens of ms of CPU, 25
    # at once when a fleet of 25 starts). It runs until the last process holding its pipe has exited.
    resource_tracker.ensure_running()
    if hasattr(worker, "warm_up"):
        worker.warm_up()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "request")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    children: Dict[int, str] = {}
    pending = b""
    _say({"ready": os.getpid()})
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                _reap(children)
                continue
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                for pid in children:
                    _kill_group(pid)
                os._exit(0)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                try:
                    pid = _fork_replica(worker, request, [wake_r, wake_w])
                except OSError as e:
                    _say({"id": request["id"], "error": f"fork failed: {e}"})
                    continue
                children[pid] = request["id"]
                _say({"id": request["id"], "pid": pid})
        _reap(children)


def _fork_replica(worker, request: dict, zygote_fds: list) -> int:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pid = os.fork()
    if pid:
        os.close(log)
        return pid
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for fd in [null, log] + zygote_fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [worker.__name__]
        try:
            worker.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - printed to the replica's log, which the launcher reports
            import traceback

            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(children: Dict[int, str]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if children.pop(pid, None) is not None:
            _say({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _say(message: dict) -> None:
    os.write(sys.stdout.fileno(), (json.dumps(message) + "\n").encode())


if __name__ == "__main__":
    main()
