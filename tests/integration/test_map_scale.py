"""Large actor maps through ``flyte-actor-agent serve --launcher local``, driven as propeller drives an agent
(``propeller.py``): flyteidl's AsyncAgentService stub with gRPC's default 4 MiB receive limit, CreateTask with
rendered container args, GetTask until a terminal phase, outputs read from outputs.pb when GetTask carries none.

Covered: 8 MB and 200 MB of map outputs, a 100 MB input (a map's bound input, and a single task's input),
per-element retries (one element fails twice and succeeds with retries=2; the others run once), min_successes,
offloaded element outputs (flytekit literal offloading), a new attempt of a map that runs only the elements
earlier attempts did not finish,
and a map of 100,000 elements (20,000 outside the scale tier) whose CreateTask answers within propeller's 3 s
deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import grpc
import pytest
from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.tools.translator import get_serializable
from flytekitplugins.actor.protocol import element_groups
from grpc_health.v1 import health_pb2, health_pb2_grpc

import map_tasks
import propeller
from harness import free_port

pytestmark = pytest.mark.timeout(1200)

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024  # gRPC's default, which propeller's connector client keeps


class LocalAgentServer:
    """``flyte-actor-agent serve --launcher local`` as a process; replicas are its child processes."""

    def __init__(self, log_path: str, *extra: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
        env.pop("FLYTE_ACTOR_LOCAL_MODE", None)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [os.path.join(BIN, "flyte-actor-agent"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--lease-port", str(free_port()), "--metrics-port", "0", "--status-port", "0", "--launcher", "local",
                 "--shutdown-grace-seconds", "5", *extra],
                env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process.poll() is None, f"the agent exited:\n{self.log_tail()}"
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"the agent is not serving:\n{self.log_tail()}"
                time.sleep(0.2)

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """The agent process's resident memory now (VmRSS), or its peak so far (VmHWM)."""
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def template_of(task):
    settings = SerializationSettings(image_config=ImageConfig.auto(img_name="ghcr.io/example/actors:1"))
    template = get_serializable(OrderedDict(), settings, task).template.to_flyte_idl()
    template.id.project, template.id.domain, template.id.version = "flytesnacks", "development", "v1"
    return template


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    server = LocalAgentServer(str(tmp_path_factory.mktemp("agent") / "agent.log"))
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def driver(agent, tmp_path_factory):
    package = propeller.Package(tasks={
        name: template_of(task) for name, task in [
            ("text_map", map_tasks.text_map), ("tiny_map", map_tasks.tiny_map), ("flaky_map", map_tasks.flaky_map),
            ("odd_fails_map", map_tasks.odd_fails_map), ("measure_map", map_tasks.measure_map),
            ("length", map_tasks.length), ("offloaded_map", map_tasks.offloaded_map),
        ]})
    driver = propeller.Propeller(package, agent.address, str(tmp_path_factory.mktemp("flyte-data")),
                                 resync_interval=0.5, timeout=900)
    yield driver
    driver.close()


def ints(values) -> literals_pb2.Literal:
    return literals_pb2.Literal(collection=literals_pb2.LiteralCollection(literals=[integer(v) for v in values]))


def integer(value: int) -> literals_pb2.Literal:
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=value)))


def string(value: str) -> literals_pb2.Literal:
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(string_value=value)))


def strings_of(outputs: literals_pb2.LiteralMap, name: str = "o0"):
    return [x.scalar.primitive.string_value for x in outputs.literals[name].collection.literals]


def ints_of(outputs: literals_pb2.LiteralMap, name: str = "o0"):
    return [None if x.scalar.HasField("none_type") else x.scalar.primitive.integer
            for x in outputs.literals[name].collection.literals]


def run_map(driver: propeller.Propeller, name: str, inputs, execution: str = None, attempt: int = 0):
    """Run a map (or task) as propeller would; return (the final GetTask resource, the outputs propeller ends up
    with). CreateTask gets 30 s: a 100 MB request takes seconds to serialize and parse on a loaded machine."""
    template = driver.package.tasks[name]
    request = driver.create_task_request(template, literals_pb2.LiteralMap(literals=inputs),
                                         execution or propeller.new_execution_name(), "n0", attempt)
    meta = driver.agent.CreateTask(request, timeout=30).resource_meta
    resource = driver.wait(template, meta, "n0")
    return resource, driver.outputs(template, request.output_prefix, "n0", resource)


