"""Security controls against real processes (see docs/security.md): task code cannot read replica tokens, a
second stream for a live replica is refused while the first keeps working, a report for a lease another replica
holds is refused, and the agent server over TLS (client certificates required) runs a task end to end with
replicas on a TLS lease port, and answers a bad task with INVALID_ARGUMENT and one line."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service.agent_pb2_grpc import AsyncAgentServiceStub
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine

import security_tasks as st
from flyte_actor_agent.launchers.local import LocalProcessLauncher
from flyte_actor_agent.local_fleet import LocalFleet
from flyte_actor_agent.server import parse_args
from flytekitplugins.actor.local import local_template
from flytekitplugins.actor.protocol import PROTOCOL_VERSION, lease_pb2, lease_pb2_grpc
from harness import stop_served_agent


def output(resource) -> str:
    return resource.outputs.literals["o0"].scalar.primitive.string_value


def leased(fleet: LocalFleet, meta):
    """The task's (replica id, lease id) once it runs."""
    return fleet.wait_until(lambda: (lambda t: t.lease_id and (t.replica_id, t.lease_id))(
        fleet.on_loop(lambda: fleet.agent.scheduler.tasks[meta.key])), what="a lease")


class FakeReplica:
    """The test speaking the lease protocol as a replica would, over a real stream."""

    def __init__(self, address: str, replica_id: str, token: str, fleet_key: str):
        self._outbox: queue.Queue = queue.Queue()
        self._channel = grpc.insecure_channel(address)
        self.responses = lease_pb2_grpc.LeaseServiceStub(self._channel).Connect(iter(self._outbox.get, None))
        self.send(hello=lease_pb2.Hello(protocol_version=PROTOCOL_VERSION, environment_key=fleet_key,
                                        replica_id=replica_id, token=token, capacity=1))

    def send(self, **body) -> None:
        self._outbox.put(lease_pb2.ReplicaMessage(**body))

    def receive(self, kind: str):
        for message in self.responses:
            if message.WhichOneof("body") == kind:
                return getattr(message, kind)
        raise AssertionError(f"the stream ended before a {kind}")

    def close(self) -> None:
        self._outbox.put(None)
        self._channel.close()


# ----------------------------------------------------------------------------------------------- local fleet


def test_task_code_cannot_read_any_replica_token():
    fleet = LocalFleet()
    try:
        busy = fleet.submit(st.sleep_then, seconds=3.0, value="done")
        snoop = fleet.submit(st.snoop)
        fleet.wait_until(lambda: fleet.ready_replicas() == 2, what="both replicas")
        tokens = fleet.on_loop(lambda: [r.token for r in fleet.agent.scheduler.replicas.values()])
        pids = {str(fleet.launcher.pid(r)) for r in fleet.on_loop(lambda: list(fleet.agent.scheduler.replicas))}
        seen = fleet.wait(snoop)
        assert seen.phase == TaskExecution.SUCCEEDED, seen.message
        text = output(seen)
        assert len(tokens) == 2 and all(len(t) > 20 for t in tokens)
        assert not [t for t in tokens if t in text], "task code read a replica token"
        readable = set(text.splitlines()[-1].split())
        assert str(os.getpid()) in readable  # the task could read other processes' environments at all ...
        if os.geteuid() != 0:  # ... but not its replica's nor the other's (root may: see the test below)
            assert not pids & readable
        assert fleet.wait(busy).phase == TaskExecution.SUCCEEDED
    finally:
        fleet.stop()


