"""Actor tasks that change the process in ways the sandbox must undo (see test_task_hygiene.py)."""

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from flytekit import Resources

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(name="hygiene", replica_count=1, ttl_seconds=60)
capped = ActorEnvironment(name="hygiene-capped", replica_count=1, ttl_seconds=60, limits=Resources(mem="600Mi"))


def _write(path: str) -> None:
    with open(path, "w") as f:
        f.write("ran")


@actor.task
def make_a_mess(marker: str) -> int:
    json.dumps = lambda *a, **k: "patched"
    os.umask(0o077)
    os.putenv("HYGIENE_LEAK", "1")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    socket.setdefaulttimeout(1.5)
    sys.setrecursionlimit(12345)
    logging.getLogger("flytekit").setLevel(logging.CRITICAL)
    atexit.register(_write, marker)
    subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600"], start_new_session=True)  # a daemon and its parent
    return os.getpid()


@actor.task
def inspect_process() -> str:
    umask = os.umask(0o022)
    os.umask(umask)
    env = subprocess.run(["env"], capture_output=True, text=True).stdout
    state = {
        "json": json.dumps({}) == "{}",
        "umask": umask == 0o022,
        "putenv": "HYGIENE_LEAK" not in env,
        "signal": signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN,
        "socket": socket.getdefaulttimeout() is None,
        "recursion": sys.getrecursionlimit() != 12345,
        "logging": logging.getLogger("flytekit").level != logging.CRITICAL,
    }
    return ",".join(k for k, ok in state.items() if not ok) or "clean"


@actor.task
def leak_a_thread() -> int:
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    return os.getpid()


@actor.task
def executor_pid() -> int:
    return os.getpid()


@capped.task
def allocate(mib: int) -> int:
    block = bytearray(mib * 1024 * 1024)
    return len(block) // (1024 * 1024)


@actor.task
def leak_in_map(i: int) -> int:
    """A map element that leaves a thread running: its executor retires after the batch."""
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    return i
