"""Unit tests of the executor's process guard (``worker/sandbox.py``: ``ProcessGuard``): what a task changes in
the process beyond its modules is put back, ended or run after it. Each test runs in a forked child, since the
guard makes its process a child subreaper and changes process-wide state on purpose."""

from __future__ import annotations

import atexit
import builtins
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

from flytekitplugins.actor.worker.sandbox import ProcessGuard


def in_child(body) -> dict:
    """Run ``body()`` in a forked child and return the dict it returns (as JSON)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            out = body()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"error": repr(e)}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out


def _user_exit_handler(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)  # builtins.open is patched by the task when this runs
    os.write(fd, b"ran")
    os.close(fd)


def test_a_task_that_changes_the_process_leaves_nothing_behind(tmp_path):
    marker = tmp_path / "atexit"

    def body() -> dict:
        guard = ProcessGuard()
        before = {
            "umask": os.umask(0o022), "timeout": socket.getdefaulttimeout(), "limit": sys.getrecursionlimit(),
            "usr1": signal.getsignal(signal.SIGUSR1), "flytekit": logging.getLogger("flytekit").level,
            "handlers": list(logging.root.handlers), "dumps": json.dumps, "open": builtins.open,
            "json": sys.modules["json"], "stdout": sys.stdout,
        }
        os.umask(before["umask"])
        guard.take()
        # What a task can do to the process:
        os.umask(0o077)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.setitimer(signal.ITIMER_REAL, 100)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        socket.setdefaulttimeout(3)
        sys.setrecursionlimit(5000)
        os.putenv("GUARD_TEST_LEAK", "1")
        logging.getLogger("flytekit").setLevel(logging.CRITICAL)
        logging.disable(logging.ERROR)
        logging.root.addHandler(logging.NullHandler())
        json.dumps = lambda *a, **k: "patched"
        builtins.open = lambda *a, **k: None
        os.helper_of_the_task = lambda: 1
        sys.modules["json"] = types.ModuleType("json")
        sys.modules["made_by_the_task"] = types.ModuleType("made_by_the_task")
        sys.stdout = sys.stderr
        atexit.register(_user_exit_handler, str(marker))
        subprocess.Popen(["sleep", "60"])
        subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 &"]).wait()  # daemonized grandchildren
        threading.Thread(target=time.sleep, args=(60,), name="left-running", daemon=True).start()

        ended = guard.before_wipe()
        restored = guard.after_wipe()
        from flytekitplugins.actor.worker.sandbox import _c_environ, _children

        return {
            "ended": ended, "restored": restored, "leaked": guard.leaked,
            "umask": os.umask(0o022) == before["umask"], "timeout": socket.getdefaulttimeout() == before["timeout"],
            "limit": sys.getrecursionlimit() == before["limit"],
            "usr1": signal.getsignal(signal.SIGUSR1) == before["usr1"],
            "timer": signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0),
            "mask": signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, ()),
            "putenv": b"GUARD_TEST_LEAK" not in _c_environ(),
            "flytekit": logging.getLogger("flytekit").level == before["flytekit"],
            "disable": logging.root.manager.disable == 0,
            "handlers": logging.root.handlers == before["handlers"],
            "dumps": json.dumps is before["dumps"], "open": builtins.open is before["open"],
            "added": not hasattr(os, "helper_of_the_task"),
            "json": sys.modules["json"] is before["json"], "made": "made_by_the_task" not in sys.modules,
            "stdout": sys.stdout is before["stdout"],
            "children": _children(), "atexit": marker.read_text() if marker.exists() else "",
        }

    out = in_child(body)
    checks = {k: v for k, v in out.items() if isinstance(v, bool)}
    assert all(checks.values()), {k: v for k, v in checks.items() if not v}
    assert out["children"] == [], "a child process of the task survived"
    assert out["atexit"] == "ran" and "1 atexit handlers run" in out["ended"]
    assert any("child processes ended" in e for e in out["ended"])
    assert "left-running" in out["leaked"], "a thread of the task's own code must get the executor replaced"
    assert "json.dumps" in out["restored"] and "builtins.open" in out["restored"]


def test_an_untouched_process_needs_nothing_put_back_and_library_threads_are_kept():
    def body() -> dict:
        guard = ProcessGuard()
        results = []
        for _ in range(3):
            guard.take()
            # A thread a library starts, as fsspec starts its I/O loop.
            import concurrent.futures

            concurrent.futures.ThreadPoolExecutor(1).submit(time.sleep, 60)
            results.append((guard.before_wipe(), guard.after_wipe(), guard.leaked))
        return {"results": results}

    assert in_child(body)["results"] == [[[], [], ""]] * 3
