"""A task leaves nothing behind in its replica (worker/sandbox.py: ProcessGuard), through real replicas: process
settings and monkeypatches are put back, child processes ended, atexit handlers run, an executor with a leaked
thread replaced, and ``limits.mem`` enforced on local executors."""

import os

import pytest
from flyteidl.core.execution_pb2 import TaskExecution

import hygiene_tasks as ht
from flytekitplugins.actor import map as actor_map
from harness import LocalFleet, output

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def fleet():
    fleet = LocalFleet()
    yield fleet
    fleet.stop()


def _processes_running(command: str):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == command.encode().split(b" "):
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(pid))
        except OSError:
            continue
    return found


def test_the_next_task_finds_the_process_as_it_was(fleet, tmp_path):
    marker = tmp_path / "atexit"
    before = set(_processes_running("sleep 600"))
    messy = fleet.run(ht.make_a_mess, marker=str(marker))
    assert messy.phase == TaskExecution.SUCCEEDED, messy.message
    assert marker.read_text() == "ran", "the task's atexit handler did not run at the end of the task"
    assert set(_processes_running("sleep 600")) == before, "a process the task started outlived it"
    assert output(fleet.run(ht.inspect_process)) == "clean"
    assert output(fleet.run(ht.executor_pid)) == output(messy), "a task that left no thread replaced its executor"


def test_an_executor_whose_task_left_a_thread_running_is_replaced(fleet):
    leaky = output(fleet.run(ht.leak_a_thread))
    assert output(fleet.run(ht.executor_pid)) != leaky


def test_limits_mem_caps_a_local_executor():
    fleet = LocalFleet()
    try:
        too_much = fleet.run(ht.allocate, mib=2048)
        assert too_much.phase in (TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED)
        assert "MemoryError" in too_much.message, too_much.message
        assert output(fleet.run(ht.allocate, mib=64)) == 64  # the executor lives on
    finally:
        fleet.stop()


def test_a_map_whose_elements_leave_threads_running_loses_and_repeats_no_element(fleet):
    # Elements queue on the replica; each batch's executor retires after it, and hands back what it was sent
    # meanwhile: given back, not lost, so no element is retried.
    resource = fleet.wait(fleet.submit(actor_map(ht.leak_in_map), i=list(range(16))))
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    assert [lit.scalar.primitive.value for lit in resource.outputs.literals["o0"].collection.literals] == list(range(16))
    assert resource.custom_info["retries"] == 0, resource.custom_info
