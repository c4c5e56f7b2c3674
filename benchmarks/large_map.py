"""Benchmark 7: an actor map of 100,000 tiny elements through ``flyte-actor-agent serve --launcher local`` (its own
process, so its memory is the agent's alone), driven as propeller drives an agent: flyteidl's AsyncAgentService
stub with gRPC's default 4 MiB receive limit, CreateTask with the inputs inline and the container args rendered,
GetTask every second until a terminal phase, then outputs.pb read from the output prefix.

Measured: CreateTask latency (propeller's deadline is 3 s), the map's wall time and elements per second, the
agent's peak RSS (VmHWM) and its RSS at the end, and the size of the final GetTask answer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

import grpc
from flyteidl.admin import agent_pb2
from flyteidl.core import identifier_pb2, literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service.agent_pb2_grpc import AsyncAgentServiceStub
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.tools.translator import get_serializable
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import map_tasks
from .common import ROOT, Results, log, ms, python_env, secs

TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}


def run(results: Results, quick: bool) -> None:
    n = int(os.environ.get("BENCH_MAP_ELEMENTS", 2000 if quick else 100_000))
    bench = "7"
    work = tempfile.mkdtemp(prefix="flyte-actors-large-map-")
    port, lease_port = _free_port(), _free_port()
    log(f"[7] actor map of {n:,} elements through flyte-actor-agent serve")
    with open(os.path.join(work, "agent.log"), "wb") as agent_log:
        agent = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "flyte-actor-agent"), "serve", "--host", "127.0.0.1",
             "--port", str(port), "--lease-port", str(lease_port), "--metrics-port", "0", "--status-port", "0",
             "--launcher", "local"],
            cwd=ROOT, env=python_env(), stdout=agent_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # default limits, as propeller's client
        _wait_serving(channel, agent)
        stub = AsyncAgentServiceStub(channel)
        idle = _status(agent.pid, "VmRSS")
        request = _request(work, n)
        started = time.monotonic()
        meta = stub.CreateTask(request, timeout=30).resource_meta
        created = time.monotonic() - started
        category = agent_pb2.TaskCategory(name=request.template.type, version=request.template.task_type_version)
        reported = started
        gets: list = []
        while True:
            time.sleep(1.0)
            asked = time.monotonic()
            try:
                resource = stub.GetTask(agent_pb2.GetTaskRequest(task_category=category, resource_meta=meta),
                                        timeout=3).resource
            except grpc.RpcError as e:
                raise RuntimeError(f"GetTask failed after {time.monotonic() - asked:.1f} s (propeller's deadline is "
                                   f"3 s): {e.code().name}; the agent's log ends:\n{_tail(work)}") from None
            gets.append(time.monotonic() - asked)
            if gets[-1] > 1.0:
                log(f"[7] GetTask took {gets[-1]:.2f} s at {asked - started:.0f} s: {resource.message}")
            if resource.phase in TERMINAL:
                break
            if time.monotonic() - reported >= 60:
                reported = time.monotonic()
                log(f"[7] {reported - started:.0f} s: {resource.message}; agent RSS "
                    f"{_status(agent.pid, 'VmRSS') / 2**20:.0f} MiB, peak {_status(agent.pid, 'VmHWM') / 2**20:.0f} MiB")
        total = time.monotonic() - started
        if resource.phase != TaskExecution.SUCCEEDED:
            raise RuntimeError(f"the map ended {TaskExecution.Phase.Name(resource.phase)}: {resource.message}")
        peak, end = _status(agent.pid, "VmHWM"), _status(agent.pid, "VmRSS")
        with open(os.path.join(request.output_prefix, "outputs.pb"), "rb") as f:
            outputs = literals_pb2.LiteralMap.FromString(f.read())
        got = [x.scalar.primitive.integer for x in outputs.literals["o0"].collection.literals]
        if got != [i + 1 for i in range(n)]:
            raise RuntimeError("the map's outputs are wrong")
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
        shutil.rmtree(work, ignore_errors=True)
    note = "1 run; 2 replicas x parallelism 2"
    results.add(bench, f"actor map of {n:,} elements via the agent server: CreateTask", ms(created),
                "propeller's deadline is 3 s")
    results.add(bench, "  whole map (create -> GetTask SUCCEEDED, 1 s polls)", secs(total),
                f"{n / total:.0f} elements/s; {note}")
    results.add(bench, "  agent RSS: idle | peak (VmHWM) | at the end",
                f"{idle / 2**20:.0f} | {peak / 2**20:.0f} | {end / 2**20:.0f} MiB", "the agent process alone")
    results.add(bench, "  GetTask while it ran: median | slowest", f"{ms(sorted(gets)[len(gets) // 2])} | {ms(max(gets))}",
                f"{len(gets)} calls; propeller's deadline is 3 s")
    results.add(bench, "  final GetTask answer", f"{resource.ByteSize():,} B",
                "outputs in outputs.pb" if not resource.HasField("outputs") else "outputs inline")
    results.data["7"] = {"n": n, "create": created, "total": total, "rss_idle": idle, "rss_peak": peak,
                         "rss_end": end, "get_bytes": resource.ByteSize()}


def _request(work: str, n: int) -> agent_pb2.CreateTaskRequest:
    """What propeller's agent plugin sends for the map node: inputs.pb written, container args rendered."""
    settings = SerializationSettings(image_config=ImageConfig.auto(img_name="ghcr.io/example/actors:1"))
    template = get_serializable(OrderedDict(), settings, map_tasks.plus_one_map).template.to_flyte_idl()
    template.id.project, template.id.domain, template.id.version = "bench", "development", "v1"
    inputs = literals_pb2.LiteralMap(literals={"i": literals_pb2.Literal(collection=literals_pb2.LiteralCollection(
        literals=[literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=i)))
                  for i in range(n)]))})
    data, raw = os.path.join(work, "metadata", "n0", "data"), os.path.join(work, "raw")
    output_prefix = os.path.join(data, "0")
    os.makedirs(output_prefix)
    os.makedirs(raw)
    with open(os.path.join(data, "inputs.pb"), "wb") as f:
        f.write(inputs.SerializeToString())
    values = {"{{.input}}": os.path.join(data, "inputs.pb"), "{{.outputPrefix}}": output_prefix,
              "{{.rawOutputDataPrefix}}": raw, "{{.checkpointOutputPrefix}}": os.path.join(raw, "ckpt"),
              "{{.prevCheckpointPrefix}}": '""'}
    args = [values.get(a, a) for a in template.container.args]
    del template.container.args[:]
    template.container.args.extend(args)
    execution = identifier_pb2.WorkflowExecutionIdentifier(project="bench", domain="development",
                                                          name="a" + os.urandom(9).hex())
    task_id = identifier_pb2.TaskExecutionIdentifier(
        task_id=template.id, retry_attempt=0,
        node_execution_id=identifier_pb2.NodeExecutionIdentifier(node_id="n0", execution_id=execution))
    return agent_pb2.CreateTaskRequest(inputs=inputs, template=template, output_prefix=output_prefix,
                                       task_execution_metadata=agent_pb2.TaskExecutionMetadata(
                                           task_execution_id=task_id, namespace="bench"))


def _tail(work: str) -> str:
    with open(os.path.join(work, "agent.log"), errors="replace") as f:
        return f.read()[-3000:]


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(channel: grpc.Channel, agent: subprocess.Popen, timeout: float = 120) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"flyte-actor-agent exited with {agent.returncode}")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"flyte-actor-agent is not serving after {timeout:g}s")
