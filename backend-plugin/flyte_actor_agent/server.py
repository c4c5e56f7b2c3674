"""``flyte-actor-agent serve``: the actor agent as a service for a Flyte cluster.

One process serves the Flyte connector API (flyteidl ``AsyncAgentService``, ``AgentMetadataService`` and gRPC
health) for the ``actor`` and ``actor-map`` task types only, the replica lease service on its own port,
Prometheus metrics over HTTP, and the fleet status page on its own port (``flyte-actor-agent status`` prints it). Every flag can also be set by the environment variable shown in ``--help``.

It listens on loopback unless told otherwise (the Helm chart sets ``--host 0.0.0.0``): propeller cannot
authenticate itself to an agent (no client certificate, no per-call credentials), so who reaches the connector
port is decided by the network (a NetworkPolicy admitting propeller only, or a mesh). Both ports can speak TLS
(``--tls-cert``/``--tls-key``, with ``--tls-client-ca`` requiring client certificates, e.g. from a mesh sidecar;
``--lease-tls-cert``/``--lease-tls-key`` for the replicas, who get the CA from the launcher). Every error is
answered with a status code and one line; tracebacks go to this log only. See docs/security.md.

On SIGTERM it stops taking tasks, gives running tasks ``--shutdown-grace-seconds`` to finish, and exits. With the
Kubernetes launcher it leaves replica pods running: the next agent adopts them (see docs/deploy.md).

With ``--leader-election`` several pods run and one leads (leader.py). Each pod labels itself
``flyte-actors.io/agent-role`` ``standby`` or ``leader``, and the chart's Service selects the leader, so propeller
and the replicas reach the leader only; standbys answer gRPC health ``NOT_SERVING`` for the connector service and
refuse connector calls with ``UNAVAILABLE``. A leader that loses its Lease exits at once; on SIGTERM it stops
acting, then releases the Lease, leaving running tasks to the replicas and the next leader.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
import uuid
from typing import Awaitable, Callable, List, Optional

import grpc
from flyteidl.admin.agent_pb2 import (
    CreateTaskResponse,
    DeleteTaskResponse,
    GetAgentResponse,
    GetTaskResponse,
    ListAgentsResponse,
)
from flyteidl.service.agent_pb2_grpc import (
    AgentMetadataServiceServicer,
    add_AgentMetadataServiceServicer_to_server,
    add_AsyncAgentServiceServicer_to_server,
)
from flytekit.extend.backend.base_connector import ConnectorRegistry
from flytekit.exceptions.system import FlyteConnectorNotFound
from flytekit.extend.backend import connector_service as connector_metrics
from flytekit.extend.backend.connector_service import AsyncConnectorService
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from flytekitplugins.actor.contract import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE

from .connector import ActorConnector, register
from .launchers.k8s_config import AgentPodConfig
from .lease_service import LeaseService
from .reactor import Reactor
from .status import add_status_command, serve_status, status_command
from .recovery import TaskRecords

log = logging.getLogger("flyte-actor-agent")
ACTOR_TASK_TYPES = (ACTOR_TASK_TYPE, ACTOR_MAP_TASK_TYPE)


def _flag(parser: argparse.ArgumentParser, name: str, env: str, default, help: str, type=str) -> None:
    value = os.environ.get(env, default)
    try:
        value = type(value) if value is not None else None
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(f"{env}={os.environ.get(env)!r} is invalid for {name}: {e}")
    parser.add_argument(name, default=value, type=type, help=f"{help} [{env}]")


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true or false")


def _names(value: str) -> List[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flyte-actor-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the connector, lease service and metrics")
    _flag(serve, "--host", "FLYTE_ACTOR_AGENT_HOST", "127.0.0.1",
          "address to listen on (0.0.0.0: every interface; only behind a NetworkPolicy or firewall)")
    _flag(serve, "--port", "FLYTE_ACTOR_AGENT_PORT", 8000, "Flyte connector gRPC port", int)
    _flag(serve, "--lease-port", "FLYTE_ACTOR_LEASE_PORT", 8001, "replica lease gRPC port", int)
    _flag(serve, "--metrics-port", "FLYTE_ACTOR_METRICS_PORT", 9090, "Prometheus metrics HTTP port (0: off)", int)
    _flag(serve, "--status-port", "FLYTE_ACTOR_STATUS_PORT", 9091,
          "fleet status page HTTP port, read only (0: off)", int)
    _flag(serve, "--launcher", "FLYTE_ACTOR_LAUNCHER", "local", "'kubernetes' (pods) or 'local' (processes)")
    _flag(serve, "--lease-address", "FLYTE_ACTOR_LEASE_ADDRESS", None,
          "host:port replicas dial (default: this host and --lease-port)")
    _flag(serve, "--namespaces", "FLYTE_ACTOR_NAMESPACES", "",
          "comma-separated namespaces replicas may run in (empty: each execution's own)")
    _flag(serve, "--max-ttl-seconds", "FLYTE_ACTOR_MAX_TTL_SECONDS", 0, "cap on environments' ttl_seconds (0: none)",
          int)
    _flag(serve, "--recovery-grace-seconds", "FLYTE_ACTOR_RECOVERY_GRACE_SECONDS", 60.0,
          "after a restart, how long tasks the agent does not know wait for a replica to report them", float)
    _flag(serve, "--shutdown-grace-seconds", "FLYTE_ACTOR_SHUTDOWN_GRACE_SECONDS", 30.0,
          "on SIGTERM, how long running tasks get to finish", float)
    _flag(serve, "--task-records", "FLYTE_ACTOR_TASK_RECORDS", "true",
          "store what rebuilds each task next to its outputs, so a restart loses nothing ('true'/'false')", _boolean)
    _flag(serve, "--leader-election", "FLYTE_ACTOR_LEADER_ELECTION", "false",
          "run as one of several pods, the leader elected through a Kubernetes Lease ('true'/'false')", _boolean)
    _flag(serve, "--leader-election-lease", "FLYTE_ACTOR_LEADER_ELECTION_LEASE", "flyte-actor-agent",
          "name of the Lease object")
    _flag(serve, "--leader-election-namespace", "FLYTE_ACTOR_LEADER_ELECTION_NAMESPACE", "",
          "namespace of the Lease (empty: this pod's own)")
    _flag(serve, "--identity", "FLYTE_ACTOR_POD_NAME", socket.gethostname(), "this pod's name in the Lease")
    _flag(serve, "--tls-cert", "FLYTE_ACTOR_TLS_CERT", None, "PEM certificate (chain) of the connector port")
    _flag(serve, "--tls-key", "FLYTE_ACTOR_TLS_KEY", None, "PEM private key of --tls-cert")
    _flag(serve, "--tls-client-ca", "FLYTE_ACTOR_TLS_CLIENT_CA", None,
          "PEM CA bundle: connector clients must present a certificate it signed (mTLS, e.g. through a mesh)")
    _flag(serve, "--lease-tls-cert", "FLYTE_ACTOR_LEASE_TLS_CERT", None,
          "PEM certificate of the lease port (its names must cover the lease address replicas dial)")
    _flag(serve, "--lease-tls-key", "FLYTE_ACTOR_LEASE_TLS_KEY", None, "PEM private key of --lease-tls-cert")
    _flag(serve, "--lease-tls-ca", "FLYTE_ACTOR_LEASE_TLS_CA", None,
          "PEM CA replicas verify the lease port with (default: --lease-tls-cert itself, for a self-signed one)")
    _flag(serve, "--lease-key-file", "FLYTE_ACTOR_LEASE_KEY_FILE", None,
          "file holding the key lease ids are signed with, kept across restarts so a new agent verifies the leases "
          "adopted replicas claim (default: a fresh key per start)")
    _flag(serve, "--service-accounts", "FLYTE_ACTOR_SERVICE_ACCOUNTS", "default",
          "comma-separated service accounts (shell patterns) replica pods may run as")
    _flag(serve, "--allow-privileged", "FLYTE_ACTOR_ALLOW_PRIVILEGED", False,
          "let pod templates ask for privileged containers", _boolean)
    _flag(serve, "--allow-host-namespaces", "FLYTE_ACTOR_ALLOW_HOST_NAMESPACES", False,
          "let pod templates use hostNetwork, hostPID, hostIPC and host ports", _boolean)
    _flag(serve, "--allow-host-path", "FLYTE_ACTOR_ALLOW_HOST_PATH", False,
          "let pod templates mount hostPath volumes", _boolean)
    _flag(serve, "--allowed-capabilities", "FLYTE_ACTOR_ALLOWED_CAPABILITIES", "",
          "comma-separated Linux capabilities pod templates may add beyond Kubernetes' baseline set")
    _flag(serve, "--trusted-bundle-prefixes", "FLYTE_ACTOR_TRUSTED_BUNDLE_PREFIXES", "",
          "local launcher: comma-separated URL prefixes code bundles may come from besides local paths")
    _flag(serve, "--plugins-config", "FLYTE_ACTOR_PLUGINS_CONFIG", None,
          "YAML file with propeller's plugins.k8s and plugins.logs sections and flyteadmin's task_resources: "
          "cluster defaults for replica pods and log links (see docs/deploy.md)")
    _flag(serve, "--max-message-bytes", "FLYTE_ACTOR_MAX_MESSAGE_BYTES", 512 * 1024 * 1024,
          "largest gRPC message the connector port accepts (CreateTask carries the task's inputs inline)", int)
    _flag(serve, "--max-output-bytes", "FLYTE_ACTOR_MAX_OUTPUT_BYTES", 2 * 1024 ** 3,
          "a task (or map element) whose outputs.pb is larger fails, naming this cap (0: no cap)", int)
    add_status_command(sub)
    args = parser.parse_args(argv)
    if args.command != "serve":
        return args
    if args.launcher not in ("local", "kubernetes"):
        parser.error(f"--launcher {args.launcher!r} is not a launcher: use 'kubernetes' or 'local'")
    for cert, key in (("tls_cert", "tls_key"), ("lease_tls_cert", "lease_tls_key")):
        if bool(getattr(args, cert)) != bool(getattr(args, key)):
            flag = cert.replace("_", "-")
            parser.error(f"--{flag} and --{flag[:-4]}key go together: give both or neither")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS)")
    try:
        args.pod_config = AgentPodConfig.load(args.plugins_config)
    except ValueError as e:
        parser.error(f"--plugins-config: {e}")
    return args


class ActorAgentService(AsyncConnectorService):
    """flytekit's connector service for the actor task types only. Its calls are answered here rather than by
    flytekit's, which turns every exception into INTERNAL with the server's traceback: a task the agent will not
    run is INVALID_ARGUMENT with one line saying why, an unexpected error is INTERNAL with one line and an id to
    find the traceback in this agent's log. While this pod is a standby (``leading`` unset) it refuses every call.
    """

    def __init__(self, leading: Optional[threading.Event] = None):
        super().__init__()
        self.leading = leading

    async def _check(self, task_type: str, context) -> None:
        if self.leading is not None and not self.leading.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this flyte-actor-agent pod is a standby (not the "
                                "leader); retry through the Service, which routes to the pod labelled leader")
        await _only_actor_types(task_type, context)

    async def CreateTask(self, request, context):
        task_type = request.template.type
        await self._check(task_type, context)

        async def create():
            template = TaskTemplate.from_flyte_idl(request.template)
            connector = ConnectorRegistry.get_connector(template.type, template.task_type_version)
            meta = await connector.create(
                task_template=template,
                # As they came: flytekit's service would turn them into Python models and the connector back, which
                # takes seconds for a map over 100,000 elements, past propeller's 3 s deadline.
                inputs=request.inputs if request.HasField("inputs") else None,
                output_prefix=request.output_prefix,
                task_execution_metadata=TaskExecutionMetadata.from_flyte_idl(request.task_execution_metadata),
            )
            return CreateTaskResponse(resource_meta=meta.encode())

        return await _answer(context, "create", task_type, create)

    async def GetTask(self, request, context):
        task_type = request.task_category.name or request.task_type
        await self._check(task_type, context)

        async def get():
            connector = ConnectorRegistry.get_connector(task_type, request.task_category.version)
            resource = await connector.get(resource_meta=_metadata(connector, request.resource_meta))
            return GetTaskResponse(resource=await resource.to_flyte_idl())

        return await _answer(context, "get", task_type, get)

    async def DeleteTask(self, request, context):
        task_type = request.task_category.name or request.task_type
        await self._check(task_type, context)

        async def delete():
            connector = ConnectorRegistry.get_connector(task_type, request.task_category.version)
            await connector.delete(resource_meta=_metadata(connector, request.resource_meta))
            return DeleteTaskResponse()

        return await _answer(context, "delete", task_type, delete)


def _metadata(connector, raw: bytes):
    try:
        return connector.metadata_type.decode(raw)
    except Exception as e:  # noqa: BLE001 - whatever the bytes were, they are not ours
        raise ValueError(f"resource_meta ({len(raw)} bytes) is not an actor task's metadata: {type(e).__name__}; "
                         "pass the resource_meta CreateTask returned") from None


async def _answer(context, operation: str, task_type: str, call: Callable[[], Awaitable]):
    """Run ``call``; map its errors to a status code and one line (the line is cut to 1,000 characters). Counted in
    flytekit's own connector metrics, as its connector service counts them."""
    try:
        with connector_metrics.request_latency.labels(task_type=task_type, operation=operation).time():
            answer = await call()
        connector_metrics.request_success_count.labels(task_type=task_type, operation=operation).inc()
        return answer
    except FlyteConnectorNotFound:
        code, line = grpc.StatusCode.NOT_FOUND, (f"this agent has no connector for {task_type!r} at that task type "
                                                 "version; flytekit.map_task over actor tasks is not supported, use "
                                                 "flytekitplugins.actor.map")
    except ValueError as e:  # contract.InvalidTask, and the connector's own checks of what it was sent
        code, line = grpc.StatusCode.INVALID_ARGUMENT, str(e)
    except Exception as e:  # noqa: BLE001 - a bug or an outage of the agent: the client gets one line
        incident = uuid.uuid4().hex[:12]
        log.exception("%s of a %s task failed (incident %s)", operation, task_type, incident)
        code, line = grpc.StatusCode.INTERNAL, (f"the actor agent failed to {operation} the task: {type(e).__name__}; "
                                                f"its log has the details under incident {incident}")
    connector_metrics.request_failure_count.labels(task_type=task_type, operation=operation,
                                                   error_code=code.value[0]).inc()
    line = " ".join(line.split())
    await context.abort(code, line if len(line) <= 1000 else line[:997] + "...")

    async def _check(self, task_type: str, context) -> None:
        if self.leading is not None and not self.leading.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this flyte-actor-agent pod is a standby (not the "
                                "leader); retry through the Service, which routes to the pod labelled leader")
        await _only_actor_types(task_type, context)


