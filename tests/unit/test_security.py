"""Unit tests of the security controls that live in pure code (see docs/security.md): validation of ``custom``,
the pod policy, signed lease ids, reports only from the lease holder, trusted code-bundle locations, and the
replica's handling of its token."""

from __future__ import annotations

import copy
import itertools
import math
import os

import pytest

from flyte_actor_agent.launchers import LaunchRefused
from flyte_actor_agent.launchers.local import LocalProcessLauncher
from flyte_actor_agent.launchers.pod_policy import PodPolicy
from flyte_actor_agent.lease_ids import LeaseIds
from flyte_actor_agent.scheduler import (
    Ack,
    Assign,
    ExitReason,
    Finished,
    FleetConfig,
    Outcome,
    Phase,
    ReplicaExit,
    Scheduler,
    TaskRequest,
)
from flytekitplugins.actor.contract import ActorCustom, InvalidTask, TaskCommand
from flytekitplugins.actor.worker.replica import Config

# ------------------------------------------------------------------------------------------ custom validation

VALID = {
    "schema_version": 1.0,
    "environment": {"name": "env", "version": "0123456789abcdef", "replica_count": 2.0, "ttl_seconds": 60.0,
                    "parallelism": 1.0, "replica": {"image": "img"}},
    "map": {"mapped_inputs": ["x"], "bound_inputs": [], "concurrency": 4.0, "min_success_ratio": 0.5},
}


def with_field(path: str, value):
    custom = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    target = custom
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return custom


@pytest.mark.parametrize("path, value, named", [
    ("environment.replica_count", 0.0, "custom.environment.replica_count=0.0"),
    ("environment.replica_count", -3.0, "replica_count=-3.0"),
    ("environment.replica_count", 2.5, "replica_count=2.5"),
    ("environment.replica_count", "2", "replica_count='2'"),
    ("environment.replica_count", True, "replica_count=True"),
    ("environment.parallelism", 0.0, "custom.environment.parallelism=0.0"),
    ("environment.ttl_seconds", 0.0, "ttl_seconds=0.0"),
    ("environment.ttl_seconds", 1e9, "ttl_seconds=1000000000.0"),
    ("environment.ttl_seconds", math.inf, "ttl_seconds=inf"),
    ("environment.name", "Not A Label", "custom.environment.name='Not A Label'"),
    ("environment.version", {"x": 1}, "custom.environment.version"),
    ("environment.replica", "a string", "custom.environment.replica"),
    ("environment.surprise", 1.0, "unknown fields ['surprise']"),
    ("environment.parallelism", KeyError, "lacks ['parallelism']"),
    ("map.concurrency", -1.0, "custom.map.concurrency=-1.0"),
    ("map.min_success_ratio", math.nan, "custom.map.min_success_ratio=nan"),
    ("map.min_success_ratio", 1.5, "min_success_ratio=1.5"),
    ("map.min_success_ratio", "half", "min_success_ratio='half'"),
    ("map.min_successes", -1.0, "custom.map.min_successes=-1.0"),
    ("map.mapped_inputs", "x", "custom.map.mapped_inputs='x'"),
    ("map.mapped_inputs", [1.0], "custom.map.mapped_inputs"),
    ("map.elements", 3.0, "unknown fields ['elements']"),
    ("schema_version", 2.0, "custom.schema_version=2.0"),
    ("schema_version", True, "custom.schema_version=True"),
    ("extra", "x", "custom has unknown fields ['extra']"),
    ("map", "not a map", "custom.map='not a map'"),
])
def test_every_bad_custom_field_is_refused_in_one_line_naming_it(path, value, named):
    with pytest.raises(InvalidTask) as refused:
        ActorCustom.from_custom(with_field(path, value))
    message = str(refused.value)
    assert named in message
    assert "\n" not in message and len(message) < 400
    assert isinstance(refused.value, ValueError)  # the server answers ValueErrors with INVALID_ARGUMENT


def test_valid_custom_reads_back_exactly_with_unbounded_concurrency_and_min_successes():
    custom = ActorCustom.from_custom(with_field("map.min_successes", 3.0))
    assert (custom.environment.replica_count, custom.environment.ttl_seconds) == (2, 60)
    assert custom.map.concurrency == 4 and custom.map.min_success_ratio == 0.5
    assert ActorCustom.from_custom(with_field("map.concurrency", 0.0)).map.concurrency == 0  # 0: no limit
    assert ActorCustom.from_custom(with_field("map.concurrency", None)).map.concurrency is None
    assert ActorCustom.from_custom(with_field("map", KeyError)).map is None


def test_container_args_without_a_task_module_are_refused():
    base = ["pyflyte-execute", "--inputs", "i", "--resolver", "flytekit.core.python_auto_container.default_task_resolver",
            "--"]
    assert TaskCommand.from_args(base + ["task-module", "m", "task-name", "f"]).resolver_args[1] == "m"
    bad_resolver = [a if not a.endswith("resolver") or a == "--resolver" else "../evil; rm" for a in base]
    for args in (base + ["task-module", "", "task-name", "f"], base + ["task-name", "f"], base,
                 bad_resolver + ["task-module", "m", "task-name", "f"]):
        with pytest.raises(InvalidTask):
            TaskCommand.from_args(args)


