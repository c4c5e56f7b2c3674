"""The documented examples through the real flytekit CLI: `pyflyte run` (on the local fleet and in process) and
`pyflyte package`, whose TaskTemplates are decoded and checked."""

import glob
import os
import subprocess
import sys
import tarfile

import pytest
from flyteidl.admin import task_pb2
from google.protobuf import json_format

from flytekitplugins.actor.contract import ActorCustom, TaskCommand

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYFLYTE = os.path.join(os.path.dirname(sys.executable), "pyflyte")

EXPECTED = {
    "hello_world.py": "hello world",
    "plus_one.py": "4",
    "shared_environment.py": "[196, 196, 36]",
    "pod_template.py": "hello from the pod template",
    "model_cache.py": "13",
    "custom_hashable.py": "1000",
    "map_model.py": str([3 * x for x in range(20)]),
    "gpu_model.py": "36 on cpu",
}


def pyflyte_run(example: str, mode: str, load_log: str) -> str:
    env = dict(os.environ, FLYTE_ACTOR_LOCAL_MODE=mode, ACTOR_EXAMPLES_LOAD_LOG=load_log)
    result = subprocess.run(
        [PYFLYTE, "run", f"examples/{example}", "wf"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def loads(load_log: str):
    if not os.path.exists(load_log):
        return []
    with open(load_log) as f:
        return [line.split() for line in f]


@pytest.mark.parametrize("mode", ["fleet", "inprocess"])
@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_pyflyte_run(example, mode, tmp_path):
    load_log = str(tmp_path / "loads")
    assert pyflyte_run(example, mode, load_log) == EXPECTED[example]
    recorded = loads(load_log)
    if example in ("model_cache.py", "custom_hashable.py", "gpu_model.py"):
        assert len(recorded) == 1, f"the cached model was loaded {len(recorded)} times over the chained calls"
    if example == "map_model.py":
        processes = {pid for _, pid in recorded}
        assert len(recorded) == len(processes), "a replica loaded the model more than once"
        if mode == "fleet":
            assert 1 <= len(recorded) <= 2, f"20 elements on 2 replicas loaded the model {len(recorded)} times"
            assert os.getpid() not in processes


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    out = tmp_path_factory.mktemp("package")
    archive = out / "flyte-package.tgz"
    result = subprocess.run(
        [PYFLYTE, "--pkgs", "examples", "package", "--image", "ghcr.io/example/actors:1", "-o", str(archive),
         "--source", ROOT, "--force"],
        cwd=str(out), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(archive) as tar:
        tar.extractall(out / "x")
    templates = {}
    for path in glob.glob(str(out / "x" / "*_1.pb")):
        spec = task_pb2.TaskSpec()
        with open(path, "rb") as f:
            spec.ParseFromString(f.read())
        templates[spec.template.id.name] = spec.template
    return templates


def custom_of(template):
    return ActorCustom.from_custom(json_format.MessageToDict(template.custom))


def test_package_serializes_actor_tasks_with_container_and_environment(packaged):
    template = packaged["examples.plus_one.plus_one"]
    assert template.type == "actor"
    assert template.WhichOneof("target") == "container"
    assert template.container.image == "ghcr.io/example/actors:1"
    command = TaskCommand.from_args(list(template.container.args))
    assert command.resolver == "flytekit.core.python_auto_container.default_task_resolver"
    assert command.resolver_args == ["task-module", "examples.plus_one", "task-name", "plus_one"]
    env = custom_of(template).environment
    assert (env.name, env.replica_count, env.ttl_seconds, env.parallelism) == ("plus-one-actor", 1, 60, 1)
    assert all(isinstance(v, int) for v in (env.replica_count, env.ttl_seconds, env.parallelism))
    assert env.replica["image"] == "ghcr.io/example/actors:1"


def test_tasks_of_one_environment_share_its_id_across_workflows_and_launch_plans(packaged):
    ids = {custom_of(packaged[f"examples.shared_environment.{n}"]).environment.key
           for n in ("make_numbers", "square_all", "total")}
    assert len(ids) == 1
    others = {custom_of(t).environment.key for n, t in packaged.items() if t.type == "actor"
              and not n.startswith("examples.shared_environment.")}
    assert not ids & others


def test_pod_template_travels_in_custom_not_as_a_pod_target(packaged):
    template = packaged["examples.pod_template.read_greeting"]
    assert template.WhichOneof("target") == "container"
    pod = custom_of(template).environment.replica["pod_template"]
    assert pod["primary_container_name"] == "primary"
    assert pod["labels"] == {"team": "ml"}
    primary, sidecar = pod["pod_spec"]["containers"]
    assert primary["env"] == [{"name": "GREETING", "value": "hello from the pod template"}]
    assert primary["image"] == "ghcr.io/example/actors:1"
    # flytekit's pod template serializer names the ImageSpec (the kubernetes client's could not serialize it).
    from examples.pod_template import model_server

    assert sidecar["image"] == model_server.image_name() and sidecar["image"].startswith("ghcr.io/example/model-server:")


def test_gpu_environment_serializes_its_gpu_accelerator_and_interruptible(packaged):
    from flyteidl.core import tasks_pb2

    replica = custom_of(packaged["examples.gpu_model.predict"]).environment.replica
    assert replica["requests"] == {"cpu": "2", "mem": "8Gi", "gpu": "1"} and replica["interruptible"] is True
    assert tasks_pb2.GPUAccelerator.FromString(bytes.fromhex(replica["accelerator"])).device == "nvidia-tesla-t4"


def test_actor_map_is_one_task_not_an_array_node(packaged):
    (name,) = [n for n in packaged if "actor_map_inference" in n]
    template = packaged[name]
    assert template.type == "actor-map" and template.task_type_version == 0
    custom = custom_of(template)
    assert custom.map.mapped_inputs == ["x"] and custom.map.bound_inputs == ["model_file"]
    assert custom.map.concurrency == 4 and isinstance(custom.map.concurrency, int)
    assert custom.environment.key == custom_of(packaged["examples.map_model.inference"]).environment.key
    assert TaskCommand.from_args(list(template.container.args)).resolver_args[-1] == "inference"


def test_register_dry_run_accepts_the_examples():
    result = subprocess.run(
        [PYFLYTE, "register", "--dry-run", "--non-fast", "--version", "v1", "--image", "ghcr.io/example/actors:1",
         "examples"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Successfully registered 31 entities" in result.stdout
