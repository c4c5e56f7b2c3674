"""Agent pods with leader election around a real kube-apiserver, as the failover test and benchmark drive them.

What Kubernetes would do around the agent pods is done here: an agent "pod" is a pod object (so the agent can label
its own) and a local ``flyte-actor-agent serve`` process; :class:`LeaderService` stands in for the chart's Service
that selects the pod labelled ``flyte-actors.io/agent-role=leader`` (the endpoints controller and kube-proxy);
:class:`Poller` is propeller's side: CreateTask once, then GetTask every resync with the same resource meta.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import Dict, List, Optional

import grpc
from flyteidl.admin import agent_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service.agent_pb2_grpc import AsyncAgentServiceStub
from flytekit import FlyteContextManager
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.type_engine import TypeEngine
from flytekit.tools.translator import get_serializable
from kubernetes import client

from harness import free_port
from flyte_actor_agent.local_fleet import wait_until

BIN = os.path.dirname(sys.executable)
ROLE_LABEL = "flyte-actors.io/agent-role"
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}


class AgentPod:
    """An agent pod: a pod object in the API server (for its role label) and a ``flyte-actor-agent serve``
    process with leader election on."""

    def __init__(self, cluster, namespace: str, name: str, lease_address: str, log_dir: str):
        self.name = name
        self.port, self.lease_port = free_port(), free_port()
        self.log_path = os.path.join(log_dir, f"{name}.log")
        core = client.CoreV1Api(cluster.api_client())
        core.create_namespaced_pod(namespace, {"metadata": {"name": name, "labels": {"app": "agent"}},
                                               "spec": {"containers": [{"name": "agent", "image": "agent"}]}})
        key_file = os.path.join(log_dir, "lease-key")  # one signing key for all agent pods, as the chart's Secret
        if not os.path.exists(key_file):
            with open(key_file, "wb") as f:
                f.write(os.urandom(32).hex().encode())
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig_path), FLYTE_ACTOR_LOG_LEVEL="INFO")
        env.pop("FLYTE_ACTOR_LOCAL_MODE", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [os.path.join(BIN, "flyte-actor-agent"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--lease-port", str(self.lease_port), "--metrics-port", "0", "--status-port", "0", "--launcher", "kubernetes",
                 "--namespaces", namespace, "--lease-address", lease_address, "--recovery-grace-seconds", "30",
                 "--shutdown-grace-seconds", "5",
                 "--leader-election", "true", "--leader-election-namespace", namespace, "--identity", name,
                 "--lease-key-file", key_file],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class LeaderService:
    """Stands in for the chart's Service (selector ``flyte-actors.io/agent-role: leader``): connections to its two
    ports go to the live agent pod labelled leader, as kube-proxy would send them to the ready endpoint."""

    def __init__(self, cluster, namespace: str, pods: Dict[str, AgentPod]):
        self.api = client.CoreV1Api(cluster.api_client())
        self.namespace = namespace
        self.pods = pods
        self.leader: Optional[str] = None
        self._stop = threading.Event()
        self.connector_port, self.lease_port = free_port(), free_port()
        threading.Thread(target=self._watch_labels, daemon=True).start()
        for port, which in ((self.connector_port, "port"), (self.lease_port, "lease_port")):
            listener = socket.create_server(("127.0.0.1", port))
            threading.Thread(target=self._accept, args=(listener, which), daemon=True).start()

    @property
    def connector_address(self) -> str:
        return f"127.0.0.1:{self.connector_port}"

    def _watch_labels(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.api.list_namespaced_pod(self.namespace, label_selector=f"{ROLE_LABEL}=leader").items
                live = [p.metadata.name for p in pods if p.metadata.name in self.pods and self.pods[p.metadata.name].alive]
                self.leader = live[0] if live else None
            except Exception:  # noqa: BLE001 - the API server is going away at the end
                pass
            self._stop.wait(0.2)

    def _accept(self, listener: socket.socket, which: str) -> None:
        while not self._stop.is_set():
            conn, _ = listener.accept()
            leader = self.leader
            if leader is None:
                conn.close()  # no ready endpoint: connection refused, as a Service without endpoints
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", getattr(self.pods[leader], which)), timeout=2)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop.set()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def template_of(task, image: str):
    settings = SerializationSettings(ImageConfig.auto(img_name=image))
    return get_serializable(OrderedDict(), settings, task).template.to_flyte_idl()


def inputs_of(task, **values):
    return TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), values,
                                          task.get_input_types()).to_flyte_idl()


class Poller:
    """Propeller's view: CreateTask once per task, then GetTask for every running task each resync with the
    resource meta CreateTask returned. Records every answer: a failure phase or more than 5 errors in a row is
    what propeller would retry."""

    def __init__(self, address: str, resync: float = 5.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = AsyncAgentServiceStub(self.channel)
        self.resync = resync
        self.tasks: Dict[str, dict] = {}  # node id -> {category, meta, resource, errors, max_errors}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def create(self, node_id: str, request: agent_pb2.CreateTaskRequest) -> None:
        meta = self.stub.CreateTask(request, timeout=3).resource_meta
        category = agent_pb2.TaskCategory(name=request.template.type, version=request.template.task_type_version)
        with self.lock:
            self.tasks[node_id] = {"category": category, "meta": meta, "resource": None, "errors": 0,
                                   "max_errors": 0, "phases": []}

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                pending = [(n, t) for n, t in self.tasks.items()
                           if t["resource"] is None or t["resource"].phase not in TERMINAL]
            for node_id, task in pending:
                try:
                    resource = self.stub.GetTask(agent_pb2.GetTaskRequest(
                        task_type=task["category"].name, task_category=task["category"],
                        resource_meta=task["meta"]), timeout=3).resource
                except grpc.RpcError:
                    task["errors"] += 1
                    task["max_errors"] = max(task["max_errors"], task["errors"])
                    continue
                task["errors"] = 0
                task["resource"] = resource
                if not task["phases"] or task["phases"][-1] != resource.phase:
                    task["phases"].append(resource.phase)
            self._stop.wait(self.resync)

    def resource(self, node_id: str) -> Optional[agent_pb2.Resource]:
        return self.tasks[node_id]["resource"]

    def done(self) -> bool:
        with self.lock:
            return all(t["resource"] is not None and t["resource"].phase in TERMINAL for t in self.tasks.values())

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.channel.close()


def wait_for(condition, timeout: float, what: str):
    return wait_until(condition, timeout, what, interval=0.2)


def replica_pods(api, namespace: str) -> List[client.V1Pod]:
    return [p for p in api.list_namespaced_pod(namespace, label_selector="flyte-actors.io/replica=true").items
            if p.metadata.deletion_timestamp is None]
