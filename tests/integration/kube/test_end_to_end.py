"""End to end as on a Flyte cluster: the documented examples, packaged by ``pyflyte package``, run by a
propeller-like driver (``propeller.py``) against ``flyte-actor-agent serve`` as a real process over gRPC, with
replica pods on a real kube-apiserver (run as local processes by the test-side kubelet).

Also the agent API as propeller relies on it: ListAgents, NOT_FOUND for task types it does not run, idempotent
CreateTask, DeleteTask of a running task, and the metrics endpoint.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request

import grpc
import pytest
from flyteidl.core import literals_pb2, tasks_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

import propeller
from harness import free_port

pytestmark = pytest.mark.timeout(300)

NAMESPACE = "actors"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BIN = os.path.dirname(sys.executable)
IMAGE = "ghcr.io/example/actors:1"
#: The agent's --plugins-config, as an admin copies it from propeller's configuration.
PLUGINS_CONFIG = """
plugins:
  k8s:
    default-env-vars: {FLYTE_ACTORS_E2E: "yes"}
    interruptible-tolerations: [{key: spot, operator: Equal, value: "true", effect: NoSchedule}]
  logs:
    kubernetes-enabled: true
    kubernetes-template-uri: "https://k8s.example.com/#/log/{{ .namespace }}/{{ .podName }}/pod"
