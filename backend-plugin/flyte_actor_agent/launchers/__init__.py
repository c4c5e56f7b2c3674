"""Launchers start and stop replicas; the agent tells them what to launch and they tell it when a replica ends.

A launcher is the only code that touches processes or pods. It is handed a callback, ``on_exit(replica_id,
exit)``, which it must call exactly once for every replica it launched, when that replica is gone for whatever
reason (exited, killed, pod failed or deleted, could not be created), with a :class:`ReplicaExit`: a bounded
reason and a detail a person can act on.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Dict, List

from flytekitplugins.actor.contract import SerializedEnvironment

from ..placement import Placement
from ..scheduler import ExitReason, ReplicaExit

OnExit = Callable[[str, ReplicaExit], None]

__all__ = ["AdoptedReplica", "ExitReason", "LaunchRefused", "Launcher", "OnExit", "ReplicaExit", "ReplicaLaunch"]


class LaunchRefused(Exception):
    """The agent's policy forbids this replica as its environment asks for it (see :mod:`.pod_policy`): trying
    again cannot help, so its tasks fail at once with this one-line message."""


@dataclass(frozen=True)
class ReplicaLaunch:
    replica_id: str
    token: str
    #: The fleet the replica joins (the environment key, plus the namespace where there is one).
    fleet_key: str
    environment: SerializedEnvironment
    #: Where the replica reaches the agent's lease service (host:port).
    agent_address: str
    #: Where the replica runs and on whose behalf (namespace, service account, project, domain).
    placement: Placement
    #: PEM of the CA that signed the lease service's TLS certificate ("" when the lease port is plain).
    agent_ca: str = ""

    def worker_env(self) -> Dict[str, str]:
        """Variables the replica worker reads (see flytekitplugins.actor.worker.replica), token excluded."""
        env = {
            "FLYTE_ACTOR_AGENT_ADDRESS": self.agent_address,
            "FLYTE_ACTOR_ENVIRONMENT_KEY": self.fleet_key,
            "FLYTE_ACTOR_REPLICA_ID": self.replica_id,
            "FLYTE_ACTOR_PARALLELISM": str(self.environment.parallelism),
        }
        if self.agent_ca:
            env["FLYTE_ACTOR_AGENT_CA"] = self.agent_ca
        return env


@dataclass(frozen=True)
class AdoptedReplica:
    """A replica a previous agent launched that is still running (found by a launcher whose replicas outlive
    the agent)."""

    replica_id: str
    token: str
    fleet_key: str
    environment: SerializedEnvironment
    placement: Placement


class Launcher(abc.ABC):
    #: Whether replicas keep running when the agent stops (pods), so that the next agent adopts them.
    replicas_outlive_agent = False

    def __init__(self, on_exit: OnExit):
        self.on_exit = on_exit

    @abc.abstractmethod
    async def launch(self, replica: ReplicaLaunch) -> None:
        """Start the replica and return without waiting for it to connect."""

    @abc.abstractmethod
    async def stop(self, replica_id: str, reason: str) -> None:
        """Stop the replica (gracefully if it can); ``on_exit`` follows when it is gone."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the launcher: stop the replicas it started, unless they outlive the agent."""

    def check_bundle(self, distribution: str) -> None:
        """Raise :class:`ValueError` if replicas must not fetch this code bundle. Default: any, as a Flyte task
        pod would (the local launcher, whose replicas run on the agent's host, trusts only configured places)."""

    async def adopt(self) -> List[AdoptedReplica]:
        """Replicas a previous agent left running (only where they outlive the agent)."""
        return []
