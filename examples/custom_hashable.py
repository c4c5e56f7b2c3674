"""``@actor_cache`` keyed by a custom object: equal objects (by ``__hash__`` and ``__eq__``) share one entry.

    pyflyte run examples/custom_hashable.py wf
"""

import os

from flytekit import workflow

from flytekitplugins.actor import ActorEnvironment, actor_cache

actor = ActorEnvironment(name="hashable-actor", replica_count=1, ttl_seconds=60)


class ModelConfig:
    def __init__(self, scale: int, note: str = ""):
        self.scale = scale
        self.note = note  # not part of the identity: configs that differ only by note share a model

    def __hash__(self):
        return hash(self.scale)

    def __eq__(self, other):
        # Compare by name, not isinstance: a replica re-imports this module for every task, so the class of an
        # object cached by an earlier task is an earlier copy of ModelConfig.
        return type(other).__qualname__ == "ModelConfig" and other.scale == self.scale


@actor_cache
def build_model(config: ModelConfig):
    log = os.environ.get("ACTOR_EXAMPLES_LOAD_LOG")  # lets the tests count real loads
    if log:
        with open(log, "a") as f:
            f.write(f"scaled-{config.scale} {os.getpid()}\n")
    return lambda x: x * config.scale


@actor.task
def predict(x: int, scale: int) -> int:
    return build_model(ModelConfig(scale, note=f"for {x}"))(x)


@workflow
def wf(scale: int = 10) -> int:
    a = predict(x=1, scale=scale)
    b = predict(x=a, scale=scale)
    return predict(x=b, scale=scale)
