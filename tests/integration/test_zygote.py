"""The local launcher's zygote: replicas forked from one warm process, and their executors' fork server forked
from the replica rather than started as a fresh interpreter."""

import pytest

import fast_path_tasks as ft
from flyte_actor_agent.launchers.local import LocalProcessLauncher
from harness import LocalFleet, output

pytestmark = pytest.mark.timeout(300)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _lineage(fleet):
    replica, fork_server = (int(x) for x in output(fleet.run(ft.lineage)).split())
    return replica, fork_server


def test_replicas_fork_from_the_zygote_and_fork_their_fork_server():
    fleet = LocalFleet()
    try:
        replica, fork_server = _lineage(fleet)
        zygote = _parent(replica)
        assert "flytekitplugins.actor.worker.zygote" in _cmdline(zygote)
        assert _parent(fork_server) == replica
        assert "multiprocessing.forkserver" not in _cmdline(fork_server), "the fork server was a fresh interpreter"
        assert fleet.launcher.pid(next(iter(fleet.launcher.processes))) == replica
        assert output(fleet.run(ft.hello, name="zygote")) == "hello zygote"
    finally:
        fleet.stop()
    with pytest.raises(FileNotFoundError):
        _cmdline(replica)  # stopping the agent stopped the replica (and the zygote)


def test_without_the_zygote_replicas_are_fresh_processes():
    fleet = LocalFleet(lambda on_exit: LocalProcessLauncher(on_exit, zygote=False))
    try:
        replica, fork_server = _lineage(fleet)
        assert "flytekitplugins.actor.worker.replica" in _cmdline(replica)
        assert "multiprocessing.forkserver" in _cmdline(fork_server)
    finally:
        fleet.stop()
