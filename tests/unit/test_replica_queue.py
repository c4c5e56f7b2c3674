"""The replica's queue of leases and its batches (``worker/replica.py``), with the executor replaced by a pipe
that records what it is sent (the agent's side of batched messages: ``test_lease_batches.py``)."""

import asyncio
from typing import List

import grpc
import pytest

from flytekitplugins.actor.protocol import lease_pb2
from flytekitplugins.actor.worker import replica as replica_module
from flytekitplugins.actor.worker.replica import Config, ReplicaWorker


class FakeConn:
    def __init__(self):
        self.sent: List[list] = []
        self.results: List[list] = []

    def send(self, batch):
        self.sent.append([lease_id for lease_id, _ in batch])

    def recv(self):
        if not self.results:
            raise EOFError
        return self.results.pop(0)

    def fileno(self):
        return -1

    def close(self):
        pass


class FakeProcess:
    exitcode = -9

    def join(self, timeout=None):
        pass

    def is_alive(self):
        return False


def assignment(lease_id: str, batch_key: str = "m") -> lease_pb2.Assignment:
    return lease_pb2.Assignment(lease_id=lease_id, task=lease_pb2.TaskRun(task_name="t", batch_key=batch_key))


def succeeded(*lease_ids: str) -> list:
    return [(lease_id, {"phase": "succeeded", "outputs": b"", "outputs_size": 0}) for lease_id in lease_ids]


@pytest.fixture
def worker(monkeypatch):
    monkeypatch.setattr(replica_module, "start_forkserver", lambda: False)
    loop = asyncio.new_event_loop()

    async def make():
        w = ReplicaWorker(Config(agent_address="agent:1", environment_key="e", replica_id="r", token="t",
                                 parallelism=1, queue_depth=3, scratch_dir="/tmp"))
        w.loop.remove_reader = lambda fd: None
        w._start_slot = lambda slot: None
        for slot in w.slots:
            slot.conn, slot.process = FakeConn(), FakeProcess()
        return w

    w = loop.run_until_complete(make())
    yield w
    loop.close()


def reported(worker: ReplicaWorker) -> dict:
    return {lease_id: lease_pb2.TaskPhase.Name(s.phase) for lease_id, s in worker.unacked.items()}


def test_one_maps_queued_elements_go_to_the_executor_as_one_batch_and_a_lone_task_alone(worker):
    slot = worker.slots[0]
    worker._assign([assignment("a"), assignment("b"), assignment("c"), assignment("x", batch_key="")])
    assert slot.conn.sent == [["a", "b", "c"]]
    assert worker._held() == ["a", "b", "c", "x"]
    slot.conn.results = [succeeded("a", "b")]
    worker._on_executor_readable(slot)
    assert reported(worker) == {"a": "SUCCEEDED", "b": "SUCCEEDED"} and slot.lease_ids == ["c"]
    slot.conn.results = [succeeded("c")]
    worker._on_executor_readable(slot)
    assert slot.conn.sent[-1] == ["x"], "the slot freed: the queued lone task starts"


def test_leases_beyond_the_slots_and_the_queue_depth_are_given_back(worker):
    worker._assign([assignment(f"l{i}") for i in range(5)])
    assert reported(worker) == {"l4": "CANCELLED"}


def test_an_executor_dying_mid_batch_loses_the_running_element_and_gives_back_the_rest(worker):
    slot = worker.slots[0]
    worker._assign([assignment("a"), assignment("b"), assignment("c")])
    slot.conn.results = [succeeded("a")]
    worker._on_executor_readable(slot)
    worker._on_executor_readable(slot)  # EOF: the executor died running b
    assert reported(worker) == {"a": "SUCCEEDED", "b": "LOST", "c": "CANCELLED"}
    assert "killed by SIGKILL" in worker.unacked["b"].message and slot.free


def test_a_cancel_of_a_batch_element_not_started_reports_it_once_and_drops_its_result(worker):
    slot = worker.slots[0]
    worker._assign([assignment("a"), assignment("b")])
    cancelled = lease_pb2.TaskStatus(lease_id="b", phase=lease_pb2.CANCELLED, message="aborted")
    worker._stop_lease("b", cancelled)
    assert reported(worker) == {"b": "CANCELLED"} and worker._held() == ["a"]
    worker.unacked.clear()
    slot.conn.results = [succeeded("a", "b")]
    worker._on_executor_readable(slot)
    assert reported(worker) == {"a": "SUCCEEDED"} and slot.free