"""


# ------------------------------------------------------------------------------------------------- fixtures

class AgentServer:
    def __init__(self, kubeconfig: str, log_path: str, plugins_config: str):
        self.port, self.lease_port, self.metrics_port = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, KUBECONFIG=kubeconfig, FLYTE_ACTOR_LOG_LEVEL="INFO")
        env.pop("FLYTE_ACTOR_LOCAL_MODE", None)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [os.path.join(BIN, "flyte-actor-agent"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--lease-port", str(self.lease_port), "--metrics-port", str(self.metrics_port),
                 "--status-port", str(free_port()), "--launcher", "kubernetes", "--namespaces", NAMESPACE,
                 "--lease-address", f"127.0.0.1:{self.lease_port}", "--recovery-grace-seconds", "5",
                 "--plugins-config", plugins_config, "--shutdown-grace-seconds", "5"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process.poll() is None, f"the agent exited ({self.process.returncode}):\n{self.log_tail()}"
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"the agent is not serving after {timeout}s:\n{self.log_tail()}"
                time.sleep(0.2)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def sample(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels`` (0 when there are none)."""
        return sum(
            s.value for family in text_string_to_metric_families(self.metrics()) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the agent ignored SIGTERM for 30s:\n{self.log_tail()}")
        assert code == 0, f"the agent exited with {code} after SIGTERM:\n{self.log_tail()}"


@pytest.fixture(scope="module")
def agent(cluster, kubelet, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("agent")
    (workdir / "plugins.yaml").write_text(PLUGINS_CONFIG)
    server = AgentServer(str(cluster.kubeconfig_path), str(workdir / "agent.log"), str(workdir / "plugins.yaml"))
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


def package(pkg: str, source: str, out) -> propeller.Package:
    archive = out / "package.tgz"
    result = subprocess.run(
        [os.path.join(BIN, "pyflyte"), "--pkgs", pkg, "package", "--image", IMAGE, "-o", str(archive),
         "--source", source, "--force"],
        cwd=str(out), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(archive) as tar:
        tar.extractall(out / "x")
    return propeller.Package.load(str(out / "x"))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return package("examples", ROOT, tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def kube_tasks(tmp_path_factory):
    return package("kube.kube_tasks", os.path.join(ROOT, "tests", "integration"),
                   tmp_path_factory.mktemp("kube-tasks"))


@pytest.fixture(scope="module")
def driver(agent, examples, tmp_path_factory):
    driver = propeller.Propeller(examples, agent.address, str(tmp_path_factory.mktemp("flyte-data")),
                                 namespace=NAMESPACE, resync_interval=1.0, source_root=ROOT)
    yield driver
    driver.close()


# -------------------------------------------------------------------------------------------------- literals

def lit(value) -> literals_pb2.Literal:
    if isinstance(value, (list, tuple, range)):
        return literals_pb2.Literal(collection=literals_pb2.LiteralCollection(literals=[lit(v) for v in value]))
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    key = {int: "integer", float: "float_value", str: "string_value"}[type(value)]
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(**{key: value})))


def py(literal: literals_pb2.Literal):
    if literal.HasField("collection"):
        return [py(v) for v in literal.collection.literals]
    primitive = literal.scalar.primitive
    return getattr(primitive, primitive.WhichOneof("value"))


# ------------------------------------------------------------------------------------------------- examples

@pytest.mark.parametrize("workflow, inputs, expected", [
    ("examples.hello_world.wf", {"name": "world"}, "hello world"),
    ("examples.plus_one.wf", {"input": 0}, 4),
    ("examples.shared_environment.wf", {"n": 3}, [196, 196, 36]),
    ("examples.pod_template.wf", {}, "hello from the pod template"),
    ("examples.model_cache.wf", {}, 13),  # inputs from the launch plan's defaults: init_value=1, state=3
    ("examples.map_model.wf", {"xs": range(20), "weight": 3}, [3 * x for x in range(20)]),
    ("examples.gpu_model.wf", {}, "36 on cpu"),  # a GPU + accelerator + interruptible pod, accepted as valid
], ids=lambda v: v.split(".")[1] if isinstance(v, str) and v.startswith("examples.") else None)
def test_documented_examples_run_end_to_end(driver, workflow, inputs, expected):
    outputs = driver.run(workflow, {k: lit(v) for k, v in inputs.items()})
    assert py(outputs.literals["o0"]) == expected


def test_list_agents_advertises_exactly_the_actor_task_types(driver):
    assert {name for name, _ in driver.agent_categories} == {"actor", "actor-map"}
    assert driver.agent_categories == {("actor", 0), ("actor-map", 0)}


def test_a_task_type_the_agent_does_not_run_is_not_found_and_not_routed(driver, examples):
    sensor = tasks_pb2.TaskTemplate()
    sensor.CopyFrom(examples.tasks["examples.hello_world.say_hello"])
    sensor.type = "sensor"
    request = driver.create_task_request(sensor, literals_pb2.LiteralMap(literals={"name": lit("x")}),
                                         propeller.new_execution_name(), "n0")
    with pytest.raises(grpc.RpcError) as raised:
        driver.agent.CreateTask(request, timeout=driver.call_timeout)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(LookupError, match="no plugin for task type 'sensor'"):
        driver.execute_task(sensor, request.inputs, propeller.new_execution_name(), "n0")


def test_a_repeated_create_task_runs_the_task_once(driver, examples, agent):
    template = examples.tasks["examples.hello_world.say_hello"]
    request = driver.create_task_request(template, literals_pb2.LiteralMap(literals={"name": lit("twice")}),
                                         propeller.new_execution_name(), "n0")
    dispatched = agent.sample("flyte_actor_dispatch_latency_seconds_count")
    succeeded = agent.sample("flyte_actor_task_outcomes_total", phase="succeeded")

    first = driver.agent.CreateTask(request, timeout=driver.call_timeout).resource_meta
    second = driver.agent.CreateTask(request, timeout=driver.call_timeout).resource_meta  # propeller's retry
    assert first == second
    resource = driver.wait(template, first, "n0")
    again = driver.wait(template, second, "n0")
    assert resource.phase == again.phase == TaskExecution.SUCCEEDED, resource.message
    assert py(resource.outputs.literals["o0"]) == py(again.outputs.literals["o0"]) == "hello twice"
    assert agent.sample("flyte_actor_dispatch_latency_seconds_count") == dispatched + 1  # leased once
    assert agent.sample("flyte_actor_task_outcomes_total", phase="succeeded") == succeeded + 1


def test_delete_task_aborts_a_running_actor_task(agent, kube_tasks, tmp_path, cluster):
    driver = propeller.Propeller(kube_tasks, agent.address, str(tmp_path), namespace=NAMESPACE,
                                 resync_interval=0.5, source_root=ROOT)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            run = pool.submit(driver.run_task, "kube.kube_tasks.slow", {"seconds": lit(120.0)})
            deadline = time.monotonic() + 90
            while (running := driver.running.get("n0")) is None or running.phase != TaskExecution.RUNNING:
                assert not run.done(), run.exception()
                assert time.monotonic() < deadline, "the slow task did not start running"
                time.sleep(0.1)
            # The first RUNNING answer (the only one propeller forwards) links to the replica's pod.
            (link,) = running.events[TaskExecution.RUNNING].log_links
            pod_name = link.uri.rsplit("/", 2)[-2]
            assert link.name == "Kubernetes Logs"
            assert link.uri == f"https://k8s.example.com/#/log/{NAMESPACE}/{pod_name}/pod"
            pod = client.CoreV1Api(cluster.api_client()).read_namespaced_pod(pod_name, NAMESPACE)
            assert pod.metadata.labels["flyte-actors.io/environment"] == "kube-actor"
            assert {"name": "FLYTE_ACTORS_E2E", "value": "yes"} in [
                {"name": e.name, "value": e.value} for e in pod.spec.containers[0].env]
            driver.abort("n0")
            with pytest.raises(propeller.TaskFailed) as raised:
                run.result(timeout=30)
        assert raised.value.phase == TaskExecution.ABORTED, raised.value
        assert "DeleteTask" in raised.value.message
    finally:
        driver.close()


def test_metrics_endpoint_reports_submissions_and_queue_depth(agent, driver):
    text = agent.metrics()
    assert "flyte_actor_tasks_submitted" in text and "flyte_actor_queue_depth" in text
    assert agent.sample("flyte_actor_tasks_submitted_total", environment="hello-actor") >= 1
    depths = [s for f in text_string_to_metric_families(text) if f.name == "flyte_actor_queue_depth"
              for s in f.samples]
    assert {s.labels["environment"] for s in depths} >= {"hello-actor", "plus-one-actor", "shared-actor"}
    assert all(s.value == 0 for s in depths)  # nothing is waiting once every run is done


def test_a_repeated_create_task_counts_one_submission(driver, examples, agent):
    """flyte_actor_tasks_submitted counts tasks, not CreateTask calls: propeller's retried CreateTask is a no-op."""
    template = examples.tasks["examples.plus_one.plus_one"]
    request = driver.create_task_request(template, literals_pb2.LiteralMap(literals={"input": lit(1)}),
                                         propeller.new_execution_name(), "n0")
    submitted = agent.sample("flyte_actor_tasks_submitted_total", environment="plus-one-actor")
    meta = driver.agent.CreateTask(request, timeout=driver.call_timeout).resource_meta
    driver.agent.CreateTask(request, timeout=driver.call_timeout)
    assert py(driver.wait(template, meta, "n0").outputs.literals["o0"]) == 2
    assert agent.sample("flyte_actor_tasks_submitted_total", environment="plus-one-actor") == submitted + 1
