"""The pod policy: what a replica pod may ask of the node and the cluster, checked before the pod is created.

A replica pod is built from the pod template of a ``CreateTask`` request, so whoever can submit a task chooses
it. Unless an admin allows it (agent flags, chart ``podPolicy`` values), a replica pod may not be privileged, use
the node's network, PID or IPC namespace or host ports, mount a hostPath, add Linux capabilities beyond
Kubernetes' baseline set, run in a namespace the admin did not list (never ``kube-system`` and the other system
namespaces when none are listed), or run as a service account the admin did not list. The check is on the pod
the launcher is about to create, so nothing a template adds escapes it.

    >>> PodPolicy().check({"metadata": {"namespace": "team-a"},
    ...                    "spec": {"containers": [{"name": "actor", "securityContext": {"privileged": True}}]}})
    Traceback (most recent call last):
    ...
    flyte_actor_agent.launchers.LaunchRefused: the agent's pod policy refuses spec.containers[0].securityContext.privileged=True (a privileged container); an admin allows it with --allow-privileged (chart: podPolicy.allowPrivileged)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, Tuple

from . import LaunchRefused

#: Capabilities the Kubernetes Pod Security Standards' baseline profile lets a container add.
BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
})
#: Namespaces replicas never go to unless an admin lists them by name.
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class PodPolicy:
    #: Namespaces (shell patterns allowed) replicas may run in; empty: any except :data:`SYSTEM_NAMESPACES`.
    namespaces: Tuple[str, ...] = ()
    #: Service accounts (shell patterns allowed) replica pods may run as; a pod that names none runs as ``default``.
    service_accounts: Tuple[str, ...] = ("default",)
    allow_privileged: bool = False
    allow_host_namespaces: bool = False
    allow_host_path: bool = False
    allowed_capabilities: FrozenSet[str] = BASELINE_CAPABILITIES

    def check(self, pod: Dict[str, Any]) -> None:
        """Raise :class:`LaunchRefused` (one line naming the field and the setting) if ``pod`` breaks the policy."""
        spec = pod.get("spec") or {}
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        if self.namespaces:
            if not _matches(namespace, self.namespaces):
                _refuse("metadata.namespace", namespace, f"not in the allowed namespaces {list(self.namespaces)}",
                        "--namespaces", "namespaces")
        elif namespace in SYSTEM_NAMESPACES:
            _refuse("metadata.namespace", namespace, "a system namespace", "--namespaces (by name)", "namespaces")
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if not _matches(account, self.service_accounts):
            _refuse("spec.serviceAccountName", account,
                    f"not in the allowed service accounts {list(self.service_accounts)}", "--service-accounts",
                    "podPolicy.serviceAccounts")
        if not self.allow_host_namespaces:
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(key):
                    _refuse(f"spec.{key}", spec[key], "the node's namespace", "--allow-host-namespaces",
                            "podPolicy.allowHostNamespaces")
        if not self.allow_host_path:
            for i, volume in enumerate(spec.get("volumes") or []):
                if (volume or {}).get("hostPath") is not None:
                    _refuse(f"spec.volumes[{i}].hostPath", volume["hostPath"], "a directory of the node",
                            "--allow-host-path", "podPolicy.allowHostPath")
        windows = (spec.get("securityContext") or {}).get("windowsOptions") or {}
        if windows.get("hostProcess") and not self.allow_host_namespaces:
            _refuse("spec.securityContext.windowsOptions.hostProcess", True, "a process on the node",
                    "--allow-host-namespaces", "podPolicy.allowHostNamespaces")
        for where, container in _containers(spec):
            self._check_container(where, container)

    def _check_container(self, where: str, container: Dict[str, Any]) -> None:
        context = container.get("securityContext") or {}
        if not self.allow_privileged:
            if context.get("privileged"):
                _refuse(f"{where}.securityContext.privileged", True, "a privileged container", "--allow-privileged",
                        "podPolicy.allowPrivileged")
            if context.get("procMount") not in (None, "Default"):
                _refuse(f"{where}.securityContext.procMount", context["procMount"], "an unmasked /proc",
                        "--allow-privileged", "podPolicy.allowPrivileged")
            if (context.get("windowsOptions") or {}).get("hostProcess"):
                _refuse(f"{where}.securityContext.windowsOptions.hostProcess", True, "a process on the node",
                        "--allow-privileged", "podPolicy.allowPrivileged")
        added = ((context.get("capabilities") or {}).get("add")) or []
        for capability in added:
            name = str(capability).upper()
            name = name[4:] if name.startswith("CAP_") else name
            if name not in self.allowed_capabilities:
                _refuse(f"{where}.securityContext.capabilities.add", capability,
                        "a capability beyond the allowed set", "--allowed-capabilities",
                        "podPolicy.allowedCapabilities")
        if not self.allow_host_namespaces:
            for i, port in enumerate(container.get("ports") or []):
                if (port or {}).get("hostPort"):
                    _refuse(f"{where}.ports[{i}].hostPort", port["hostPort"], "a port of the node",
                            "--allow-host-namespaces", "podPolicy.allowHostNamespaces")


def _containers(spec: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    for kind in _CONTAINER_LISTS:
        for i, container in enumerate(spec.get(kind) or []):
            yield f"spec.{kind}[{i}]", container or {}


def _matches(name: str, patterns: Tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _refuse(field: str, value: Any, what: str, flag: str, chart_value: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise LaunchRefused(f"the agent's pod policy refuses {field}={shown} ({what}); an admin allows it with {flag} "
                        f"(chart: {chart_value})")