@pytest.mark.parametrize("elements, size", [(2000, 4000), (50, 4 * 1024 * 1024)], ids=["8MB", "200MB"])
def test_map_outputs_larger_than_the_grpc_limit_reach_propeller_through_outputs_pb(driver, agent, elements, size):
    resource, outputs = run_map(driver, "text_map", {"i": ints(range(elements)), "size": ints([size] * elements)})
    # The map's outputs.pb was written element by element: the agent never held them all.
    assert agent.rss_bytes("VmHWM") < 300 * 2**20
    assert resource.phase == TaskExecution.SUCCEEDED
    assert not resource.HasField("outputs") and resource.ByteSize() < DEFAULT_RECEIVE_LIMIT
    texts = strings_of(outputs)
    assert len(texts) == elements
    assert all(len(t) == size and t[0] == str(i % 10) for i, t in enumerate(texts))


def test_a_100_mb_input_is_taken_and_never_rides_the_lease_stream(driver):
    data = "d" * (100 * 1024 * 1024)
    _, outputs = run_map(driver, "measure_map", {"data": string(data), "i": ints(range(4))})
    assert ints_of(outputs) == [len(data) + i for i in range(4)]
    # A single task's: it goes to the replica by the inputs.pb propeller wrote (TaskRun.inputs_uri).
    _, single = run_map(driver, "length", {"data": string(data)})
    assert single.literals["o0"].scalar.primitive.integer == len(data)