# ------------------------------------------------------------------------------------------------ pod policy


def pod(namespace="team-a", **spec):
    spec.setdefault("containers", [{"name": "actor", "image": "img"}])
    return {"metadata": {"namespace": namespace}, "spec": spec}


def container(**fields):
    return {"name": "actor", "image": "img", **fields}


@pytest.mark.parametrize("bad, field, setting", [
    (pod(containers=[container(securityContext={"privileged": True})]),
     "spec.containers[0].securityContext.privileged", "--allow-privileged"),
    (pod(initContainers=[container(securityContext={"privileged": True})]),
     "spec.initContainers[0].securityContext.privileged", "--allow-privileged"),
    (pod(containers=[container(securityContext={"procMount": "Unmasked"})]), "procMount", "--allow-privileged"),
    (pod(hostNetwork=True), "spec.hostNetwork", "--allow-host-namespaces"),
    (pod(hostPID=True), "spec.hostPID", "--allow-host-namespaces"),
    (pod(hostIPC=True), "spec.hostIPC", "--allow-host-namespaces"),
    (pod(containers=[container(ports=[{"containerPort": 80, "hostPort": 80}])]), "ports[0].hostPort",
     "--allow-host-namespaces"),
    (pod(volumes=[{"name": "root", "hostPath": {"path": "/"}}]), "spec.volumes[0].hostPath", "--allow-host-path"),
    (pod(containers=[container(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}})]),
     "capabilities.add='SYS_ADMIN'", "--allowed-capabilities"),
    (pod(containers=[container(securityContext={"capabilities": {"add": ["ALL"]}})]), "'ALL'",
     "--allowed-capabilities"),
    (pod(namespace="kube-system"), "metadata.namespace='kube-system'", "--namespaces"),
    (pod(serviceAccountName="cluster-admin"), "spec.serviceAccountName='cluster-admin'", "--service-accounts"),
])
def test_the_default_pod_policy_refuses_in_one_line_naming_the_field_and_the_setting(bad, field, setting):
    with pytest.raises(LaunchRefused) as refused:
        PodPolicy().check(bad)
    assert field in str(refused.value) and setting in str(refused.value) and "\n" not in str(refused.value)


def test_an_admin_allows_what_the_default_refuses():
    allowed = PodPolicy(namespaces=("kube-system", "team-*"), service_accounts=("default", "ml-*"),
                        allow_privileged=True, allow_host_namespaces=True, allow_host_path=True,
                        allowed_capabilities=frozenset({"SYS_ADMIN"}))
    allowed.check(pod(namespace="kube-system", hostNetwork=True, serviceAccountName="ml-train",
                      volumes=[{"name": "root", "hostPath": {"path": "/"}}],
                      containers=[container(securityContext={"privileged": True,
                                                             "capabilities": {"add": ["CAP_SYS_ADMIN"]}})]))
    allowed.check(pod(namespace="team-b"))
    with pytest.raises(LaunchRefused, match="not in the allowed namespaces"):
        allowed.check(pod(namespace="elsewhere"))


def test_the_default_pod_policy_lets_an_ordinary_pod_through():
    PodPolicy().check(pod(containers=[container(securityContext={"capabilities": {"add": ["NET_BIND_SERVICE"],
                                                                                   "drop": ["ALL"]},
                                                                  "runAsNonRoot": True})],
                          volumes=[{"name": "scratch", "emptyDir": {}}]))


def test_a_pod_refused_by_policy_fails_its_tasks_at_once_as_failed():
    sched = Scheduler(clock=lambda: 0.0)
    fleet = FleetConfig(key="env-v1", name="env", replica_count=2, ttl_seconds=60, parallelism=1)
    (launch,) = [e for e in sched.submit(TaskRequest(key="t1", fleet=fleet, payload="p")) if type(e).__name__ == "Launch"]
    effects = sched.replica_gone(launch.replica_id, ReplicaExit(ExitReason.REFUSED, "the agent's pod policy refuses x"))
    assert [type(e) for e in effects] == [Finished]
    assert sched.tasks["t1"].phase is Phase.FAILED
    assert "the agent's pod policy refuses x" in sched.tasks["t1"].message


# ------------------------------------------------------------------------------------ leases and their reports


def scheduler_with_lease(key: bytes = b"k" * 32):
    ids = itertools.count(1)
    sched = Scheduler(clock=lambda: 0.0, new_id=lambda: f"id{next(ids)}", new_token=lambda: "tok", lease_key=key)
    fleet = FleetConfig(key="env-v1", name="env", replica_count=2, ttl_seconds=60, parallelism=1)
    sched.submit(TaskRequest(key="t1", fleet=fleet, payload="p1"))
    sched.submit(TaskRequest(key="t2", fleet=fleet, payload="p2"))
    assigns = {}
    for replica_id in list(sched.replicas):
        (assign,) = [e for e in sched.replica_connected(replica_id, "tok", "env-v1", capacity=1) if isinstance(e, Assign)]
        assigns[replica_id] = assign
    return sched, fleet, assigns


