"""The one builder of fleets (``flyte_actor_agent.placement``): what the connector makes from a task and what a
restarted agent makes from a replica pod must be the same fleet, or adopted replicas never get work."""

from types import SimpleNamespace

from flyte_actor_agent.placement import Placement, fleet_config
from flytekitplugins.actor.contract import SerializedEnvironment

ENVIRONMENT = SerializedEnvironment(name="env", version="0123456789abcdef", replica_count=3, ttl_seconds=600,
                                    parallelism=2, replica={"image": "i"})


def metadata(namespace="team-a", service_account="sa", project="p", domain="d"):
    execution = SimpleNamespace(project=project, domain=domain, name="exec")
    task_id = SimpleNamespace(node_execution_id=SimpleNamespace(execution_id=execution, node_id="n0"), retry_attempt=0)
    return SimpleNamespace(namespace=namespace, k8s_service_account=service_account, task_execution_id=task_id)


def test_a_placement_is_read_from_the_execution_metadata_and_survives_its_pod_annotation():
    placement = Placement.of_execution(metadata())
    assert placement == Placement(namespace="team-a", service_account="sa", project="p", domain="d")
    assert Placement.from_json(placement.to_json()) == placement
    assert Placement.of_execution(None) == Placement()


def test_the_fleet_of_a_task_and_of_its_adopted_replica_are_equal():
    from_task = fleet_config(ENVIRONMENT, Placement.of_execution(metadata()), max_ttl_seconds=None)
    from_pod = fleet_config(ENVIRONMENT, Placement.from_json(from_task.placement.to_json()))
    assert from_task == from_pod
    assert (from_task.key, from_task.lineage) == ("env-0123456789abcdef.team-a", "env.team-a")
    assert (from_task.replica_count, from_task.parallelism, from_task.ttl_seconds) == (3, 2, 600)
    assert from_task.environment is ENVIRONMENT


def test_fleets_are_per_namespace_and_the_agent_caps_their_ttl():
    local = fleet_config(ENVIRONMENT, Placement(), max_ttl_seconds=60)
    assert (local.key, local.ttl_seconds) == ("env-0123456789abcdef", 60)
    assert fleet_config(ENVIRONMENT, Placement(namespace="b")).key != fleet_config(ENVIRONMENT, Placement(namespace="c")).key
