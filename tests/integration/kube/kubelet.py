"""A test-side kubelet: runs the replica pods of a real API server as local processes.

The API server of the test tier has no scheduler or kubelet, so pods would stay Pending. This watches replica
pods, runs each pod's primary container command as a local process with the pod's environment (literal values
and ``secretKeyRef``s read from the API server), and reports the pod's status back as a kubelet would: Running
while the process lives, Failed with the container's exit code (``OOMKilled`` for SIGKILL) when it ends. A pod
being deleted has its process killed and is removed (grace 0). Images named ``*invalid*`` fail to pull
(``ErrImagePull``), so tests can see how the agent handles a replica that cannot start. While ``unschedulable``
(a function of the pod) gives a reason, a pod is left Pending with ``PodScheduled`` false, as the scheduler
leaves a pod no node fits; :meth:`release` then schedules the held pods, as a new node would.
"""

from __future__ import annotations

import base64
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Dict, Optional

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

REPLICA_SELECTOR = "flyte-actors.io/replica=true"


class FakeKubelet:
    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.api = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.processes: Dict[str, subprocess.Popen] = {}
        self.started: Dict[str, dict] = {}
        self.logs = tempfile.mkdtemp(prefix="kubelet-")
        self.unschedulable: Optional[Callable[[client.V1Pod], Optional[str]]] = None
        self.held: Dict[str, client.V1Pod] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "FakeKubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            processes, self.processes = list(self.processes.values()), {}
        for proc in processes:
            _kill(proc)  # no status is reported for these: the API server may be stopping too
        self._thread.join(timeout=10)

    def kill(self, pod_name: str) -> None:
        """Kill a pod's process as the kernel would (the pod then fails)."""
        with self._lock:
            proc = self.processes.get(pod_name)
        if proc is not None:
            _kill(proc)

    def release(self) -> None:
        """A node that fits came: schedule every held pod."""
        self.unschedulable = None
        with self._lock:
            held, self.held = list(self.held.values()), {}
        for pod in held:
            self._on_event("MODIFIED", pod)

    def _hold(self, pod: client.V1Pod, reason: str) -> None:
        with self._lock:
            if pod.metadata.name in self.held:
                return
            self.held[pod.metadata.name] = pod
        status = {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": reason,
            "lastTransitionTime": datetime.datetime.now(datetime.timezone.utc).isoformat()}]}
        try:
            self.api.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {"status": status})
        except ApiException:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    self.api.list_namespaced_pod, self.namespace, label_selector=REPLICA_SELECTOR, timeout_seconds=5
                ):
                    if self._stop.is_set():
                        return
                    self._on_event(event["type"], event["object"])
            except Exception:  # noqa: BLE001 - the API server went away between tests; watch again
                self._stop.wait(0.5)

    def _on_event(self, kind: str, pod: client.V1Pod) -> None:
        name = pod.metadata.name
        if kind == "DELETED" or pod.metadata.deletion_timestamp is not None:
            with self._lock:
                proc = self.processes.pop(name, None)
                self.held.pop(name, None)
            if proc is not None:
                _kill(proc)
            if kind != "DELETED":
                try:
                    self.api.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
                except ApiException:
                    pass
            return
        with self._lock:
            if name in self.started or name in self.held:
                return
        reason = self.unschedulable(pod) if self.unschedulable is not None else None
        if reason:
            self._hold(pod, reason)
            return
        with self._lock:
            if name in self.started:
                return
            self.started[name] = pod.to_dict()
        container = pod.spec.containers[0]
        if "invalid" in (container.image or ""):
            self._patch(name, "Pending", waiting=("ErrImagePull", f"pull access denied for {container.image}"))
            return
        env = dict(os.environ)
        env.pop("FLYTE_ACTOR_LOCAL_MODE", None)
        for var in container.env or []:
            if var.value_from is not None and var.value_from.secret_key_ref is not None:
                ref = var.value_from.secret_key_ref
                secret = self.api.read_namespaced_secret(ref.name, self.namespace)
                env[var.name] = base64.b64decode(secret.data[ref.key]).decode()
            elif var.value is not None:
                env[var.name] = var.value
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or os.getcwd()) for p in sys.path)
        command = [os.path.join(os.path.dirname(sys.executable), container.command[0]), *container.command[1:]]
        with open(os.path.join(self.logs, f"{name}.log"), "wb") as log:
            proc = subprocess.Popen(command + list(container.args or []), env=env, stdout=log, stderr=log,
                                    start_new_session=True)
        with self._lock:
            self.processes[name] = proc
        self._patch(name, "Running", running=True)
        threading.Thread(target=self._wait, args=(name, proc), daemon=True).start()

    def _wait(self, name: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._lock:
            if self.processes.get(name) is not proc:
                return  # killed because the pod is being deleted
            del self.processes[name]
        reason = "OOMKilled" if code == -signal.SIGKILL else ("Completed" if code == 0 else "Error")
        exit_code = 137 if code == -signal.SIGKILL else code
        self._patch(name, "Succeeded" if code == 0 else "Failed", terminated=(reason, exit_code))

    def _patch(self, name: str, phase: str, running: bool = False, waiting=None, terminated=None) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        state: dict = {}
        if running:
            state = {"running": {"startedAt": now}}
        elif waiting:
            state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
        elif terminated:
            state = {"terminated": {"reason": terminated[0], "exitCode": terminated[1], "finishedAt": now}}
        status = {
            "phase": phase,
            "containerStatuses": [{
                "name": self.started[name]["spec"]["containers"][0]["name"],
                "image": self.started[name]["spec"]["containers"][0]["image"] or "",
                "imageID": "",
                "ready": running,
                "restartCount": 0,
                "state": state,
            }],
        }
        try:
            self.api.patch_namespaced_pod_status(name, self.namespace, {"status": status})
        except ApiException:
            pass  # the pod is already gone


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
