"""Unit tests of the flytekit side of actors (``flytekitplugins.actor``).

Covered: ``ActorEnvironment`` validation, ``@actor.task`` argument checks and pass-through, serialization of actor
tasks and actor maps (task type, container target, ``custom`` after a protobuf Struct round trip, environment
versions), the refusal of ``flytekit.map_task``, the actor map's interface and argument validation, and
``TaskCommand.from_args`` on the container args propeller hands to the agent.
"""

from __future__ import annotations

import functools
import typing
from collections import OrderedDict
from datetime import timedelta

import flytekit
import pytest
from flytekit import PodTemplate, Resources
from flytekit.configuration import FastSerializationSettings, ImageConfig, SerializationSettings
from flytekit.tools.translator import get_serializable
from google.protobuf import json_format, struct_pb2
from kubernetes.client import V1Container, V1PodSpec

from flytekitplugins.actor import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE, ActorEnvironment, map
from flytekitplugins.actor.contract import ActorCustom, TaskCommand

IMAGE = "ghcr.io/x/y:1"
SETTINGS = SerializationSettings(ImageConfig.auto(img_name=IMAGE))
RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"

actor = ActorEnvironment(name="sdk-actor", replica_count=2, ttl_seconds=60)


@actor.task
def add(x: int, y: int) -> int:
    return x + y


@actor.task
def negate(x: int) -> int:
    return -x


@flytekit.task
def plain(x: int) -> int:
    return x


def serialize(entity, settings: SerializationSettings = SETTINGS):
    """The entity's TaskTemplate, as registration would send it."""
    return get_serializable(OrderedDict(), settings, entity).template


def struct_round_trip(custom: dict) -> dict:
    """``custom`` as the agent reads it back: through a protobuf Struct, where every number is a double."""
    return json_format.MessageToDict(json_format.ParseDict(custom, struct_pb2.Struct()))


def decoded_custom(entity) -> ActorCustom:
    return ActorCustom.from_custom(struct_round_trip(serialize(entity).custom))


def environment_version(env: ActorEnvironment) -> str:
    @env.task
    def probe(x: int) -> int:
        return x

    return decoded_custom(probe).environment.version


# ------------------------------------------------------------------------------------------- environment validation


@pytest.mark.parametrize("name", ["Bad_Name", "", "-x", "a" * 64])
def test_environment_names_must_be_dns_labels(name):
    with pytest.raises(ValueError) as error:
        ActorEnvironment(name=name)
    assert repr(name) in str(error.value)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("replica_count", 0),
        ("replica_count", 1001),
        ("replica_count", True),
        ("replica_count", 1.5),
        ("ttl_seconds", 5),
        ("ttl_seconds", 8 * 24 * 3600),
        ("parallelism", 0),
    ],
)
def test_environment_numbers_out_of_range_or_not_integers_are_refused(argument, value):
    with pytest.raises(ValueError) as error:
        ActorEnvironment(name="ok", **{argument: value})
    assert f"{argument}={value!r}" in str(error.value)


def test_environment_variables_must_be_strings():
    with pytest.raises(ValueError) as error:
        ActorEnvironment(name="ok", environment={"GOOD": "1", "PORT": 8080})
    assert "{'PORT': 8080}" in str(error.value)


@pytest.mark.parametrize("argument", ["requests", "limits"])
def test_resources_must_be_flytekit_resources(argument):
    with pytest.raises(TypeError) as error:
        ActorEnvironment(name="ok", **{argument: {"cpu": "1"}})
    assert argument in str(error.value) and "{'cpu': '1'}" in str(error.value)


def test_a_valid_environment_uses_the_default_ttl_when_none_is_given():
    assert ActorEnvironment(name="a-1", replica_count=1000, parallelism=256).effective_ttl_seconds == 900
    assert ActorEnvironment(name="a" * 63, ttl_seconds=7 * 24 * 3600).effective_ttl_seconds == 7 * 24 * 3600


# ----------------------------------------------------------------------------------------------------- @actor.task


