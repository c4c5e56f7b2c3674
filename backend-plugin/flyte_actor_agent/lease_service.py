"""The lease service: the gRPC end of the replica lease protocol (``lease.proto``), one stream per replica.

It turns each replica's messages into calls on the reactor's public methods (``replica_connected``,
``heartbeat``, ``report``, ``stream_lost``) and the reactor's deliveries (a lease, an ack, a cancel, a drain)
into messages on that replica's stream. It runs on the reactor's loop and keeps no scheduling state of its own:
only which stream belongs to which replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Dict, List, Optional

import grpc

from flytekitplugins.actor.protocol import GRPC_OPTIONS, PROTOCOL_VERSION, lease_pb2, lease_pb2_grpc

from . import scheduler as core

if TYPE_CHECKING:
    from .reactor import Delivery, Reactor

log = logging.getLogger("flyte-actor-agent")

#: A stream that has not said Hello this long after it opened is closed.
HELLO_TIMEOUT_SECONDS = 10.0
#: Largest Hello accepted (ids, a token and the running lease ids of one replica take far less).
MAX_HELLO_BYTES = 64 * 1024
#: Acks to a replica that takes batched messages are sent together, this long after the first of them: one message
#: per replica every so often instead of one per task. An ack only lets the replica forget a result it keeps to
#: re-send after a reconnect (or finish a drain), so nothing waits for it but the replica's memory.
ACK_DELAY_SECONDS = 0.05

_OUTCOMES = {
    lease_pb2.SUCCEEDED: core.Outcome.SUCCEEDED,
    lease_pb2.FAILED: core.Outcome.FAILED,
    lease_pb2.LOST: core.Outcome.LOST,
    lease_pb2.CANCELLED: core.Outcome.CANCELLED,
}


class LeaseService(lease_pb2_grpc.LeaseServiceServicer):
    """Serves ``LeaseService.Connect`` on ``host:port`` (port 0: any free one); replicas are told to dial
    ``advertise_address`` (default: the host and the port bound). With ``credentials`` the port speaks TLS, and
    replicas verify it with ``ca_certificate`` (PEM), which launchers hand them."""

    def __init__(self, reactor: "Reactor", host: str = "127.0.0.1", port: int = 0,
                 advertise_address: Optional[str] = None, credentials: Optional[grpc.ServerCredentials] = None,
                 ca_certificate: str = "", hello_timeout: float = HELLO_TIMEOUT_SECONDS):
        self.reactor = reactor
        self.hello_timeout = hello_timeout
        self.host = host
        self.port = port
        self.advertise_address = advertise_address
        self.credentials = credentials
        self.ca_certificate = ca_certificate
        self.address = ""
        self._server: Optional[grpc.aio.Server] = None
        self._streams: Dict[str, asyncio.Queue] = {}
        #: Per replica that takes batched messages: the lease ids it is to be acked for (see ACK_DELAY_SECONDS).
        self._acks: Dict[str, List[str]] = {}

    async def start(self) -> None:
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(self, self._server)
        if self.credentials is not None:
            port = self._server.add_secure_port(f"{self.host}:{self.port}", self.credentials)
        else:
            port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen for replicas on {self.host}:{self.port}")
        await self._server.start()
        self.address = self.advertise_address or f"{self.host}:{port}"
        log.info("lease service listening on port %s; replicas dial %s", port, self.address)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1)

    # ------------------------------------------------------------------------------- from the reactor

    def deliver(self, effect: "Delivery") -> None:
        if isinstance(effect, core.Assign):
            message = lease_pb2.AgentMessage()
            message.assignment.lease_id = effect.lease_id
            message.assignment.task.MergeFromString(effect.task.payload)  # the connector's TaskRun bytes
        elif isinstance(effect, core.Ack):
            pending = self._acks.get(effect.replica_id)
            if pending is not None:
                if not pending:
                    asyncio.get_running_loop().call_later(ACK_DELAY_SECONDS, self._send_acks, effect.replica_id)
                pending.append(effect.lease_id)
                return
            message = lease_pb2.AgentMessage(ack=lease_pb2.Ack(lease_id=effect.lease_id))
        elif isinstance(effect, core.CancelLease):
            message = lease_pb2.AgentMessage(cancel=lease_pb2.Cancel(lease_id=effect.lease_id, reason=effect.reason))
        elif isinstance(effect, core.Recall):
            message = lease_pb2.AgentMessage(recall=lease_pb2.Recall(reason=effect.reason))
        else:
            message = lease_pb2.AgentMessage(drain=lease_pb2.Drain(reason=effect.reason))
        queue = self._streams.get(effect.replica_id)
        if queue is not None:
            queue.put_nowait(message)

    def _send_acks(self, replica_id: str) -> None:
        pending = self._acks.get(replica_id)
        if not pending:
            return
        self._acks[replica_id] = []
        queue = self._streams.get(replica_id)
        if queue is not None:
            queue.put_nowait(lease_pb2.AgentMessage(ack=lease_pb2.Ack(lease_id=pending[0], lease_ids=pending[1:])))

    def close(self, replica_id: str) -> None:
        queue = self._streams.pop(replica_id, None)
        if queue is not None:
            queue.put_nowait(None)

    # ------------------------------------------------------------------------------- from the replicas

    async def Connect(self, request_iterator, context):
        try:
            first = await asyncio.wait_for(context.read(), self.hello_timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no Hello within {self.hello_timeout:g}s of opening the lease stream")
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message on a lease stream must be Hello")
        size = first.ByteSize()
        if size > MAX_HELLO_BYTES:
            log.warning("refused a Hello of %d bytes from %s", size, loggable(context.peer()))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Hello is {size} bytes; at most {MAX_HELLO_BYTES} are accepted")
        hello = first.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease protocol version {hello.protocol_version} is not supported (this agent speaks "
                f"{PROTOCOL_VERSION}); use the same flytekitplugins-actor version in the image and the agent",
            )
        replica_id = hello.replica_id
        running = list(hello.running_lease_ids)
        try:
            self.reactor.authenticate(replica_id, hello.token, hello.environment_key)
        except core.ReplicaRefused as refused:
            log.warning("refused replica %s: %s", loggable(replica_id), loggable(str(refused)))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(refused))
        if replica_id in self._streams:
            # One live stream per replica: a second Hello is never swapped in. It is most often the replica itself,
            # reconnecting after a reset the agent has not noticed yet (a half-open connection can stay open for a
            # keepalive timeout): the old stream is closed, its leases kept for the reconnect, and this Hello
            # refused; the replica retries ALREADY_EXISTS at once and is then the only stream.
            log.warning("second stream for replica %s: closing the first, refusing this one", loggable(replica_id))
            self.close(replica_id)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"replica {replica_id} had a live lease stream; it was closed: reconnect")
        queue: asyncio.Queue = asyncio.Queue()
        # Mapped before the reactor hears of the replica, so the leases it hands out at once reach this stream;
        # no await between the check above and here, so two Hellos cannot both pass it.
        self._streams[replica_id] = queue
        try:
            abandoned = self.reactor.replica_connected(replica_id, hello.token, hello.environment_key, hello.capacity,
                                                       running, hello.queue_depth)
        except core.ReplicaRefused as refused:
            del self._streams[replica_id]
            log.warning("refused replica %s: %s", loggable(replica_id), loggable(str(refused)))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(refused))
        batches = hello.queue_depth > 0  # a replica that queues leases takes batched messages (lease.proto)
        if batches:
            self._acks[replica_id] = []
        welcome = lease_pb2.AgentMessage(welcome=lease_pb2.Welcome(
            heartbeat_interval_seconds=self.reactor.heartbeat_interval, abandoned_lease_ids=abandoned, batches=batches))
        await context.write(welcome)
        log.info("replica %s connected (worker %s, capacity %d)", loggable(replica_id), loggable(hello.worker_version),
                 hello.capacity)
        reader = asyncio.ensure_future(self._read(context, replica_id))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    break
                messages = [getter.result()]
                while batches and messages[-1] is not None and not queue.empty():
                    messages.append(queue.get_nowait())
                closed = messages[-1] is None  # close(): what came before it still goes out
                if closed:
                    messages.pop()
                for message in _batched(messages) if batches else messages:
                    await context.write(message)
                if closed:
                    break
        finally:
            reader.cancel()
            if getter is not None:
                getter.cancel()
            if self._streams.get(replica_id) is queue:
                # The stream ended while the replica was still ours: treat it as lost.
                del self._streams[replica_id]
                self._acks.pop(replica_id, None)  # it re-sends what was not acked, and is acked then
                self.reactor.stream_lost(replica_id)

    async def _read(self, context, replica_id: str) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            try:
                self._handle(replica_id, message)
            except Exception:  # noqa: BLE001 - one bad message must not end a healthy replica's stream
                log.exception("replica %s: a %s message could not be handled; the stream goes on",
                              loggable(replica_id), message.WhichOneof("body"))

    def _handle(self, replica_id: str, message: lease_pb2.ReplicaMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            self.reactor.heartbeat(replica_id, list(message.heartbeat.running_lease_ids))
        elif kind == "status":
            self._status(replica_id, message.status)
        elif kind == "statuses":
            for status in message.statuses.statuses:
                self._status(replica_id, status)
        else:
            log.warning("replica %s sent a %s message after Hello; ignored", loggable(replica_id), kind)

    def _status(self, replica_id: str, status: lease_pb2.TaskStatus) -> None:
        outcome = _OUTCOMES.get(status.phase)
        if outcome is None:
            log.warning("replica %s sent a status with no phase for lease %s", loggable(replica_id),
                        loggable(status.lease_id))
            return
        self.reactor.report(replica_id, status.lease_id, outcome,
                            outputs=None if status.outputs_in_prefix else status.outputs,
                            error=status.error or None, message=status.message, retryable=status.retryable,
                            run_seconds=status.run_seconds, outputs_size=status.outputs_size,
                            system_error=status.system_error, stored_at=status.outputs_group)


def _batched(messages: List[lease_pb2.AgentMessage]) -> List[lease_pb2.AgentMessage]:
    """``messages`` in fewer messages: every ack in one Ack (acks may pass anything), and each run of
    assignments in one Assignments (the order of a lease's assignment and its cancel is kept)."""
    acks = [m.ack.lease_id for m in messages if m.WhichOneof("body") == "ack"]
    out: List[lease_pb2.AgentMessage] = []
    if acks:
        out.append(lease_pb2.AgentMessage(ack=lease_pb2.Ack(lease_id=acks[0], lease_ids=acks[1:])))
    run: List[lease_pb2.Assignment] = []
    for message in messages:
        kind = message.WhichOneof("body")
        if kind == "assignment":
            run.append(message.assignment)
        elif kind != "ack":
            if run:
                out.append(_assignments(run))
                run = []
            out.append(message)
    if run:
        out.append(_assignments(run))
    return out


def _assignments(run: List[lease_pb2.Assignment]) -> lease_pb2.AgentMessage:
    if len(run) == 1:
        return lease_pb2.AgentMessage(assignment=run[0])
    message = lease_pb2.AgentMessage()
    message.assignments.assignments.extend(run)
    return message


def loggable(value: str, limit: int = 120) -> str:
    """``value`` as it may go into a log line: quoted and escaped (no forged lines), and cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} characters)"
