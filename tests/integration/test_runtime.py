"""The replica runtime against real processes and real gRPC: a local-process fleet behind the connector."""

import os
import signal
import subprocess
import sys

import pytest
from flyteidl.core.execution_pb2 import TaskExecution

import runtime_tasks as rt
from harness import LocalFleet, output

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def fleet():
    fleet = LocalFleet()
    yield fleet
    fleet.stop()


def test_state_is_wiped_between_tasks_but_actor_cache_survives(fleet):
    replica = output(fleet.run(rt.whoami))
    assert output(fleet.run(rt.bump)) == 1
    assert output(fleet.run(rt.bump)) == 1, "a module global leaked from the previous task"
    assert output(fleet.run(rt.set_env)) == "leaked"
    assert output(fleet.run(rt.read_env)) == "|True", "an env var or the working directory leaked"
    first = output(fleet.run(rt.cached_token))
    assert output(fleet.run(rt.cached_token)) == first, "@actor_cache lost its entry between tasks"
    assert output(fleet.run(rt.whoami)) == replica, "the tasks did not share one replica"


def test_user_exception_fails_with_its_message(fleet):
    resource = fleet.run(rt.fail, message="bad input 42")
    assert resource.phase == TaskExecution.FAILED
    assert "ValueError: bad input 42" in resource.message


def test_sys_exit_fails_the_task_and_the_replica_survives(fleet):
    replica = output(fleet.run(rt.whoami))
    resource = fleet.run(rt.exit_task, code=3)
    assert resource.phase == TaskExecution.FAILED
    assert "sys.exit(3)" in resource.message
    assert output(fleet.run(rt.whoami)) == replica


def test_leaked_thread_does_not_block_the_next_task(fleet):
    assert fleet.run(rt.leak_thread).phase == TaskExecution.SUCCEEDED
    assert output(fleet.run(rt.bump)) == 1


def test_executor_killed_by_the_kernel_is_reported_lost_then_retryable(fleet):
    replica = output(fleet.run(rt.whoami))
    resource = fleet.run(rt.die)
    assert resource.phase == TaskExecution.RETRYABLE_FAILED
    assert "lost 3 times" in resource.message and "SIGKILL" in resource.message
    # A fresh executor took the dead one's place on the same replica.
    assert output(fleet.run(rt.whoami)) == replica


def test_task_timeout_is_a_retryable_failure(fleet):
    resource = fleet.run(rt.too_slow)
    assert resource.phase == TaskExecution.RETRYABLE_FAILED
    assert "exceeded its timeout of 2s" in resource.message
    assert output(fleet.run(rt.bump)) == 1


def test_cancel_queued_and_running_tasks(fleet):
    running = fleet.submit(rt.sleep_for, seconds=60.0)
    fleet.wait_until(lambda: fleet.get(running).phase == TaskExecution.RUNNING, what="the long task to start")
    queued = fleet.submit(rt.sleep_for, seconds=1.0)
    assert fleet.get(queued).phase in (TaskExecution.QUEUED, TaskExecution.WAITING_FOR_RESOURCES)
    fleet.cancel(queued)
    assert fleet.get(queued).phase == TaskExecution.ABORTED
    fleet.cancel(running)
    assert fleet.get(running).phase == TaskExecution.ABORTED
    # The replica stopped the running task and took the next one on a clean executor.
    assert output(fleet.run(rt.sleep_for, seconds=0.0)) == 0.0


def test_replica_killed_mid_task_is_replaced_and_the_task_completes(fleet):
    meta = fleet.submit(rt.sleep_for, seconds=2.0)
    view = fleet.wait_until(lambda: (v := fleet.view(meta)).replica_id and v, what="a lease")
    pid = fleet.launcher.pid(view.replica_id)
    os.kill(pid, signal.SIGKILL)
    resource = fleet.wait(meta)
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    assert output(resource) == 2.0
    assert fleet.view(meta).replica_id != view.replica_id


def test_five_hundred_tasks_on_four_replicas_run_exactly_once(fleet, tmp_path):
    log = str(tmp_path / "runs.log")
    metas = [fleet.submit(rt.record, i=i, log=log) for i in range(500)]
    results = [fleet.wait(m) for m in metas]
    assert [output(r) for r in results] == [2 * i for i in range(500)]
    with open(log) as f:
        runs = sorted(int(line) for line in f)
    assert runs == list(range(500)), "a task ran twice or not at all"
    replicas = {fleet.view(m).replica_id for m in metas}
    assert 1 < len(replicas) <= 4


def test_replicas_that_cannot_start_fail_the_task_fast_with_their_error(fleet):
    resource = fleet.run(rt.never_runs)
    assert resource.phase == TaskExecution.FAILED
    assert "cannot start" in resource.message
    assert "PYTHONMALLOC" in resource.message, resource.message  # the replica's own error output


def _worker(env_updates):
    env = dict(os.environ, **env_updates)
    return subprocess.run(
        [sys.executable, "-m", "flytekitplugins.actor.worker.replica"],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_worker_with_wrong_token_or_unknown_id_is_refused(fleet):
    meta = fleet.submit(rt.sleep_for, seconds=3.0)
    view = fleet.wait_until(lambda: (v := fleet.view(meta)).replica_id and v, what="a lease")
    replica = fleet.agent.scheduler.replicas[view.replica_id]
    base = {
        "FLYTE_ACTOR_AGENT_ADDRESS": fleet.agent.lease_address,
        "FLYTE_ACTOR_ENVIRONMENT_KEY": replica.fleet_key,
        "FLYTE_ACTOR_RECONNECT_SECONDS": "2",
    }
    wrong_token = _worker({**base, "FLYTE_ACTOR_REPLICA_ID": replica.id, "FLYTE_ACTOR_REPLICA_TOKEN": "guess"})
    unknown = _worker({**base, "FLYTE_ACTOR_REPLICA_ID": "intruder", "FLYTE_ACTOR_REPLICA_TOKEN": replica.token})
    for result in (wrong_token, unknown):
        assert result.returncode == 3, result.stderr
        assert "refused" in result.stderr
    # The real replica was not disturbed.
    assert fleet.wait(meta).phase == TaskExecution.SUCCEEDED


def test_idle_replicas_are_stopped_after_their_ttl_and_leave_no_process():
    fleet = LocalFleet()
    try:
        meta = fleet.submit(rt.whoami, ttl_seconds=1)
        resource = fleet.wait(meta)
        assert resource.phase == TaskExecution.SUCCEEDED
        replica_pid = output(resource)
        fleet.wait_until(lambda: not fleet.launcher.processes, timeout=30, what="the TTL to stop the replica")
        assert not fleet.agent.scheduler.replicas
        with pytest.raises(ProcessLookupError):
            os.killpg(replica_pid, 0)  # no process of the replica's group is left
    finally:
        fleet.stop()
