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
