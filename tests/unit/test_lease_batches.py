"""The agent's side of batched lease-stream messages (``lease_service._batched``)."""

from flyte_actor_agent.lease_service import _batched
from flytekitplugins.actor.protocol import lease_pb2


def agent(kind: str, lease_id: str) -> lease_pb2.AgentMessage:
    if kind == "assignment":
        return lease_pb2.AgentMessage(assignment=lease_pb2.Assignment(lease_id=lease_id))
    if kind == "ack":
        return lease_pb2.AgentMessage(ack=lease_pb2.Ack(lease_id=lease_id))
    return lease_pb2.AgentMessage(cancel=lease_pb2.Cancel(lease_id=lease_id))


def test_the_agent_merges_acks_and_runs_of_assignments_and_keeps_a_cancel_after_its_assignment():
    messages = [agent("ack", "1"), agent("assignment", "a"), agent("ack", "2"), agent("assignment", "b"),
                agent("cancel", "b"), agent("assignment", "c")]
    out = _batched(messages)
    assert [m.WhichOneof("body") for m in out] == ["ack", "assignments", "cancel", "assignment"]
    assert [out[0].ack.lease_id, *out[0].ack.lease_ids] == ["1", "2"]
    assert [a.lease_id for a in out[1].assignments.assignments] == ["a", "b"]
    assert (out[2].cancel.lease_id, out[3].assignment.lease_id) == ("b", "c")


def test_acks_to_a_replica_that_takes_batches_go_out_together_after_a_short_delay_others_at_once():
    import asyncio

    from flyte_actor_agent import lease_service
    from flyte_actor_agent.scheduler import Ack

    async def scenario():
        service = lease_service.LeaseService(reactor=None)
        batching, plain = asyncio.Queue(), asyncio.Queue()
        service._streams.update(batching=batching, plain=plain)
        service._acks["batching"] = []  # its Hello had a queue_depth (see Connect)
        for lease in ("1", "2", "3"):
            service.deliver(Ack("batching", lease))
            service.deliver(Ack("plain", lease))
        assert batching.empty(), "acked at once, one message per lease"
        assert [plain.get_nowait().ack.lease_id for _ in range(3)] == ["1", "2", "3"]
        await asyncio.sleep(lease_service.ACK_DELAY_SECONDS * 2)
        (message,) = [batching.get_nowait() for _ in range(batching.qsize())]
        assert [message.ack.lease_id, *message.ack.lease_ids] == ["1", "2", "3"]
        service.deliver(Ack("batching", "4"))  # the next ones wait for a timer of their own
        await asyncio.sleep(lease_service.ACK_DELAY_SECONDS * 2)
        assert batching.get_nowait().ack.lease_id == "4" and batching.empty()

    asyncio.run(scenario())
