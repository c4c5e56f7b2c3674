"""``flyte-actor-agent serve``: the actor agent as a service for a Flyte cluster.

One process serves the Flyte connector API (flyteidl ``AsyncAgentService``, ``AgentMetadataService`` and gRPC
health) for the ``actor`` and ``actor-map`` task types only, the replica lease service on its own port, and
Prometheus metrics over HTTP. Every flag can also be set by the environment variable shown in ``--help``.

On SIGTERM it stops taking tasks, gives running tasks ``--shutdown-grace-seconds`` to finish, and exits. With the
Kubernetes launcher it leaves replica pods running: the next agent adopts them (see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import List, Optional

import grpc
from flyteidl.service.agent_pb2_grpc import (
    AgentMetadataServiceServicer,
    add_AgentMetadataServiceServicer_to_server,
    add_AsyncAgentServiceServicer_to_server,
)
from flyteidl.admin.agent_pb2 import GetAgentResponse, ListAgentsResponse
from flytekit.extend.backend.base_connector import ConnectorRegistry
from flytekit.extend.backend.connector_service import AsyncConnectorService
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from flytekitplugins.actor.contract import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE

from .connector import ActorConnector, register
from .lease_service import LeaseService
from .reactor import Reactor

log = logging.getLogger("flyte-actor-agent")
ACTOR_TASK_TYPES = (ACTOR_TASK_TYPE, ACTOR_MAP_TASK_TYPE)


def _flag(parser: argparse.ArgumentParser, name: str, env: str, default, help: str, type=str) -> None:
    value = os.environ.get(env, default)
    parser.add_argument(name, default=type(value) if value is not None else None, type=type, help=f"{help} [{env}]")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flyte-actor-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the connector, lease service and metrics")
    _flag(serve, "--host", "FLYTE_ACTOR_AGENT_HOST", "0.0.0.0", "address to listen on")
    _flag(serve, "--port", "FLYTE_ACTOR_AGENT_PORT", 8000, "Flyte connector gRPC port", int)
    _flag(serve, "--lease-port", "FLYTE_ACTOR_LEASE_PORT", 8001, "replica lease gRPC port", int)
    _flag(serve, "--metrics-port", "FLYTE_ACTOR_METRICS_PORT", 9090, "Prometheus metrics HTTP port (0: off)", int)
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
    _flag(serve, "--unschedulable-grace-seconds", "FLYTE_ACTOR_UNSCHEDULABLE_GRACE_SECONDS", 120.0,
          "how long a replica pod may stay unschedulable before its tasks fail", float)
    args = parser.parse_args(argv)
    if args.launcher not in ("local", "kubernetes"):
        parser.error(f"--launcher {args.launcher!r} is not a launcher: use 'kubernetes' or 'local'")
    return args


class ActorAgentService(AsyncConnectorService):
    """flytekit's connector service, refusing task types other than the actor ones."""

    async def CreateTask(self, request, context):
        await _only_actor_types(request.template.type, context)
        return await super().CreateTask(request, context)

    async def GetTask(self, request, context):
        await _only_actor_types(request.task_category.name or request.task_type, context)
        return await super().GetTask(request, context)

    async def DeleteTask(self, request, context):
        await _only_actor_types(request.task_category.name or request.task_type, context)
        return await super().DeleteTask(request, context)


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

        namespaces = [n.strip() for n in args.namespaces.split(",") if n.strip()]
        return lambda on_exit: KubernetesLauncher(
            on_exit, namespaces=namespaces, unschedulable_grace=args.unschedulable_grace_seconds
        )
    from .launchers.local import LocalProcessLauncher

    return lambda on_exit: LocalProcessLauncher(on_exit)


async def serve(args: argparse.Namespace) -> None:
    agent = Reactor(
        make_launcher_factory(args),
        max_ttl_seconds=args.max_ttl_seconds or None,
        recovery_grace=args.recovery_grace_seconds,
    ).start(lambda reactor: LeaseService(reactor, args.host, args.lease_port, args.lease_address or None))
    register(lambda: agent)
    agent.metrics.watch(agent.scheduler, agent.call)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=agent.metrics.registry)

    server = grpc.aio.server()
    add_AsyncAgentServiceServicer_to_server(ActorAgentService(), server)
    add_AgentMetadataServiceServicer_to_server(ActorMetadataService(), server)
    health_servicer = health.aio.HealthServicer()
    for service in ("flyteidl.service.AsyncAgentService", "flyteidl.service.AgentMetadataService", ""):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{args.host}:{args.port}") == 0:
        raise SystemExit(f"flyte-actor-agent: cannot listen on {args.host}:{args.port}")
    await server.start()
    log.info("connector on %s:%s, leases on %s, metrics on :%s", args.host, args.port, agent.lease_address,
             args.metrics_port)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down: no new tasks, %ss for running ones", args.shutdown_grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    await asyncio.to_thread(agent.shutdown, args.shutdown_grace_seconds)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=os.environ.get("FLYTE_ACTOR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
