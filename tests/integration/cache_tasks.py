"""Actor tasks whose ``@actor_cache`` functions take a dataclass and a plain object of this module: the replica
re-imports this module for every task, so each task builds its arguments from a new copy of the classes."""

import dataclasses
import os
import uuid
from typing import List

from flytekitplugins.actor import ActorEnvironment, actor_cache

actor = ActorEnvironment(name="cache-keys", replica_count=1, ttl_seconds=60)


@dataclasses.dataclass
class ModelConfig:  # unhashable (eq=True, not frozen), and a new class object in every task
    path: str
    layers: List[int]


class Tokenizer:  # no __eq__ or __hash__ at all
    def __init__(self, vocabulary: str):
        self.vocabulary = vocabulary


@actor_cache
def load(config: ModelConfig, tokenizer: Tokenizer) -> str:
    return f"{uuid.uuid4().hex} {os.getpid()}"


@actor.task
def model_id(path: str) -> str:
    return load(ModelConfig(path, [64, 64]), Tokenizer("bpe"))