async def _only_actor_types(task_type: str, context) -> None:
    if task_type not in ACTOR_TASK_TYPES:
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"this agent runs only task types {list(ACTOR_TASK_TYPES)}, not {task_type!r}; route {task_type!r} to "
            "another agent in propeller's agent-service configuration",
        )


class ActorMetadataService(AgentMetadataServiceServicer):
    """Advertises the actor connector only (flytekit registers its sensor connector on import)."""

    async def GetAgent(self, request, context):
        if request.name != ActorConnector.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no agent named {request.name!r} here")
        return GetAgentResponse(agent=ConnectorRegistry.get_connector_metadata(ActorConnector.name))

    async def ListAgents(self, request, context):
        return ListAgentsResponse(agents=[ConnectorRegistry.get_connector_metadata(ActorConnector.name)])


def make_launcher_factory(args: argparse.Namespace):
    if args.launcher == "kubernetes":
        from .launchers.kubernetes import KubernetesLauncher
        from .launchers.pod_policy import BASELINE_CAPABILITIES, PodPolicy

        namespaces = _names(args.namespaces)
        policy = PodPolicy(
            namespaces=tuple(namespaces),
            service_accounts=tuple(_names(args.service_accounts)),
            allow_privileged=args.allow_privileged,
            allow_host_namespaces=args.allow_host_namespaces,
            allow_host_path=args.allow_host_path,
            allowed_capabilities=BASELINE_CAPABILITIES | {c.upper() for c in _names(args.allowed_capabilities)},
        )
        return lambda on_exit: KubernetesLauncher(
            on_exit, namespaces=namespaces, pod_config=args.pod_config, policy=policy,
            agent_namespace=os.environ.get("FLYTE_ACTOR_AGENT_NAMESPACE", ""),
        )
    from .launchers.local import LocalProcessLauncher

    trusted = _names(args.trusted_bundle_prefixes)
    return lambda on_exit: LocalProcessLauncher(on_exit, trusted_bundles=trusted)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"flyte-actor-agent: cannot read {what} {path!r}: {e.strerror}") from None