def test_one_element_failing_twice_is_retried_alone_and_succeeds(driver, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    n = 6
    _, outputs = run_map(driver, "flaky_map", {
        "i": ints(range(n)), "runs_dir": string(str(runs)), "fail_index": integer(3)})
    assert ints_of(outputs) == list(range(n))
    counts = {i: len([f for f in os.listdir(runs) if f.startswith(f"{i}-")]) for i in range(n)}
    assert counts == {0: 1, 1: 1, 2: 1, 3: 3, 4: 1, 5: 1}


def test_a_new_attempt_of_a_map_runs_only_the_elements_earlier_attempts_did_not_finish(driver, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    execution, n = propeller.new_execution_name(), 6
    inputs = {"i": ints(range(n)), "runs_dir": string(str(runs)), "fail_index": integer(-1)}
    _, first = run_map(driver, "flaky_map", inputs, execution)
    # Attempt 0 as if it had been cut short (propeller retried the node for a reason outside the elements):
    # elements 2 and 4 had not finished.
    attempt0 = f"{driver.workdir}/metadata/flytesnacks-development-{execution}/n0/data/0"
    assert _forget_elements(attempt0, {2, 4}) == {2, 4}
    os.remove(f"{attempt0}/outputs.pb")
    resource, second = run_map(driver, "flaky_map", inputs, execution, attempt=1)
    assert ints_of(second) == ints_of(first) == list(range(n))
    counts = {i: len([f for f in os.listdir(runs) if f.startswith(f"{i}-")]) for i in range(n)}
    assert counts == {0: 1, 1: 1, 2: 2, 3: 1, 4: 2, 5: 1}


def _forget_elements(map_prefix: str, forget: set) -> set:
    """Make the map at ``map_prefix`` look as if elements ``forget`` never finished: remove their outputs, from
    their own prefix or from the element group that holds them (rewritten without them). Returns those found."""
    found = set()
    for i in forget:
        if os.path.exists(f"{map_prefix}/{i}/outputs.pb"):
            os.remove(f"{map_prefix}/{i}/outputs.pb")
            found.add(i)
    groups = f"{map_prefix}/{element_groups.GROUP_DIR}"
    for name in os.listdir(groups) if os.path.isdir(groups) else []:
        with open(f"{groups}/{name}", "rb") as f:
            elements = element_groups.unpack(f.read())
        if not forget & set(elements):
            continue
        found |= forget & set(elements)
        os.remove(f"{groups}/{name}")
        kept = [(i, outputs) for i, outputs in elements.items() if i not in forget]
        if kept:
            with open(f"{groups}/{element_groups.name_of(i for i, _ in kept)}", "wb") as f:
                f.write(element_groups.pack(kept))
    return found


def test_offloaded_element_outputs_pass_through_as_flytekits_references(driver):
    _, outputs = run_map(driver, "offloaded_map", {"i": ints(range(3))})
    items = outputs.literals["o0"].collection.literals
    assert all(item.HasField("offloaded_metadata") for item in items)
    values = []
    for item in items:
        with open(item.offloaded_metadata.uri, "rb") as f:
            values.append(literals_pb2.Literal.FromString(f.read()).scalar.primitive.string_value)
    assert values == ["element 0", "element 1", "element 2"]


def test_min_successes_tolerates_failed_elements_as_none(driver):
    resource, outputs = run_map(driver, "odd_fails_map", {"i": ints(range(6))})
    assert resource.phase == TaskExecution.SUCCEEDED
    assert ints_of(outputs) == [0, None, 2, None, 4, None]


def test_min_successes_not_reached_fails_the_map_naming_it(driver):
    with pytest.raises(propeller.TaskFailed) as failed:
        run_map(driver, "odd_fails_map", {"i": ints(range(4))})
    assert failed.value.phase == TaskExecution.FAILED and "min_successes=3" in failed.value.message


#: The scale tier (``make test-scale``, FLYTE_ACTORS_SCALE=1) maps over 100,000 elements (about 1.5 minutes on 2
#: quiet cores, see docs/performance.md); ``make test`` over 20,000, which crosses the same paths (the map's window,
#: queued leases, element groups, outputs spooled to outputs.pb) in a CI-sized time.
LARGE_MAP = 100_000 if os.environ.get("FLYTE_ACTORS_SCALE") else 20_000


@pytest.fixture
def own_driver(driver, tmp_path):
    """A driver of an agent of its own, so that the agent's peak memory is this map's, not the 100 MB inputs' and
    200 MB outputs' of the tests before it."""
    server = LocalAgentServer(str(tmp_path / "agent.log"))
    try:
        server.wait_serving()
        own = propeller.Propeller(driver.package, server.address, str(tmp_path / "flyte-data"), resync_interval=0.5,
                                  timeout=7000)  # minutes, not seconds, on a loaded machine
        own.server = server
        yield own
        own.close()
    finally:
        server.stop()


@pytest.mark.timeout(7200)
def test_a_large_map_completes_with_create_task_within_propellers_deadline_in_bounded_agent_memory(own_driver):
    n, driver, agent = LARGE_MAP, own_driver, own_driver.server
    template = driver.package.tasks["tiny_map"]
    request = driver.create_task_request(template, literals_pb2.LiteralMap(literals={"i": ints(range(n))}),
                                         propeller.new_execution_name(), "n0")
    # Propeller's deadline for every agent call.
    meta = driver.agent.CreateTask(request, timeout=3).resource_meta
    resource = driver.wait(template, meta, "n0")
    outputs = driver.outputs(template, request.output_prefix, "n0", resource)
    assert ints_of(outputs) == [i + 1 for i in range(n)]
    assert agent.rss_bytes("VmHWM") < 300 * 2**20


def test_a_local_run_reads_outputs_too_large_to_answer_inline():
    """``pyflyte run`` without a cluster goes through the embedded agent, which reads outputs.pb as propeller
    would when the outputs did not come inline."""
    from flytekit import workflow

    @workflow
    def large(size: int = 700_000) -> str:
        return map_tasks.text(i=1, size=size)

    @workflow
    def large_map(i: list[int] = [0, 1], size: list[int] = [700_000, 700_000]) -> list[str]:
        return map_tasks.text_map(i=i, size=size)

    assert large() == "1" * 700_000
    assert large_map() == ["0" * 700_000, "1" * 700_000]
