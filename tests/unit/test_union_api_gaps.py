"""What Union's actors accept and ours must too, or refuse at declaration with what to do instead: environment
names with dots and underscores (replica pod names stay DNS-1123 labels), and ``@dynamic`` actor tasks (refused;
a plain ``@dynamic`` that calls actor tasks works).
"""

from __future__ import annotations

import re

import pytest
from flytekit import dynamic

from flytekitplugins.actor import ActorEnvironment
from flytekitplugins.actor.contract import SerializedEnvironment

from flyte_actor_agent.launchers import ReplicaLaunch
from flyte_actor_agent.launchers.kubernetes import build_replica
from flyte_actor_agent.placement import Placement

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize("name", ["team.my-actor", "my_actor", "a.b_c-d", "a" * 63])
def test_environment_names_with_dots_and_underscores_are_accepted(name):
    assert ActorEnvironment(name=name).name == name


@pytest.mark.parametrize("name", ["Team.actor", ".actor", "actor.", "actor_", "a b", "a/b", "a" * 64])
def test_other_names_are_refused_with_the_rule(name):
    with pytest.raises(ValueError) as error:
        ActorEnvironment(name=name)
    assert repr(name) in str(error.value) and "'.'" in str(error.value)


@pytest.mark.parametrize("name", ["team.my-actor", "my_actor", "x" * 60 + ".y_z"])
def test_replica_pod_and_secret_names_stay_dns_labels(name):
    environment = SerializedEnvironment(name=name, version="0123456789abcdef", replica_count=1, ttl_seconds=60,
                                        parallelism=1, replica={"image": "img"})
    launch = ReplicaLaunch(replica_id="abcdef012345", token="t", fleet_key=environment.key, environment=environment,
                           agent_address="agent:8001", placement=Placement(namespace="ns"))
    secret, pod = build_replica(launch, "ns")
    assert DNS_LABEL.match(pod["metadata"]["name"]) and DNS_LABEL.match(secret["metadata"]["name"])
    assert pod["metadata"]["labels"]["flyte-actors.io/environment"] == name  # label values may hold '.' and '_'


actor = ActorEnvironment(name="gaps.actor", replica_count=1, ttl_seconds=60)


def test_dynamic_actor_tasks_are_refused_at_declaration_with_what_to_do():
    with pytest.raises(TypeError) as error:
        @dynamic(task_config=actor)
        def fan_out(n: int) -> int:
            return n

    message = str(error.value)
    assert "fan_out" in message and "@dynamic" in message and "without task_config" in message
    assert "'gaps.actor'" in message


@actor.task
def double(x: int) -> int:
    return 2 * x


@dynamic
def fan_out(n: int) -> list[int]:
    return [double(x=i) for i in range(n)]


def test_a_plain_dynamic_calls_actor_tasks(monkeypatch):
    monkeypatch.setenv("FLYTE_ACTOR_LOCAL_MODE", "inprocess")
    assert fan_out(n=3) == [0, 2, 4]