def test_a_report_from_a_replica_that_does_not_hold_the_lease_is_acked_and_ignored():
    sched, _, assigns = scheduler_with_lease()
    (a, lease_a), (b, lease_b) = [(r, e.lease_id) for r, e in assigns.items()]
    effects = sched.report(b, lease_a, Outcome.SUCCEEDED, outputs=b"forged")
    assert effects == [Ack(b, lease_a)]
    task = sched.leases[lease_a]
    assert task.phase is Phase.RUNNING and task.outputs is None
    assert Finished(task.key) in sched.report(a, lease_a, Outcome.SUCCEEDED, outputs=b"real")
    assert task.outputs == b"real"


def adopted(key: bytes, replica_id: str = "r1"):
    sched = Scheduler(clock=lambda: 0.0, lease_key=key)
    fleet = FleetConfig(key="env-v1", name="env", replica_count=1, ttl_seconds=60, parallelism=1)
    sched.adopt_replica(replica_id, "tok", fleet)
    return sched


def test_after_a_restart_only_leases_signed_by_the_agents_key_for_that_replica_are_recovered():
    key = b"s" * 32
    genuine = LeaseIds(key).issue("n1", "r1", "p/d/e/n0/0")
    other_replicas = LeaseIds(key).issue("n2", "r2", "p/d/e/n1/0")
    forged = "n3.00000000000000000000000000000000|p/d/e/n2/0"
    unsigned = "n4|p/d/e/n3/0"
    wrong_key = LeaseIds(b"x" * 32).issue("n5", "r1", "p/d/e/n4/0")
    sched = adopted(key)
    sched.replica_connected("r1", "tok", "env-v1", capacity=5,
                            running=[genuine, other_replicas, forged, unsigned, wrong_key])
    assert set(sched.tasks) == {"p/d/e/n0/0"}
    assert sched.abandoned_leases("r1", [genuine, other_replicas, forged, unsigned, wrong_key]) == [
        other_replicas, forged, unsigned, wrong_key]
    assert Finished("p/d/e/n0/0") in sched.report("r1", genuine, Outcome.SUCCEEDED, outputs=b"o")


def test_lease_ids_keep_the_task_key_and_need_a_real_key():
    ids = LeaseIds(os.urandom(32))
    lease = ids.issue("abc", "r1", "p/d/e|odd/n0/0")
    assert ids.verify("r1", lease) == "p/d/e|odd/n0/0"
    assert ids.verify("r1", lease.replace("abc", "abd")) is None
    with pytest.raises(ValueError, match="at least 16 bytes"):
        LeaseIds(b"short")


# ------------------------------------------------------------------------------------------- code bundles


@pytest.mark.parametrize("bundle, trusted", [
    ("", True),
    ("/home/me/bundle.tar.gz", True),
    ("file:///tmp/fast/abc.tar.gz", True),
    ("s3://my-bucket/fast/abc.tar.gz", True),
    ("s3://my-bucket-evil/fast/abc.tar.gz", False),
    ("s3://my-bucket/fast/../../other/abc.tar.gz", False),
    ("https://attacker.example/payload.tar.gz", False),
    ("/home/me/../../etc/bundle.tar.gz", False),
    ("relative/bundle.tar.gz", False),
])
def test_the_local_launcher_trusts_local_paths_and_configured_prefixes_only(bundle, trusted):
    launcher = LocalProcessLauncher(lambda *a: None, log_dir="/tmp/unused", trusted_bundles=["s3://my-bucket"])
    if trusted:
        launcher.check_bundle(bundle)
    else:
        with pytest.raises(ValueError, match="--trusted-bundle-prefixes|normalized"):
            launcher.check_bundle(bundle)


# ------------------------------------------------------------------------------------------- replica token


def test_the_replica_takes_its_token_out_of_the_environment(tmp_path):
    base = {"FLYTE_ACTOR_AGENT_ADDRESS": "a:1", "FLYTE_ACTOR_ENVIRONMENT_KEY": "k", "FLYTE_ACTOR_REPLICA_ID": "r"}
    env = dict(base, FLYTE_ACTOR_REPLICA_TOKEN="from-secret")
    assert Config.from_env(env).token == "from-secret" and "FLYTE_ACTOR_REPLICA_TOKEN" not in env
    read, write = os.pipe()
    os.write(write, b"from-pipe")
    os.close(write)
    env = dict(base, FLYTE_ACTOR_REPLICA_TOKEN_FD=str(read))
    assert Config.from_env(env).token == "from-pipe" and not any("TOKEN" in k for k in env)
    with pytest.raises(OSError):
        os.fstat(read)  # closed once read
    path = tmp_path / "token"
    path.write_text("from-file\n")
    env = dict(base, FLYTE_ACTOR_REPLICA_TOKEN_FILE=str(path))
    assert Config.from_env(env).token == "from-file" and not path.exists() and not any("TOKEN" in k for k in env)
