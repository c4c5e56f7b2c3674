"""The chaos tier: each scenario injects one kind of fault into a real local fleet (real processes, real gRPC)
while tasks run, then counts what became of them (see ``chaos.Counts``) and asserts that nothing was lost, hung,
run twice on a healthy replica or left running. The table of counts is in docs/reliability.md."""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

import grpc
import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service import agent_pb2_grpc
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine

import chaos_tasks as ct
from chaos import Counts, Proxy, ScenarioProcesses, duplicates, wait_for
from flyte_actor_agent import scheduler as core
from flyte_actor_agent.launchers.local import LocalProcessLauncher
from flyte_actor_agent.lease_service import LeaseService
from flyte_actor_agent.local_fleet import LocalFleet
from flytekitplugins.actor import map as actor_map
from flytekitplugins.actor.local import local_template
from flytekitplugins.actor.protocol import GRPC_OPTIONS, PROTOCOL_VERSION, lease_pb2, lease_pb2_grpc

pytestmark = pytest.mark.timeout(240)

#: Heartbeats every second: a silent replica is dropped after 6 s, a ghost lease found after about 2 s.
HEARTBEAT = 1.0
#: How long a scenario's tasks may take before the ones not done count as hung.
SETTLE_SECONDS = 120


class Scenario:
    """A fleet (optionally behind a proxy), the scenario's processes, and its counts."""

    def __init__(self, name: str, tmp_path, proxy: bool = False, **options):
        self.processes = ScenarioProcesses()
        self.proxy = Proxy() if proxy else None
        self.log_dir = str(tmp_path / "runs")
        os.makedirs(self.log_dir)
        channel = LeaseService
        if self.proxy is not None:
            self.proxy.target = _free_port()
            channel = functools.partial(LeaseService, port=self.proxy.target, advertise_address=self.proxy.address)
        if "hello_timeout" in options:
            channel = functools.partial(channel, hello_timeout=options.pop("hello_timeout"))
        self.fleet = LocalFleet(channel_factory=channel, heartbeat_interval=HEARTBEAT, **options)
        self.counts = Counts(name)

    # ------------------------------------------------------------------------------------------ the fleet

    def replicas(self, state: Optional[core.ReplicaState] = None) -> dict:
        """Replica id -> process id, of replicas in ``state`` (any, by default) that have a process."""
        def read():
            return {r.id: self.fleet.launcher.pid(r.id) for r in self.fleet.agent.scheduler.replicas.values()
                    if (state is None or r.state is state) and self.fleet.launcher.pid(r.id)}
        return self.fleet.on_loop(read)

    def busy_replicas(self) -> dict:
        def read():
            return {r.id: self.fleet.launcher.pid(r.id) for r in self.fleet.agent.scheduler.replicas.values()
                    if r.state is core.ReplicaState.READY and r.leases and self.fleet.launcher.pid(r.id)}
        return self.fleet.on_loop(read)

    def submit_map(self, task, n: int, seconds: float):
        bound = functools.partial(task, seconds=seconds, log_dir=self.log_dir)
        self.counts.submitted += n
        return self.fleet.submit(actor_map(bound), i=list(range(n)), seconds=seconds, log_dir=self.log_dir)

    def submit(self, task, i: int, seconds: float):
        self.counts.submitted += 1
        return self.fleet.submit(task, i=i, seconds=seconds, log_dir=self.log_dir)

    # --------------------------------------------------------------------------------------------- counts

    def settle_map(self, meta, n: int) -> None:
        try:
            resource = self.fleet.wait(meta, timeout=SETTLE_SECONDS)
        except Exception:  # noqa: BLE001 - not done in time: what is not done is hung
            view = self.fleet.view(meta)
            self.counts.succeeded += view.succeeded
            self.counts.lost += view.failed
            self.counts.hung += n - view.succeeded - view.failed
            return
        if resource.phase == TaskExecution.SUCCEEDED:
            values = [lit.scalar.primitive.integer for lit in resource.outputs.literals["o0"].collection.literals]
            good = sum(1 for i, v in enumerate(values) if v == 2 * i)
            self.counts.succeeded += good
            self.counts.lost += n - good
        else:
            view = self.fleet.view(meta)
            self.counts.succeeded += view.succeeded
            self.counts.lost += n - view.succeeded
            self.counts.notes.append(f"map ended {TaskExecution.Phase.Name(resource.phase)}: {resource.message}")

    def settle(self, meta, i: int) -> None:
        try:
            resource = self.fleet.wait(meta, timeout=SETTLE_SECONDS)
        except Exception:  # noqa: BLE001
            self.counts.hung += 1
            return
        if resource.phase == TaskExecution.SUCCEEDED and resource.outputs.literals["o0"].scalar.primitive.integer == 2 * i:
            self.counts.succeeded += 1
        else:
            self.counts.lost += 1
            self.counts.notes.append(f"task {i} ended {TaskExecution.Phase.Name(resource.phase)}: {resource.message}")

    def finish(self) -> Counts:
        """Count duplicates among replicas that stayed up, stop the fleet, count orphans."""
        healthy = set(self.replicas().values())  # each replica leads its own process group
        completed_on = {int(name.split("-")[1]) for name in os.listdir(self.log_dir)}
        self.counts.duplicates = duplicates(self.log_dir, faulted_groups=completed_on - healthy)
        self.stop()
        self.counts.orphans = self.processes.orphans()
        return self.counts

    def stop(self) -> None:
        try:
            self.fleet.stop()
        finally:
            if self.proxy is not None:
                self.proxy.close()


