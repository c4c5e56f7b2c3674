"""Actor tasks of the chaos tier: each run that completes leaves a marker naming its element and the replica
(process group) that ran it, so a test can count elements that completed twice on healthy replicas."""

import os
import time

from flytekitplugins.actor import ActorEnvironment

kill = ActorEnvironment(name="chaos-kill", replica_count=4, ttl_seconds=60)
frozen = ActorEnvironment(name="chaos-frozen", replica_count=2, ttl_seconds=60)
network = ActorEnvironment(name="chaos-network", replica_count=2, ttl_seconds=60)
ghost = ActorEnvironment(name="chaos-ghost", replica_count=1, ttl_seconds=60)
starting = ActorEnvironment(name="chaos-starting", replica_count=2, ttl_seconds=60)
drain = ActorEnvironment(name="chaos-drain", replica_count=2, ttl_seconds=60)
garbage = ActorEnvironment(name="chaos-garbage", replica_count=2, ttl_seconds=60)


def _work(i: int, seconds: float, log_dir: str) -> int:
    time.sleep(seconds)
    with open(os.path.join(log_dir, f"{i}-{os.getpgid(0)}-{os.getpid()}-{time.time_ns()}"), "w"):
        pass
    return i * 2


@kill.task
def kill_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)


@frozen.task
def frozen_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)


@network.task
def network_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)


@ghost.task
def ghost_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)


@starting.task
def starting_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)


@drain.task
def drain_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)


@garbage.task
def garbage_work(i: int, seconds: float, log_dir: str) -> int:
    return _work(i, seconds, log_dir)