def test_a_drain_gives_back_what_is_queued(worker):
    worker._assign([assignment("a", batch_key=""), assignment("b", batch_key="")])
    worker._drain("signal SIGTERM")
    assert reported(worker) == {"b": "CANCELLED"} and worker._held() == ["a"]


def test_a_retiring_executor_gets_nothing_more_and_what_it_hands_back_is_given_back(worker):
    slot = worker.slots[0]
    worker._assign([assignment("a", batch_key=""), assignment("b", batch_key="")])  # b waits in the queue
    assert slot.conn.sent == [["a"]]
    # Its task left a thread running: the result, then the notice, and the executor waits for our goodbye.
    slot.conn.results = [succeeded("a") + [("", {"retire": "the task left threads running: t"})]]
    worker._on_executor_readable(slot)
    assert reported(worker) == {"a": "SUCCEEDED"}
    assert slot.conn.sent == [["a"], []], "b went to the retiring executor, or no goodbye was said"
    assert worker._held() == ["b"] and not slot.free
    worker._on_executor_died(slot)  # it exits; a clean executor takes the slot and gets b
    assert slot.conn.sent[-1] == ["b"]


def test_what_a_retiring_executor_was_sent_before_it_said_so_is_given_back(worker):
    slot = worker.slots[0]
    worker._assign([assignment("a"), assignment("b"), assignment("c")])
    slot.conn.results = [succeeded("a") + [("", {"retire": "threads"}), ("b", {"not_started": "threads"}),
                                           ("c", {"not_started": "threads"})]]
    worker._on_executor_readable(slot)
    assert reported(worker) == {"a": "SUCCEEDED", "b": "CANCELLED", "c": "CANCELLED"}


def test_a_replica_counts_the_agent_lost_from_the_last_stream_not_the_first(worker):
    # Reconnect budget 0.8 s; the replica retries every 0.5 s. The stream drops once, comes back (a Welcome), stays
    # up 0.6 s, drops again: the agent has been unreachable for no time at all, so the replica reconnects instead of
    # exiting (it used to count from the first drop, 1.1 s before, and exit: a healthy replica was replaced after a
    # second TCP reset in tests/chaos).
    worker.config.reconnect_seconds = 0.8
    calls = []

    def dropped():
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "Connection reset by peer")

    async def session():
        calls.append(worker.loop.time())
        if len(calls) == 2:
            worker.welcomed = True
            await asyncio.sleep(0.6)
        if len(calls) == 4:
            worker.stopped.set()
            return
        raise dropped()

    worker._session = session
    assert worker.loop.run_until_complete(worker.run()) == 0
    assert len(calls) == 4

    # Never welcomed: unreachable from the first failure on, and it gives up after the budget.
    calls.clear()
    worker.stopped.clear()

    async def never():
        calls.append(worker.loop.time())
        raise dropped()

    worker._session = never
    assert worker.loop.run_until_complete(worker.run()) == 1
    assert len(calls) == 3 and calls[-1] - calls[0] >= 0.8


def test_statuses_wait_briefly_for_the_next_while_leases_remain_and_the_last_one_goes_at_once(worker):
    class Call:
        def __init__(self):
            self.written = []

        async def write(self, message):
            self.written.append(message)

    async def scenario():
        call = Call()
        worker.batches = True  # the agent's Welcome said it takes StatusBatch
        worker.outbox = asyncio.Queue()
        writer = asyncio.ensure_future(worker._write(call))
        try:
            slot = worker.slots[0]
            worker._assign([assignment("a"), assignment("b"), assignment("c")])
            for lease in ("a", "b"):
                slot.conn.results = [succeeded(lease)]
                worker._on_executor_readable(slot)
                await asyncio.sleep(0)
            await asyncio.sleep(replica_module.STATUS_BATCH_SECONDS * 3)
            assert [[s.lease_id for s in m.statuses.statuses] for m in call.written] == [["a", "b"]]
            slot.conn.results = [succeeded("c")]  # the last lease it holds: nothing to wait for
            worker._on_executor_readable(slot)
            for _ in range(3):
                await asyncio.sleep(0)
            assert len(call.written) == 2 and call.written[-1].status.lease_id == "c"
        finally:
            writer.cancel()

    worker.loop.run_until_complete(scenario())