def _fork(child) -> int:
    """Run ``child()`` in a forked process as one unprivileged user (nobody when the tests run as root, as task
    code and its replica share one user); it exits with what ``child`` returns."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = child()
        finally:
            os._exit(code)
    return pid


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_replica_process_is_not_readable_by_other_processes_of_its_user(mode):
    import ctypes

    from flytekitplugins.actor.worker.replica import _not_dumpable

    ready_read, ready_write = os.pipe()

    def hold() -> int:
        ctypes.CDLL(None).prctl(4, 1)  # PR_SET_DUMPABLE: changing user cleared it; start as a fresh exec would
        if mode == "closed":
            _not_dumpable()
        os.write(ready_write, b"r")
        time.sleep(60)
        return 0

    def read() -> int:
        try:
            with open(f"/proc/{holder}/environ", "rb") as f:
                f.read()
            return 0
        except PermissionError:
            return 13

    holder = _fork(hold)
    try:
        assert os.read(ready_read, 1) == b"r"
        reader = _fork(read)
        code = os.waitstatus_to_exitcode(os.waitpid(reader, 0)[1])
        # closed: refused; open (the same process without the call): readable, so the refusal means something.
        assert code == (13 if mode == "closed" else 0)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.close(ready_read)
        os.close(ready_write)


def test_a_second_stream_for_a_live_replica_is_refused_and_the_first_keeps_working():
    fleet = LocalFleet()
    try:
        meta = fleet.submit(st.sleep_then, seconds=2.0, value="from the real replica")
        replica_id, _ = leased(fleet, meta)
        replica = fleet.on_loop(lambda: fleet.agent.scheduler.replicas[replica_id])
        intruder = FakeReplica(fleet.agent.lease_address, replica_id, replica.token, replica.fleet_key)
        with pytest.raises(grpc.RpcError) as refused:
            intruder.receive("welcome")
        intruder.close()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS, refused.value.details()
        resource = fleet.wait(meta)
        assert resource.phase == TaskExecution.SUCCEEDED and output(resource) == "from the real replica"
        assert fleet.on_loop(lambda: fleet.agent.scheduler.replicas[replica_id].tasks_run) == 1
    finally:
        fleet.stop()


class OneRealReplica(LocalProcessLauncher):
    """Starts the first replica as a process and only records the launches after it, so the test can be them."""

    def __init__(self, on_exit):
        super().__init__(on_exit)
        self.recorded = []

    async def launch(self, replica):
        if self.processes or self.recorded:
            self.recorded.append(replica)
            return
        await super().launch(replica)


def test_a_report_for_a_lease_another_replica_holds_is_refused():
    fleet = LocalFleet(launcher_factory=OneRealReplica)
    try:
        real = fleet.submit(st.sleep_then, seconds=2.0, value="real outputs")
        _, real_lease = leased(fleet, real)
        queued = fleet.submit(st.sleep_then, seconds=0.0, value="second")
        launch = fleet.wait_until(lambda: fleet.launcher.recorded and fleet.launcher.recorded[0], what="a 2nd launch")
        forger = FakeReplica(fleet.agent.lease_address, launch.replica_id, launch.token, launch.fleet_key)
        forger.receive("welcome")
        forger.receive("assignment")  # the queued task: the forger is a replica of the fleet in good standing
        forged_outputs = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), {"o0": "forged"},
                                                        {"o0": str}).to_flyte_idl().SerializeToString()
        forger.send(status=lease_pb2.TaskStatus(lease_id=real_lease, phase=lease_pb2.SUCCEEDED, outputs=forged_outputs))
        assert forger.receive("ack").lease_id == real_lease  # acked, so it stops re-sending, and dropped
        assert fleet.view(real).phase.name == "RUNNING"
        resource = fleet.wait(real)
        forger.close()
        assert resource.phase == TaskExecution.SUCCEEDED and output(resource) == "real outputs"
        assert queued.key  # left to the forger; the fleet stops with it
    finally:
        fleet.stop()


def test_a_replica_without_batches_whose_stream_the_agent_closes_sees_it_end_cleanly():
    """A replica that predates queued leases (its Hello has no queue_depth) gets one message at a time; when the
    agent closes its stream (here: a second Hello for it), the stream ends with OK, not a server error."""
    fleet = LocalFleet(launcher_factory=OneRealReplica)
    try:
        leased(fleet, fleet.submit(st.sleep_then, seconds=2.0, value="real"))
        fleet.submit(st.sleep_then, seconds=0.0, value="second")
        launch = fleet.wait_until(lambda: fleet.launcher.recorded and fleet.launcher.recorded[0], what="a 2nd launch")
        old = FakeReplica(fleet.agent.lease_address, launch.replica_id, launch.token, launch.fleet_key)
        assert not old.receive("welcome").batches
        second = FakeReplica(fleet.agent.lease_address, launch.replica_id, launch.token, launch.fleet_key)
        with pytest.raises(grpc.RpcError) as refused:
            second.receive("welcome")
        second.close()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for _ in old.responses:  # the rest of the first stream, to its end
            pass
        assert old.responses.code() == grpc.StatusCode.OK, old.responses.details()
        old.close()
    finally:
        fleet.stop()


def test_a_resolver_missing_from_the_image_fails_for_good_instead_of_being_retried():
    fleet = LocalFleet()
    try:
        template = fleet.template(st.sleep_then)
        args = list(template.container.args)
        args[args.index("--resolver") + 1] = "no_such_package_here.resolver"
        template.container._args = args
        resource = asyncio.run(fleet.run_template(template, fleet.inputs(st.sleep_then, seconds=0.0, value="x")))
        assert resource.phase == TaskExecution.FAILED, resource.message
        assert "no_such_package_here" in resource.message and "image" in resource.message
    finally:
        fleet.stop()


# ------------------------------------------------------------------------------------------- the agent server


def test_the_server_listens_on_loopback_unless_told_otherwise():
    assert parse_args(["serve"]).host == "127.0.0.1"


def _certificates(directory: Path):
    """A self-signed CA (also the servers' certificate, for localhost and 127.0.0.1) and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, names=()):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, cert, key) -> tuple:
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_path), str(key_path)

    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    server = issue("localhost", server_key, server_name, server_key, True,
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = issue("flytepropeller", client_key, server_name, server_key, False)
    return write("server", server, server_key), write("client", client, client_key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_agent_server_over_tls_runs_a_task_and_answers_bad_ones_in_one_line(tmp_path):
    agent = Path(sys.executable).parent / "flyte-actor-agent"
    (server_cert, server_key), (client_cert, client_key) = _certificates(tmp_path)
    port, lease_port = _free_port(), _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(st.__file__).parent), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen(
        [str(agent), "serve", "--port", str(port), "--lease-port", str(lease_port), "--metrics-port", "0",
         "--tls-cert", server_cert, "--tls-key", server_key, "--tls-client-ca", server_cert,
         "--lease-tls-cert", server_cert, "--lease-tls-key", server_key, "--shutdown-grace-seconds", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    trusted = grpc.ssl_channel_credentials(read(server_cert), read(client_key), read(client_cert))
    channels = []
    try:
        channel = grpc.secure_channel(f"127.0.0.1:{port}", trusted)
        channels.append(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = AsyncAgentServiceStub(channel)

        ctx = FlyteContextManager.current_context()
        template, output_prefix = local_template(st.sleep_then, ctx)
        inputs = TypeEngine.dict_to_literal_map(ctx, {"seconds": 0.0, "value": "over tls"},
                                                st.sleep_then.get_input_types())
        created = stub.CreateTask(agent_pb2.CreateTaskRequest(
            template=template.to_flyte_idl(), inputs=inputs.to_flyte_idl(), output_prefix=output_prefix), timeout=10)
        deadline = time.monotonic() + 120
        while True:
            resource = stub.GetTask(agent_pb2.GetTaskRequest(
                task_category=agent_pb2.TaskCategory(name="actor", version=0), resource_meta=created.resource_meta),
                timeout=10).resource
            if resource.phase in (TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED):
                break
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.2)
        assert resource.phase == TaskExecution.SUCCEEDED, resource.message  # the replica leased it over TLS
        assert resource.outputs.literals["o0"].scalar.primitive.string_value == "over tls"

        template.custom["environment"]["replica_count"] = 0
        with pytest.raises(grpc.RpcError) as bad:
            stub.CreateTask(agent_pb2.CreateTaskRequest(template=template.to_flyte_idl(), inputs=inputs.to_flyte_idl(),
                                                        output_prefix=output_prefix), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "custom.environment.replica_count=0" in bad.value.details() and "\n" not in bad.value.details()
        assert "Traceback" not in bad.value.details()
        # A resource meta that does not parse is a permanent failure of that task, in one line (docs/reliability.md).
        garbage = stub.GetTask(agent_pb2.GetTaskRequest(task_category=agent_pb2.TaskCategory(name="actor", version=0),
                                                        resource_meta=b"\xff not json"), timeout=10).resource
        assert garbage.phase == TaskExecution.FAILED and "does not parse" in garbage.message
        assert "Traceback" not in garbage.message

        # Without a client certificate, or without TLS, nothing gets through.
        for credentials in (grpc.ssl_channel_credentials(read(server_cert)), None):
            other = grpc.secure_channel(f"127.0.0.1:{port}", credentials) if credentials else \
                grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(other)
            with pytest.raises(grpc.RpcError) as refused:
                AsyncAgentServiceStub(other).GetTask(agent_pb2.GetTaskRequest(
                    task_category=agent_pb2.TaskCategory(name="actor", version=0),
                    resource_meta=created.resource_meta), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for channel in channels:
            channel.close()
        stop_served_agent(process)
        log.close()
