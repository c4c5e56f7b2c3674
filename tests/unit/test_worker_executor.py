"""The replica's executor against the installed flytekit: it runs tasks through flytekit's entrypoint internals
(``setup_execution``, ``_dispatch_execute``, the engine directory's outputs.pb / error.pb), which are not public
API, so this runs in both CI legs (the oldest and the newest flytekit supported).

The executor runs in a fresh interpreter, as on a replica (its sandbox resets process state between tasks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

TASKS = textwrap.dedent(
    """
    from flytekitplugins.actor import ActorEnvironment

    actor = ActorEnvironment(name="executor-test")


    @actor.task
    def plus_one(x: int) -> int:
        return x + 1


    @actor.task
    def boom(x: int) -> int:
        raise ValueError(f"boom {x}")
    """
)

RUN = textwrap.dedent(
    """
    import json
    import os
    import sys

    from flytekit import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.models.literals import LiteralMap
    from flyteidl.core import literals_pb2

    from flytekitplugins.actor.protocol import lease_pb2
    from flytekitplugins.actor.worker.executor import (
        keep_engine_files_in_memory, run_flytekit_coroutines_inline, run_task,
    )
    from flytekitplugins.actor.worker.sandbox import TaskSandbox

    code_dir, scratch = sys.argv[1:]
    # As executor.serve does: flytekit's coroutines on this thread and its engine files in memory (with this
    # flytekit's internals).
    assert run_flytekit_coroutines_inline()
    assert keep_engine_files_in_memory()
    ctx = FlyteContextManager.current_context()
    x = TypeEngine.to_literal(ctx, 3, int, TypeEngine.to_literal_type(int))
    inputs = LiteralMap(literals={"x": x}).to_flyte_idl().SerializeToString()
    sandbox = TaskSandbox(scratch)
    results = {}
    for name in ("plus_one", "boom"):
        out = os.path.join(scratch, "out-" + name)
        os.makedirs(out)
        task_run = lease_pb2.TaskRun(
            task_name=name,
            resolver="flytekit.core.python_auto_container.default_task_resolver",
            resolver_args=["task-module", "executor_tasks", "task-name", name],
            inputs=inputs,
            output_prefix=out,
            raw_output_data_prefix=os.path.join(scratch, "raw"),
            dest_dir=code_dir,
        )
        result = run_task(task_run, sandbox, scratch)
        if result.get("outputs"):
            outputs = literals_pb2.LiteralMap.FromString(result["outputs"])
            result["o0"] = outputs.literals["o0"].scalar.primitive.integer
        results[name] = {k: result.get(k) for k in ("phase", "message", "retryable", "o0")}
    # Map elements leave their outputs.pb in their output prefix: a local one, and a remote one (fsspec's memory
    # file system, through flytekit's put_data); the engine files never touch the disk.
    import fsspec

    for prefix in (os.path.join(scratch, "element"), "memory://elements/0"):
        element = lease_pb2.TaskRun(
            task_name="plus_one", resolver="flytekit.core.python_auto_container.default_task_resolver",
            resolver_args=["task-module", "executor_tasks", "task-name", "plus_one"], inputs=inputs,
            output_prefix=prefix, raw_output_data_prefix=os.path.join(scratch, "raw"), dest_dir=code_dir,
            outputs_to_prefix=True,
        )
        result = run_task(element, sandbox, scratch)
        fs, path = fsspec.core.url_to_fs(prefix + "/outputs.pb")
        results[prefix.split(":")[0] if "://" in prefix else "local"] = (
            result["phase"], fs.cat(path) == result["outputs"] != b"", fs.ls(path.rsplit("/", 1)[0], detail=False))
    engine_dir = os.path.join(sandbox.workdir, "sandbox", "local_flytekit", "engine_dir")
    results["engine_dir"] = os.listdir(engine_dir) if os.path.isdir(engine_dir) else "missing"
    # What a task's context is made from (environment, prefixes) is made once per distinct environment: three runs
    # of the same task make one, a run with another variable in its environment makes its own.
    from flytekitplugins.actor.worker import executor as executor_module

    made = []
    executor_module._bases.clear()
    original_init = executor_module._ContextBase.__init__
    executor_module._ContextBase.__init__ = lambda self, *a: (made.append(a[0].task_name), original_init(self, *a))[1]
    for variable in ("", "", "", "other"):
        task_run = lease_pb2.TaskRun(
            task_name="plus_one" + variable, resolver="flytekit.core.python_auto_container.default_task_resolver",
            resolver_args=["task-module", "executor_tasks", "task-name", "plus_one"], inputs=inputs,
            output_prefix=os.path.join(scratch, "out-base"), raw_output_data_prefix=os.path.join(scratch, "raw"),
            dest_dir=code_dir, env={"SOME_VARIABLE": variable} if variable else {},
        )
        assert run_task(task_run, sandbox, scratch)["phase"] == "succeeded"
    results["bases"] = made
    import threading

    results["threads"] = sorted(t.name for t in threading.enumerate())
    print(json.dumps(results))
    """
)


def test_executor_runs_a_task_and_reports_a_user_error_with_the_installed_flytekit(tmp_path):
    code_dir, scratch = tmp_path / "code", tmp_path / "scratch"
    code_dir.mkdir()
    (code_dir / "executor_tasks.py").write_text(TASKS)
    script = tmp_path / "run_executor.py"
    script.write_text(RUN)
    run = subprocess.run(
        [sys.executable, str(script), str(code_dir), str(scratch)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.splitlines()[-1])
    assert results["plus_one"]["phase"] == "succeeded" and results["plus_one"]["o0"] == 4
    boom = results["boom"]
    assert boom["phase"] == "failed" and "boom 3" in boom["message"] and boom["retryable"] is False, boom
    assert results["local"][:2] == results["memory"][:2] == ["succeeded", True], results
    assert [p.rsplit("/", 1)[-1] for p in results["memory"][2]] == ["outputs.pb"], results["memory"]
    assert results["engine_dir"] == [], results["engine_dir"]
    assert results["bases"] == ["plus_one", "plus_oneother"], results["bases"]
    # flytekit's coroutines ran on the executor's thread: flytekit never started its loop thread.
    assert results["threads"] == ["MainThread"], results["threads"]


def _retiring_executor(conn) -> None:
    from flytekitplugins.actor.worker.executor import _retire

    _retire(conn, "the task left threads running: t")


def test_a_retiring_executor_hands_back_what_it_was_sent_and_exits_on_the_goodbye():
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    parent, child = mp.Pipe()
    process = mp.Process(target=_retiring_executor, args=(child,))
    process.start()
    assert parent.recv() == [("", {"retire": "the task left threads running: t"})]
    parent.send([("l1", b"run bytes"), ("l2", b"run bytes")])  # sent before the replica read the notice
    assert parent.recv() == [("l1", {"not_started": "the task left threads running: t"}),
                             ("l2", {"not_started": "the task left threads running: t"})]
    parent.send([])  # the goodbye
    process.join(timeout=30)
    assert process.exitcode == 0


def test_elements_whose_group_cannot_be_stored_are_reported_failed_not_succeeded(tmp_path):
    from types import SimpleNamespace

    from flytekitplugins.actor.protocol import element_groups, lease_pb2
    from flytekitplugins.actor.worker.executor import _store_groups

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    good, bad = str(tmp_path / "map" / "_actor" / "elements"), str(blocked / "_actor" / "elements")
    raw = str(tmp_path / "raw")  # as the connector sets it for every element
    runs = {"l0": lease_pb2.TaskRun(outputs_group_prefix=good, element_index=0, raw_output_data_prefix=raw),
            "l1": lease_pb2.TaskRun(outputs_group_prefix=good, element_index=1, raw_output_data_prefix=raw),
            "l2": lease_pb2.TaskRun(outputs_group_prefix=bad, element_index=2, raw_output_data_prefix=raw),
            "l3": lease_pb2.TaskRun(outputs_group_prefix=good, element_index=3, raw_output_data_prefix=raw),
            "l4": lease_pb2.TaskRun(element_index=4, raw_output_data_prefix=raw)}  # not grouped: its own outputs.pb
    succeeded = {"phase": "succeeded", "outputs": b"o", "outputs_size": 1, "run_seconds": 0.5}
    results = [("l0", dict(succeeded)), ("l1", dict(succeeded, outputs=b"")), ("l2", dict(succeeded)),
               ("l3", {"phase": "failed", "message": "user error", "run_seconds": 0.5}), ("l4", dict(succeeded))]
    _store_groups(results, runs, SimpleNamespace(workdir=str(tmp_path / "work")))
    got = dict(results)
    assert got["l0"]["outputs_group"] == got["l1"]["outputs_group"] == f"{good}/0-1.pb"
    assert element_groups.unpack((tmp_path / "map" / "_actor" / "elements" / "0-1.pb").read_bytes()) == {
        0: b"o", 1: b""}
    assert got["l2"]["phase"] == "failed" and got["l2"]["retryable"] and got["l2"]["system_error"], got["l2"]
    assert "could not be stored" in got["l2"]["message"] and bad in got["l2"]["message"]
    assert got["l2"]["run_seconds"] == 0.5 and "outputs" not in got["l2"]
    assert "outputs_group" not in got["l3"] and "outputs_group" not in got["l4"]


def test_a_batch_holds_results_of_quick_elements_for_the_flush_window_and_sends_slow_ones_at_once(monkeypatch):
    from types import SimpleNamespace

    from flytekitplugins.actor.protocol import lease_pb2
    from flytekitplugins.actor.worker import executor

    durations = {}
    clock = [0.0]  # the executor's clock, moved only by the elements

    def run_fast(run, sandbox, load_task, grouped=False):
        clock[0] += durations[run.element_index]
        return {"phase": "succeeded", "outputs": b"", "outputs_size": 0}

    monkeypatch.setattr(executor, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(executor, "_run_fast", run_fast)
    monkeypatch.setattr(executor, "_code_root", lambda run, root: root)
    monkeypatch.setattr(executor, "_enter_code_root", lambda run, root: None)
    monkeypatch.setattr(executor, "_store_groups", lambda pending, runs, sandbox: None)
    sandbox = SimpleNamespace(enter=lambda *a, **k: None, exit=lambda: None, end_task=lambda: None, restored=[],
                              guard=SimpleNamespace(leaked=""))
    progress = SimpleNamespace(position=-1, started=-1.0)

    def sends(seconds: list) -> list:
        durations.clear()
        durations.update(enumerate(seconds))
        runs = [(f"l{i}", lease_pb2.TaskRun(batch_key="m", element_index=i, inputs=b"x")) for i in range(len(seconds))]
        sent = []
        executor.run_batch(runs, sandbox, "/tmp", lambda results: sent.append([lease for lease, _ in results]),
                           progress)
        return sent

    quick = executor.BATCH_FLUSH_SECONDS * 0.3  # four fit in the window, and the rest at the batch's end
    assert sends([quick] * 10) == [["l0", "l1", "l2", "l3"], ["l4", "l5", "l6", "l7"], ["l8", "l9"]], (
        "quick elements' results go together")
    assert progress.position == 9 and progress.started == quick * 9, "the last element started after nine"
    instant = executor.BATCH_FLUSH_SECONDS * 0.001
    assert sends([instant] * 8) == [["l0", "l1", "l2", "l3"], ["l4", "l5", "l6", "l7"]], (
        "half the batch's results go as soon as they are there, so that the agent tops the queue up in time")
    slow = executor.BATCH_FLUSH_SECONDS * 2
    assert sends([slow, slow, slow]) == [["l0"], ["l1"], ["l2"]], "a slow element's result waited for the next"


def test_the_executors_inline_loop_still_lets_io_in_while_a_coroutine_spins():
    # The inline loop asks the kernel for I/O at most once a millisecond while callbacks are ready
    # (executor._BusySelector): a coroutine that waits for a socket must still be woken while another spins.
    import asyncio
    import socket
    import time

    from flytekitplugins.actor.worker import executor

    runner = executor._InlineRunner(fallback=None)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    async def spin_until_read() -> tuple:
        loop = asyncio.get_running_loop()
        received = asyncio.ensure_future(loop.sock_recv(ours, 1))
        loop.call_later(0.01, theirs.send, b"x")
        deadline, turns = time.monotonic() + 10, 0
        while not received.done() and time.monotonic() < deadline:
            await asyncio.sleep(0)
            turns += 1
        return (received.result() if received.done() else None), turns

    try:
        data, turns = runner.run(spin_until_read())
    finally:
        ours.close()
        theirs.close()
        runner.loop.close()
    assert data == b"x", "the socket's data never reached the coroutine waiting for it"
    assert turns > 0


def test_flytekit_timings_are_kept_for_a_task_with_a_deck_and_while_flytekit_logs_at_info():
    import logging
    from types import SimpleNamespace

    from flytekit.loggers import logger

    from flytekitplugins.actor.worker import executor

    deckless, with_deck = SimpleNamespace(disable_deck=True), SimpleNamespace(disable_deck=False)
    level = logger.level
    try:
        logger.setLevel(logging.WARNING)
        assert not executor._timings_needed(deckless) and executor._timings_needed(with_deck)
        logger.setLevel(logging.INFO)
        assert executor._timings_needed(deckless), "flytekit's INFO lines carry the timings"
    finally:
        logger.setLevel(level)