@pytest.fixture
def scenario(request, tmp_path):
    made: List[Scenario] = []

    def make(**options) -> Scenario:
        made.append(Scenario(request.node.name.replace("test_", "", 1), tmp_path, **options))
        return made[-1]

    yield make
    for s in made:
        s.stop()  # a second stop is a no-op; this one is for a test that failed half-way


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------------------- scenarios


def test_replicas_sigkilled_during_a_map(scenario):
    s = scenario()
    meta = s.submit_map(ct.kill_work, 40, 0.3)
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        busy = wait_for(s.busy_replicas, 60, "a replica running an element")
        os.kill(rng.choice(sorted(busy.values())), signal.SIGKILL)
        kills += 1
        time.sleep(1.5)
    s.settle_map(meta, 40)
    s.counts.notes.append(f"{kills} replicas SIGKILLed")
    s.finish().check()


def test_a_sigstopped_replica(scenario):
    s = scenario()
    meta = s.submit_map(ct.frozen_work, 8, 1.5)
    busy = wait_for(lambda: len(b := s.busy_replicas()) == 2 and b, 60, "two busy replicas")
    frozen = sorted(busy.values())[0]
    kill_group(frozen, signal.SIGSTOP)  # the replica and its executors: heartbeats stop, the stream stays open
    s.settle_map(meta, 8)
    s.counts.notes.append("one replica frozen (SIGSTOP) mid-task; the agent stopped it after 6 missed heartbeats")
    assert frozen not in s.replicas().values(), "the frozen replica is still counted as a live replica"
    s.finish().check()


def test_tcp_resets_of_the_lease_streams(scenario):
    s = scenario(proxy=True)
    meta = s.submit_map(ct.network_work, 16, 0.5)
    wait_for(lambda: len(s.busy_replicas()) == 2, 60, "two busy replicas")
    before = s.replicas()
    resets = 0
    for _ in range(3):
        resets += s.proxy.reset_all()
        time.sleep(1.0)
    s.settle_map(meta, 16)
    s.counts.notes.append(f"{resets} streams reset (RST) mid-task; replicas reconnected within the grace")
    assert s.replicas() == before, "a replica was replaced after a TCP reset instead of reconnecting"
    s.finish().check()


def test_lost_agent_to_replica_bytes_leave_no_ghost_lease(scenario):
    s = scenario(proxy=True)
    s.settle(s.submit(ct.ghost_work, 0, 0.1), 0)  # the replica is up
    (replica,) = s.replicas()
    # Round 1: assignments vanish; the replica's heartbeats do not list them, so the agent leases them again and
    # closes the stream; the black-holed connection is reset as the replica's keepalive would.
    for link in s.proxy.live_links():
        link.blackhole.set()
    metas = [(s.submit(ct.ghost_work, i, 0.2), i) for i in (1, 2)]
    wait_for(lambda: s.replicas(core.ReplicaState.DISCONNECTED), 60, "the agent to find the ghost lease")
    s.proxy.reset_all()
    for m, i in metas:
        s.settle(m, i)
    # Round 2: the assignment vanishes and the stream resets at once: the replica's Hello does not list it.
    for link in s.proxy.live_links():
        link.blackhole.set()
    meta = s.submit(ct.ghost_work, 3, 0.2)
    wait_for(lambda: s.fleet.view(meta).replica_id, 60, "a lease")
    s.proxy.reset_all()
    s.settle(meta, 3)
    leases = s.fleet.on_loop(lambda: {k: t.leases for k, t in s.fleet.agent.scheduler.tasks.items()})
    s.counts.notes.append(f"leases per task: {sorted(leases.values())}")
    assert s.replicas().keys() == {replica}
    s.finish().check()


def test_replicas_killed_while_starting(scenario):
    # Replicas as fresh processes: their start (an interpreter importing flytekit, about a second) leaves time to
    # kill them before they connect; one forked from the zygote connects within tens of milliseconds.
    s = scenario(launcher_factory=functools.partial(LocalProcessLauncher, zygote=False))
    meta = s.submit_map(ct.starting_work, 10, 0.2)
    killed = 0
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        starting = wait_for(lambda: s.replicas(core.ReplicaState.STARTING), 60, "a starting replica")
        pid = sorted(starting.values())[0]
        os.kill(pid, sig)
        killed += 1
        wait_for(lambda: pid not in s.replicas().values(), 60, "the killed replica to be gone")
    s.settle_map(meta, 10)
    s.settle(s.submit(ct.starting_work, 100, 0.1), 100)  # the environment is not poisoned
    s.counts.notes.append(f"{killed} replicas killed before they connected (SIGKILL, SIGTERM)")
    s.finish().check()


