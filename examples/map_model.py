"""A map over 20 values with a model built once by a regular cached task and cached on each replica.

    pyflyte run examples/map_model.py wf

``create_model_file`` is an ordinary Flyte task (cached by Flyte); the actor map sends the file to every element,
and ``@actor_cache`` keys the loaded model by the file's source, so each replica loads it once.
"""

import functools
import json
import os
import time
from typing import List

from flytekit import current_context, task, workflow
from flytekit.types.file import FlyteFile

from flytekitplugins.actor import ActorEnvironment, actor_cache, map

actor = ActorEnvironment(name="map-model-actor", replica_count=2, ttl_seconds=60)


@task(cache=True, cache_version="1")
def create_model_file(weight: int) -> FlyteFile:
    path = os.path.join(current_context().working_directory, "model.json")
    with open(path, "w") as f:
        json.dump({"weight": weight}, f)
    return FlyteFile(path)


@actor_cache
def load_model(model_file: FlyteFile) -> dict:
    with open(model_file.download()) as f:
        model = json.load(f)
    time.sleep(0.5)  # stands in for an expensive load
    log = os.environ.get("ACTOR_EXAMPLES_LOAD_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"model {os.getpid()}\n")
    return model


@actor.task
def inference(model_file: FlyteFile, x: int) -> int:
    time.sleep(0.05)
    return load_model(model_file)["weight"] * x


@workflow
def wf(xs: List[int] = list(range(20)), weight: int = 3) -> List[int]:
    model_file = create_model_file(weight=weight)
    return map(functools.partial(inference, model_file=model_file), concurrency=4)(x=xs)
