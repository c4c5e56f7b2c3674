"""The replica runtime against real processes and real gRPC: a local-process fleet behind the connector."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest
from flyteidl.core.execution_pb2 import TaskExecution

import runtime_tasks as rt
from flytekitplugins.actor import map as actor_map
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
    plugin = output(fleet.run(rt.plugin_identity))
    assert output(fleet.run(rt.plugin_identity)) == plugin, "the plugin itself was wiped between tasks"


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


def live_processes(group: int):
    """Processes of a process group that are still running (zombies waiting for init to reap them are dead)."""
    live = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            live.append(int(pid))
    return live


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
        replica_group = output(resource)
        assert len(live_processes(replica_group)) >= 3  # the worker, its fork server and an executor
        fleet.wait_until(lambda: not fleet.launcher.processes, timeout=30, what="the TTL to stop the replica")
        assert not fleet.agent.scheduler.replicas
        # The fork server and executor die with the worker (a signal on its death), a moment after it on a busy
        # machine: a process still there after that is one the stop left running.
        fleet.wait_until(lambda: live_processes(replica_group) == [], timeout=10,
                         what="the stopped replica's fork server and executor to exit with it")
    finally:
        fleet.stop()


def test_a_replica_runs_parallelism_tasks_at_once(fleet, tmp_path):
    a = fleet.submit(rt.rendezvous, directory=str(tmp_path), me="a", other="b")
    b = fleet.submit(rt.rendezvous, directory=str(tmp_path), me="b", other="a")
    first, second = fleet.wait(a), fleet.wait(b)
    assert first.phase == second.phase == TaskExecution.SUCCEEDED, (first.message, second.message)
    assert output(first) == output(second), "the two tasks ran on different replicas"


def test_actor_map_honours_min_success_ratio_on_the_fleet(fleet):
    tolerant = fleet.wait(fleet.submit(actor_map(rt.odd_fails, concurrency=3, min_success_ratio=0.5), i=list(range(8))))
    assert tolerant.phase == TaskExecution.SUCCEEDED, tolerant.message
    values = [None if lit.scalar.none_type is not None else lit.scalar.primitive.value
              for lit in tolerant.outputs.literals["o0"].collection.literals]
    assert values == [0, None, 2, None, 4, None, 6, None]
    info = tolerant.custom_info
    assert (info["elements"], info["succeeded"], info["failed"], info["retries"]) == (8, 4, 4, 0)
    with open(info["progress"]) as page:  # written to the map's output prefix when it ended
        assert "<td>8</td><td>4</td><td>4</td>" in page.read()
    strict = fleet.wait(fleet.submit(actor_map(rt.odd_fails), i=[0, 1, 2]))
    assert strict.phase == TaskExecution.FAILED
    assert "ValueError: odd 1" in strict.message


def test_actor_map_with_bound_inputs_runs_every_element_once(fleet, tmp_path):
    log = str(tmp_path / "runs.log")
    resource = fleet.wait(fleet.submit(actor_map(functools.partial(rt.record, log=log)), i=list(range(30)), log=log))
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    assert [lit.scalar.primitive.value for lit in resource.outputs.literals["o0"].collection.literals] == [
        2 * i for i in range(30)]
    with open(log) as f:
        assert sorted(int(line) for line in f) == list(range(30))


def test_fast_registered_code_bundle_is_downloaded_once_and_run(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "bundled_tasks.py").write_text(textwrap.dedent('''
        from flytekitplugins.actor import ActorEnvironment

        actor = ActorEnvironment(name="bundled", replica_count=1)

        @actor.task
        def where(x: int) -> str:
            return f"{x}:{__file__}"
    '''))
    bundle = tmp_path / "fast-bundle.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(code / "bundled_tasks.py", arcname="bundled_tasks.py")
    sys.path.insert(0, str(code))
    try:
        import bundled_tasks
    finally:
        sys.path.remove(str(code))
    shutil.rmtree(code)  # from now on the code exists only in the bundle

    fleet = LocalFleet()
    try:
        from flytekit import FlyteContextManager
        from flytekit.core.type_engine import TypeEngine
        from flytekitplugins.actor.local import local_template

        ctx = FlyteContextManager.current_context()
        results = []
        for x in (1, 2):
            template, prefix = local_template(bundled_tasks.where, ctx)
            args = [a for a in template.container.args]
            at = args.index("--dynamic-dest-dir")
            del args[at:at + 2]
            template.container._args = ["pyflyte-fast-execute", "--additional-distribution", f"file://{bundle}",
                                        "--dest-dir", ".", "--", *args]
            inputs = TypeEngine.dict_to_literal_map(ctx, {"x": x}, bundled_tasks.where.get_input_types())
            import asyncio

            meta = asyncio.run(fleet.connector.create(template, prefix, inputs))
            results.append(fleet.wait(meta))
        assert [r.phase for r in results] == [TaskExecution.SUCCEEDED] * 2, [r.message for r in results]
        first, second = (output(r).split(":", 1) for r in results)
        assert first[0] == "1" and second[0] == "2"
        assert first[1] == second[1] and "bundles" in first[1], "the bundle was not unpacked once into the cache"
    finally:
        fleet.stop()


def test_a_quick_maps_queued_elements_share_a_session_unless_the_environment_turns_queueing_off(fleet):
    def counts(task) -> list:
        resource = fleet.wait(fleet.submit(actor_map(task), i=list(range(40))))
        assert resource.phase == TaskExecution.SUCCEEDED, resource.message
        return [lit.scalar.primitive.value for lit in resource.outputs.literals["o0"].collection.literals]

    # One replica: once the first element has finished quickly, the rest are queued on it and run in batches,
    # whose elements see what earlier elements of the same batch left in module globals.
    batched = counts(rt.seen_batched)
    assert max(batched) > 1 and batched.count(1) < 40
    # FLYTE_ACTOR_QUEUE_DEPTH=0 in the environment: one element per session, each starts from a fresh module.
    assert counts(rt.seen_unbatched) == [1] * 40


def test_a_quick_tasks_leases_queue_on_the_replica_yet_each_task_runs_in_a_fresh_session(fleet):
    assert output(fleet.run(rt.bump)) == 1  # from now on the agent knows bump to be quick
    scheduler = fleet.agent.scheduler
    beyond_free_slots = []
    queue_slot = scheduler._queue_slot

    def recording(*args):
        replica = queue_slot(*args)
        if replica is not None:
            beyond_free_slots.append(len(replica.leases))
        return replica

    scheduler._queue_slot = recording
    try:
        metas = [fleet.submit(rt.bump) for _ in range(30)]
        results = [fleet.wait(meta) for meta in metas]
    finally:
        del scheduler._queue_slot
    assert beyond_free_slots, "no lease of a quick task was queued on the replica beyond its free slot"
    assert [output(r) for r in results] == [1] * 30, "a queued task saw a module global of the one before it"

    # Finished: GetTask answers from the final view, without a trip to the agent's loop, and counts as read (a
    # draining agent no longer waits for these results).
    calls = []
    call = fleet.agent.call
    fleet.agent.call = lambda fn, *args: calls.append(fn) or call(fn, *args)
    try:
        assert [output(fleet.get(meta)) for meta in metas] == [1] * 30
    finally:
        del fleet.agent.call
    assert calls == []
    assert not fleet.on_loop(fleet.agent._drain_pending)


def test_a_timeout_in_a_batch_fails_the_element_that_hangs_not_one_finished_before_it(fleet):
    resource = fleet.wait(fleet.submit(actor_map(functools.partial(rt.hangs_at, at=6), min_success_ratio=0.5),
                                       i=list(range(12)), at=6))
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    values = [None if lit.scalar.none_type is not None else lit.scalar.primitive.value
              for lit in resource.outputs.literals["o0"].collection.literals]
    assert values == [None if i == 6 else i for i in range(12)]
    assert resource.custom_info["failed"] == 1


def test_quick_tasks_queued_behind_one_that_runs_long_are_recalled_and_run_on_another_replica(fleet):
    assert output(fleet.run(rt.nap, seconds=0.0)) == 0.0  # nap is known quick: its tasks are queued on replicas
    long = fleet.submit(rt.nap, seconds=10.0)
    fleet.wait_until(lambda: fleet.view(long).replica_id, what="the long nap's lease")
    quick = [fleet.submit(rt.nap, seconds=0.0) for _ in range(10)]
    for meta in quick:
        assert fleet.wait(meta, timeout=60).phase == TaskExecution.SUCCEEDED
    assert fleet.view(long).phase.name == "RUNNING", (
        "a quick task waited for the long one: those queued behind it were not recalled")
    tasks = fleet.on_loop(lambda: dict(fleet.agent.scheduler.tasks))
    recalled = [m.key for m in quick if tasks[m.key].given_back]
    assert recalled, "no quick task was queued behind the long one, so none was recalled: the test tests nothing"
    assert fleet.wait(long, timeout=60).phase == TaskExecution.SUCCEEDED