def test_a_timeout_or_death_is_charged_to_the_running_element_not_to_finished_ones_whose_results_wait(worker):
    from types import SimpleNamespace

    slot = worker.slots[0]
    worker._assign([assignment(lease) for lease in "abcd"])
    slot.progress = SimpleNamespace(position=2, started=0.0)  # a and b finished, their results not sent; c runs
    killed = []
    slot.kill = lambda: killed.append(True)
    worker._stop_lease("a", lease_pb2.TaskStatus(lease_id="a", phase=lease_pb2.CANCELLED, message="aborted"))
    assert not killed and reported(worker) == {"a": "CANCELLED"}, "a finished: its result is dropped, no kill"
    worker.unacked.clear()
    worker._time_out(slot)
    assert killed and slot.kill_reason.lease_id == "c" and "exceeded its timeout" in slot.kill_reason.message
    worker._on_executor_died(slot)
    assert reported(worker) == {"b": "CANCELLED", "c": "FAILED", "d": "CANCELLED"}
    assert "before it sent the task's result" in worker.unacked["b"].message
    assert "before the task started" in worker.unacked["d"].message

    worker.unacked.clear()
    worker._assign([assignment(lease) for lease in "efg"])
    slot.progress = SimpleNamespace(position=1, started=0.0)  # e finished, f runs when the executor dies
    worker._on_executor_died(slot)
    assert reported(worker) == {"e": "CANCELLED", "f": "LOST", "g": "CANCELLED"}


def test_a_timeout_counts_from_the_running_elements_own_start_not_from_when_earlier_results_came(worker):
    import time
    from types import SimpleNamespace

    slot = worker.slots[0]
    killed = []
    slot.kill = lambda: killed.append(True)
    batch = [assignment(lease) for lease in "abc"]
    for a in batch:
        a.task.timeout_seconds = 60
    worker._assign(batch)
    assert 59 < slot.timer.when() - worker.loop.time() <= 60, "the first element is timed from when it was sent"

    # a finished 50 s after it started, its result waits to be sent with others; b started 10 s ago.
    slot.progress = SimpleNamespace(position=1, started=time.monotonic() - 10)
    worker._time_out(slot)  # the timer set for a fires
    assert not killed, "b has run 10 of its 60 seconds"
    assert 49 < slot.timer.when() - worker.loop.time() <= 50, "b is timed from its own start"

    slot.conn.results.append(succeeded("a"))
    worker._on_executor_readable(slot)
    assert 49 < slot.timer.when() - worker.loop.time() <= 50, "a's result does not restart b's time"

    slot.progress = SimpleNamespace(position=1, started=time.monotonic() - 61)
    worker._time_out(slot)
    assert killed and slot.kill_reason.lease_id == "b" and "exceeded its timeout of 60s" in slot.kill_reason.message


def test_a_recall_gives_back_the_queued_leases_and_keeps_what_an_executor_has(worker):
    slot = worker.slots[0]
    killed = []
    slot.kill = lambda: killed.append(True)
    worker._assign([assignment(lease, batch_key="") for lease in "abc"])
    assert slot.lease_ids == ["a"] and [q.lease_id for q in worker.queued] == ["b", "c"]
    worker._handle(lease_pb2.AgentMessage(recall=lease_pb2.Recall(reason="a long task")))
    assert reported(worker) == {"b": "CANCELLED", "c": "CANCELLED"} and not worker.queued and not killed
    assert worker.unacked["b"].message == "recalled by the agent: a long task"
    assert slot.lease_ids == ["a"], "the running task goes on"

    worker.unacked.clear()
    slot.conn.results.append(succeeded("a"))
    worker._on_executor_readable(slot)
    worker._assign([assignment(lease) for lease in "xyz"])  # one map's elements: one batch in the executor
    worker._handle(lease_pb2.AgentMessage(recall=lease_pb2.Recall(reason="a long task")))
    assert slot.lease_ids == ["x", "y", "z"] and "x" not in worker.unacked, (
        "elements an executor has are kept (taking one back would run it twice)")