def server_credentials(cert: Optional[str], key: Optional[str],
                       client_ca: Optional[str] = None) -> Optional[grpc.ServerCredentials]:
    """TLS for a port from PEM files, requiring client certificates signed by ``client_ca`` when given."""
    if not cert:
        return None
    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def lease_key(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    key = _read(path, "lease signing key").strip()
    if len(key) < 16:
        raise SystemExit(f"flyte-actor-agent: the lease signing key in {path!r} has {len(key)} bytes; it needs at "
                         "least 16 (the chart generates 32)")
    return key


def make_lease_service(args: argparse.Namespace):
    credentials = server_credentials(args.lease_tls_cert, args.lease_tls_key)
    ca = _read(args.lease_tls_ca or args.lease_tls_cert, "lease CA").decode() if credentials else ""
    return lambda reactor: LeaseService(reactor, args.host, args.lease_port, args.lease_address or None,
                                        credentials=credentials, ca_certificate=ca)


HEALTH_SERVICES = ("flyteidl.service.AsyncAgentService", "flyteidl.service.AgentMetadataService", "")


def start_agent(args: argparse.Namespace) -> Reactor:
    agent = Reactor(
        make_launcher_factory(args),
        max_ttl_seconds=args.max_ttl_seconds or None,
        recovery_grace=args.recovery_grace_seconds,
        lease_key=lease_key(args.lease_key_file),
        max_output_bytes=args.max_output_bytes,
    ).start(make_lease_service(args))
    register(lambda: agent, args.pod_config.logs, TaskRecords() if args.task_records else None)
    agent.metrics.watch(agent.scheduler, agent.call)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=agent.metrics.exported())
    if args.status_port:
        try:
            serve_status(agent, args.host, args.status_port)
        except OSError as e:
            raise SystemExit(f"flyte-actor-agent: cannot serve the status page on {args.host}:{args.status_port}: "
                             f"{e.strerror or e}; pick another --status-port, or 0 to turn it off")
    return agent