def test_garbage_on_the_lease_port(scenario):
    s = scenario(hello_timeout=1.0)
    meta = s.submit_map(ct.garbage_work, 10, 0.3)
    host, port = s.fleet.agent.lease_address.rsplit(":", 1)
    rng = random.Random(11)
    for payload in [rng.randbytes(4096) for _ in range(5)] + [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(payload)
    codes = {}
    with grpc.insecure_channel(s.fleet.agent.lease_address, options=GRPC_OPTIONS) as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)

        def first_reply(*messages):
            try:
                return next(iter(stub.Connect(iter(messages) if messages else _silent(), timeout=30)))
            except grpc.RpcError as e:
                return e.code()

        hello = lease_pb2.Hello(protocol_version=PROTOCOL_VERSION, environment_key="x", replica_id="r", token="t")
        codes["no Hello"] = first_reply()
        codes["1 MB Hello"] = first_reply(lease_pb2.ReplicaMessage(hello=lease_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, replica_id="\n" * (1 << 20))))
        codes["heartbeat first"] = first_reply(lease_pb2.ReplicaMessage(heartbeat=lease_pb2.Heartbeat()))
        codes["forged Hello"] = first_reply(lease_pb2.ReplicaMessage(hello=hello))
    assert codes == {"no Hello": grpc.StatusCode.DEADLINE_EXCEEDED, "1 MB Hello": grpc.StatusCode.INVALID_ARGUMENT,
                     "heartbeat first": grpc.StatusCode.FAILED_PRECONDITION,
                     "forged Hello": grpc.StatusCode.UNAUTHENTICATED}, codes
    s.settle_map(meta, 10)
    s.counts.notes.append("6 raw garbage connections, a silent stream, a 1 MB Hello, a stream opening with a "
                          "heartbeat, a forged Hello")
    s.finish().check()


def _silent():
    """A request stream that sends nothing for longer than the agent waits for a Hello."""
    time.sleep(5)
    return
    yield


# ------------------------------------------------------------------------------------ agent SIGTERM (served)


def test_agent_sigterm_drains_and_delivers_running_results(tmp_path):
    processes = ScenarioProcesses()
    counts = Counts("agent_sigterm_drain")
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "flyte-actor-agent"), "serve", "--host", "127.0.0.1",
             "--port", str(port), "--lease-port", str(_free_port()), "--metrics-port", "0", "--launcher", "local",
             "--shutdown-grace-seconds", "60"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = agent_pb2_grpc.AsyncAgentServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=60)
            metas = [_create(stub, ct.drain_work, tmp_path, i=i, seconds=3.0, log_dir=str(log_dir)) for i in range(4)]
            counts.submitted = len(metas)
            wait_for(lambda: sum(_get(stub, m).phase == TaskExecution.RUNNING for m in metas) == 2, 90,
                     "two tasks running")
            agent.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = _create(stub, ct.drain_work, tmp_path, i=9, seconds=0.0, log_dir=str(log_dir))
            assert _wait_terminal(stub, refused).phase == TaskExecution.RETRYABLE_FAILED  # no new work in a drain
            for i, meta in enumerate(metas):
                resource = _wait_terminal(stub, meta)
                if resource is None:
                    counts.hung += 1
                elif resource.phase == TaskExecution.SUCCEEDED and \
                        resource.outputs.literals["o0"].scalar.primitive.integer == 2 * i:
                    counts.succeeded += 1
                else:
                    counts.lost += 1
                    counts.notes.append(f"task {i}: {TaskExecution.Phase.Name(resource.phase)} {resource.message}")
        code = agent.wait(timeout=90)
        assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    counts.duplicates = duplicates(str(log_dir))
    counts.orphans = processes.orphans()
    counts.notes.append("SIGTERM with 2 tasks running and 2 queued: the queued ones ran in the drain too")
    counts.check()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _create(stub, task, tmp_path, **inputs) -> bytes:
    ctx = FlyteContextManager.current_context()
    template, output_prefix = local_template(task, ctx)
    literals = TypeEngine.dict_to_literal_map(ctx, inputs, task.get_input_types())
    request = agent_pb2.CreateTaskRequest(inputs=literals.to_flyte_idl(), template=template.to_flyte_idl(),
                                          output_prefix=output_prefix)
    return stub.CreateTask(request, timeout=30).resource_meta


def _get(stub, meta: bytes):
    category = agent_pb2.TaskCategory(name="actor", version=0)
    return stub.GetTask(agent_pb2.GetTaskRequest(task_type="actor", task_category=category, resource_meta=meta),
                        timeout=30).resource


def _wait_terminal(stub, meta: bytes, timeout: float = 90):
    """Poll GetTask as propeller does (here every 0.2 s) until a terminal phase; None if it never comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resource = _get(stub, meta)
        except grpc.RpcError:
            return None  # the agent stopped serving before the result was read
        if resource.phase in (TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED,
                              TaskExecution.ABORTED):
            return resource
        time.sleep(0.2)
    return None
