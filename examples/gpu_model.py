"""A model kept warm on a GPU: the environment asks for one GPU of a given accelerator, on interruptible
(spot) nodes, as a regular Flyte task would. The replica pod gets what propeller gives a task pod with the same
settings: the GPU in requests and limits, node affinity and tolerations for the accelerator and for
interruptible nodes, and the cluster's defaults (docs/deploy.md, "GPUs, accelerators, interruptible").

    pyflyte run examples/gpu_model.py wf

Locally (no cluster, no GPU) the replica is a local process and the model runs on the CPU: the same code picks
the GPU when the replica has one.
"""

import os

from flytekit import Resources, workflow
from flytekit.extras.accelerators import T4

from flytekitplugins.actor import ActorEnvironment, actor_cache

gpu_actor = ActorEnvironment(
    name="gpu-model",
    replica_count=2,
    ttl_seconds=120,
    requests=Resources(cpu="2", mem="8Gi", gpu="1"),
    accelerator=T4,
    interruptible=True,
)


def device() -> str:
    """The GPU when the replica has one (the device plugin sets NVIDIA_VISIBLE_DEVICES), else the CPU."""
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "")
    return "cuda:0" if visible and visible not in ("none", "void") else "cpu"


@actor_cache
def load_model(scale: int):
    log = os.environ.get("ACTOR_EXAMPLES_LOAD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"gpu-model {os.getpid()}\n")
    # Stands in for moving weights to the device once per replica.
    weights = [scale * i for i in range(4)]
    return lambda x: sum(w * x for w in weights)


@gpu_actor.task
def predict(x: int, scale: int) -> str:
    return f"{load_model(scale)(x)} on {device()}"


@workflow
def wf(x: int = 2, scale: int = 3) -> str:
    warm_up = predict(x=x, scale=scale)
    answer = predict(x=x, scale=scale)  # same replica, model already loaded
    warm_up >> answer
    return answer