def _fenced() -> None:
    """This pod led and could not renew its Lease: another pod may take over, so it must stop acting now. Exiting
    is the one stop that cannot leave a lease or a launch half done; Kubernetes restarts it as a standby."""
    log.critical("leader election: lost the Lease; exiting so that only the new leader acts")
    logging.shutdown()
    os._exit(1)


def _elector(args: argparse.Namespace, on_elected):
    """The Lease elector and the pod's role label (standby from now on)."""
    from kubernetes import config

    from .leader import KubernetesLeaseStore, LeaderElector, PodRole

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    namespace = args.leader_election_namespace or _own_namespace()
    role = PodRole(args.identity, namespace)
    role.mark("standby")  # a pod restarted after leading may still carry the leader label
    store = KubernetesLeaseStore(args.leader_election_lease, namespace)
    return LeaderElector(store, args.identity, on_elected=on_elected, on_lost=_fenced), role


def _own_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    raise SystemExit("flyte-actor-agent: --leader-election needs --leader-election-namespace (or POD_NAMESPACE) "
                     "outside a pod")


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    leading = threading.Event()
    elected = asyncio.Event()
    elector = role = None
    if args.leader_election:
        elector, role = await asyncio.to_thread(_elector, args, lambda: loop.call_soon_threadsafe(elected.set))
    else:
        elected.set()

    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", args.max_message_bytes),
        ("grpc.max_send_message_length", args.max_message_bytes),
    ])
    add_AsyncAgentServiceServicer_to_server(ActorAgentService(leading), server)
    add_AgentMetadataServiceServicer_to_server(ActorMetadataService(), server)
    health_servicer = health.aio.HealthServicer()
    for service in HEALTH_SERVICES[:-1]:  # the connector serves once this pod leads
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    # The process is alive (the probes' ""): not Ready before it leads only without leader election.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING if elector is not None
                              else health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    address = f"{args.host}:{args.port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"flyte-actor-agent: cannot listen on {address}")
    await server.start()

    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if elector is not None:
        log.info("standby %s: waiting for the Lease %s", args.identity, args.leader_election_lease)
        threading.Thread(target=elector.run, name="leader-election", daemon=True).start()
    await asyncio.wait([asyncio.ensure_future(elected.wait()), asyncio.ensure_future(stopping.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    agent = None
    if elected.is_set() and not stopping.is_set():
        try:
            agent = await asyncio.to_thread(start_agent, args)
        except SystemExit:  # a port it cannot have: one line (the SystemExit's), after closing the connector port
            await server.stop(grace=None)
            raise
        leading.set()
        if role is not None:
            try:
                await asyncio.to_thread(role.mark, "leader")
            except RuntimeError as e:  # unreachable for propeller: give the Lease to a pod that can be reached
                log.error("%s; stepping down", e)
                stopping.set()
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("connector on %s:%s (%s), leases on %s (%s), metrics on :%s, status on :%s", args.host, args.port,
                 "TLS" if credentials else "plaintext", agent.lease_address,
                 "TLS" if agent.channel.ca_certificate else "plaintext", args.metrics_port, args.status_port)
    await stopping.wait()
    await health_servicer.enter_graceful_shutdown()
    if elector is None:
        log.info("shutting down: no new tasks, %ss for running ones", args.shutdown_grace_seconds)
        # The connector keeps answering GetTask during the drain: propeller collects the results of the tasks
        # that finish in it (the drain ends once they are read, or at the grace); only then does the port close.
        if agent is not None:
            await asyncio.to_thread(agent.shutdown, args.shutdown_grace_seconds)
        await server.stop(grace=5)
        return
    # Several pods: running tasks carry on in the replicas, which reconnect to the next leader; so stop acting
    # first, then hand the Lease over at once.
    log.info("shutting down: stepping down as leader")
    leading.clear()
    await server.stop(grace=1)
    if agent is not None:
        await asyncio.to_thread(agent.stop)
    await asyncio.to_thread(elector.release)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=os.environ.get("FLYTE_ACTOR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.command == "status":
        raise SystemExit(status_command(args))
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