@pytest.mark.parametrize(
    "kwargs",
    [
        {"container_image": "ghcr.io/x/other:1"},
        {"requests": Resources(cpu="2")},
        {"pod_template": PodTemplate(pod_spec=V1PodSpec(containers=[]))},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_replica_settings_cannot_be_set_per_task(kwargs):
    with pytest.raises(TypeError) as error:
        actor.task(**kwargs)
    (argument,) = kwargs
    assert argument in str(error.value) and "'sdk-actor'" in str(error.value)


def test_per_task_settings_pass_through_to_flytekit():
    @actor.task(cache=True, cache_version="v1", retries=2, timeout=30)
    def cached(x: int) -> int:
        return x

    metadata = cached.metadata
    assert (metadata.cache, metadata.cache_version, metadata.retries) == (True, "v1", 2)
    assert metadata.timeout == timedelta(seconds=30)
    assert cached.actor_environment is actor


def test_flytekit_task_with_an_actor_environment_as_task_config_is_an_actor_task():
    gpu_env = ActorEnvironment(name="cfg-actor", container_image="ghcr.io/x/gpu:1", requests=Resources(cpu="2"),
                               interruptible=True)

    @flytekit.task(task_config=gpu_env, retries=1)
    def double(x: int) -> int:
        return 2 * x

    template = serialize(double)
    assert template.type == ACTOR_TASK_TYPE and template.container.image == "ghcr.io/x/gpu:1"
    assert double.actor_environment is gpu_env and double.metadata.interruptible is True
    assert ActorCustom.from_custom(struct_round_trip(template.custom)).environment.name == "cfg-actor"
    with pytest.raises(TypeError, match="requests.*'cfg-actor'"):
        flytekit.task(task_config=gpu_env, requests=Resources(cpu="1"))(lambda x: x)
    with pytest.raises(TypeError, match="interruptible"):
        flytekit.task(task_config=gpu_env, interruptible=False)(lambda x: x)


def test_tasks_and_maps_take_the_same_arguments_from_their_environment():
    from flytekit.extras.accelerators import T4

    gpu_env = ActorEnvironment(name="gpu-args", accelerator=T4, interruptible=True, limits=Resources(gpu="1"),
                               environment={"A": "1"})

    @gpu_env.task
    def infer(x: int) -> int:
        return x

    task_template, map_template = serialize(infer), serialize(map(infer))
    for template in (task_template, map_template):
        assert template.metadata.interruptible is True
        assert template.extended_resources.gpu_accelerator.device == "nvidia-tesla-t4"
        assert template.container.env == {"A": "1"}
    assert task_template.container.resources == map_template.container.resources


# --------------------------------------------------------------------------------------------------- serialization


def test_an_actor_task_serializes_as_an_actor_container_task():
    template = serialize(add)
    assert template.type == ACTOR_TASK_TYPE
    assert template.container is not None and template.container.image == IMAGE
    assert template.k8s_pod is None


def test_custom_survives_a_struct_round_trip_with_integers_intact():
    raw = serialize(add).custom
    assert isinstance(struct_round_trip(raw)["environment"]["replica_count"], float)  # what the agent receives
    environment = decoded_custom(add).environment
    assert (environment.name, environment.replica_count, environment.ttl_seconds, environment.parallelism) == (
        "sdk-actor",
        2,
        60,
        1,
    )
    assert all(type(v) is int for v in (environment.replica_count, environment.ttl_seconds, environment.parallelism))
    assert environment.replica["image"] == IMAGE
    assert environment.key == f"sdk-actor-{environment.version}"


def test_an_environment_pod_template_goes_to_custom_not_to_a_pod_target():
    env = ActorEnvironment(
        name="with-pod",
        pod_template=PodTemplate(
            primary_container_name="primary",
            labels={"team": "ml"},
            pod_spec=V1PodSpec(containers=[V1Container(name="primary")]),
        ),
    )

    @env.task
    def in_pod(x: int) -> int:
        return x

    template = serialize(in_pod)
    assert template.k8s_pod is None and template.container is not None
    pod_template = ActorCustom.from_custom(struct_round_trip(template.custom)).environment.replica["pod_template"]
    assert pod_template["primary_container_name"] == "primary"
    assert pod_template["labels"] == {"team": "ml"}
    assert pod_template["pod_spec"]["containers"][0]["name"] == "primary"


def test_tasks_of_one_environment_share_its_version():
    assert decoded_custom(add).environment.version == decoded_custom(negate).environment.version


@pytest.mark.parametrize(
    "changed, same_fleet",
    [
        ({"container_image": "ghcr.io/x/other:2"}, False),
        ({"requests": Resources(cpu="2", mem="4Gi")}, False),
        ({"replica_count": 7}, True),
        ({"ttl_seconds": 3600}, True),
    ],
    ids=["image", "requests", "replica_count", "ttl_seconds"],
)
def test_only_what_makes_a_replica_changes_the_environment_version(changed, same_fleet):
    base = {"name": "versioned", "replica_count": 1, "ttl_seconds": 60}
    versions_equal = environment_version(ActorEnvironment(**base)) == environment_version(
        ActorEnvironment(**{**base, **changed})
    )
    assert versions_equal is same_fleet


# ------------------------------------------------------------------------------------------------------ actor maps


def test_flytekit_map_task_refuses_actor_tasks():
    for target in (add, functools.partial(add, y=1)):
        with pytest.raises(TypeError) as error:
            flytekit.map_task(target)
        assert "flytekitplugins.actor.map" in str(error.value)


def test_a_map_turns_mapped_inputs_and_outputs_into_lists_and_keeps_bound_inputs():
    mapped = map(functools.partial(add, y=1))
    assert mapped.python_interface.inputs == {"x": typing.List[int], "y": int}
    assert mapped.python_interface.outputs == {"o0": typing.List[int]}
    assert (mapped.map_options.mapped_inputs, mapped.map_options.bound_inputs) == (["x"], ["y"])


def test_a_map_with_min_success_ratio_below_one_has_optional_elements():
    mapped = map(functools.partial(add, y=1), min_success_ratio=0.5)
    assert mapped.python_interface.outputs == {"o0": typing.List[typing.Optional[int]]}


def test_concurrency_zero_means_no_limit_as_in_union():
    assert map(negate, concurrency=0).map_options.concurrency is None


def test_min_successes_makes_elements_optional_and_round_trips_through_custom():
    mapped = map(functools.partial(add, y=1), min_successes=2)
    assert mapped.python_interface.outputs == {"o0": typing.List[typing.Optional[int]]}
    custom = ActorCustom.from_custom(struct_round_trip(serialize(mapped).custom))
    assert custom.map.min_successes == 2 and type(custom.map.min_successes) is int


def test_a_map_serializes_as_one_actor_map_task_running_the_element_command():
    mapped = map(functools.partial(add, y=1), concurrency=3, min_success_ratio=0.75)
    template = serialize(mapped)
    assert template.type == ACTOR_MAP_TASK_TYPE
    assert list(template.container.args) == list(serialize(add).container.args)
    custom = ActorCustom.from_custom(struct_round_trip(template.custom))
    assert custom.map.concurrency == 3 and type(custom.map.concurrency) is int
    assert custom.map.min_success_ratio == 0.75
    assert (custom.map.mapped_inputs, custom.map.bound_inputs) == (["x"], ["y"])
    assert custom.environment.version == decoded_custom(add).environment.version


@pytest.mark.parametrize(
    "target, kwargs, error, fragment",
    [
        (negate, {"concurrency": -1}, ValueError, "concurrency=-1"),
        (negate, {"concurrency": True}, ValueError, "concurrency=True"),
        (negate, {"min_successes": -2}, ValueError, "min_successes=-2"),
        (negate, {"min_success_ratio": 1.5}, ValueError, "min_success_ratio=1.5"),
        (plain, {}, TypeError, "needs an actor task"),
        (functools.partial(add, 1), {}, ValueError, "keyword arguments only"),
        (functools.partial(add, z=1), {}, ValueError, "['z']"),
        (functools.partial(add, x=1, y=2), {}, ValueError, "nothing to map"),
    ],
    ids=["concurrency-negative", "concurrency-bool", "min-successes-negative", "ratio-1.5", "not-an-actor", "positional", "unknown", "all-bound"],
)
def test_map_arguments_are_validated(target, kwargs, error, fragment):
    with pytest.raises(error) as raised:
        map(target, **kwargs)
    assert fragment in str(raised.value)


# --------------------------------------------------------------------------------------------------- task commands


EXECUTE_ARGS = [
    "pyflyte-execute",
    "--inputs",
    "s3://bucket/metadata/n0/inputs.pb",
    "--output-prefix",
    "s3://bucket/metadata/n0/data/0",
    "--raw-output-data-prefix",
    "s3://bucket/raw/ab",
    "--checkpoint-path",
    "s3://bucket/raw/ab/_flytecheckpoints",
    "--prev-checkpoint",
    "s3://bucket/raw/aa/_flytecheckpoints",
    "--resolver",
    RESOLVER,
    "--",
    "task-module",
    "workflows.train",
    "task-name",
    "fit",
]

EXECUTE_COMMAND = TaskCommand(
    resolver=RESOLVER,
    resolver_args=["task-module", "workflows.train", "task-name", "fit"],
    inputs="s3://bucket/metadata/n0/inputs.pb",
    output_prefix="s3://bucket/metadata/n0/data/0",
    raw_output_data_prefix="s3://bucket/raw/ab",
    checkpoint_path="s3://bucket/raw/ab/_flytecheckpoints",
    prev_checkpoint="s3://bucket/raw/aa/_flytecheckpoints",
)


def test_task_command_reads_rendered_pyflyte_execute_args():
    assert TaskCommand.from_args(EXECUTE_ARGS) == EXECUTE_COMMAND


def test_task_command_reads_the_code_bundle_of_pyflyte_fast_execute():
    args = ["pyflyte-fast-execute", "--additional-distribution", "s3://bucket/fast/abc.tar.gz", "--dest-dir", "/root"]
    command = TaskCommand.from_args(args + ["--"] + EXECUTE_ARGS)
    assert (command.distribution, command.dest_dir) == ("s3://bucket/fast/abc.tar.gz", "/root")
    assert command.resolver_args == EXECUTE_COMMAND.resolver_args
    assert command.inputs == EXECUTE_COMMAND.inputs


def test_task_command_reads_the_args_flytekit_serializes_with_placeholders_as_none():
    fast = SerializationSettings(
        ImageConfig.auto(img_name=IMAGE),
        fast_serialization_settings=FastSerializationSettings(
            enabled=True, destination_dir="/root", distribution_location="s3://bucket/fast/abc.tar.gz"
        ),
    )
    args = list(serialize(add, fast).container.args)
    assert args[0] == "pyflyte-fast-execute" and "{{.input}}" in args
    command = TaskCommand.from_args(args)
    assert command.resolver == RESOLVER
    assert command.resolver_args == ["task-module", __name__, "task-name", "add"]
    assert (command.distribution, command.dest_dir) == ("s3://bucket/fast/abc.tar.gz", "/root")
    placeholders = (command.inputs, command.output_prefix, command.raw_output_data_prefix, command.checkpoint_path)
    assert placeholders == (None, None, None, None)
    assert command.prev_checkpoint is None


def test_task_command_treats_propellers_empty_previous_checkpoint_as_none():
    """Propeller renders ``{{.prevCheckpointPrefix}}`` as the two characters ``""`` on a first attempt (flytekit's
    entrypoint maps that to ``None`` in ``normalize_inputs``)."""
    args = [a if a != EXECUTE_COMMAND.prev_checkpoint else '""' for a in EXECUTE_ARGS]
    assert TaskCommand.from_args(args).prev_checkpoint is None


@pytest.mark.parametrize(
    "args",
    [
        ["python", "main.py", "--inputs", "s3://bucket/in.pb"],
        ["pyflyte-execute", "--inputs", "s3://bucket/in.pb", "--output-prefix", "s3://bucket/out"],
        ["pyflyte-execute", "--resolver", RESOLVER, "--"],
    ],
    ids=["not-flytekit", "no-resolver", "no-resolver-args"],
)
def test_task_command_refuses_args_that_are_not_a_flytekit_task(args):
    with pytest.raises(ValueError) as error:
        TaskCommand.from_args(args)
    assert repr(args) in str(error.value) and "pyflyte-execute" in str(error.value)
