"""Tasks run through both of the executor's paths (and through ``pyflyte-execute``) by test_fast_path.py."""

import os
import tempfile
from dataclasses import dataclass
from typing import List

from flytekit import current_context
from flytekit.types.file import FlyteFile

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(name="fast-path-test", replica_count=1)

CALLS = 0


@dataclass
class Point:
    x: int
    label: str


@actor.task
def noop() -> None:
    pass


@actor.task
def hello(name: str) -> str:
    return f"hello {name}"


@actor.task
def count_calls() -> int:
    """1 in every task: the sandbox puts the global back after each."""
    global CALLS
    CALLS += 1
    return CALLS


@actor.task
def move(p: Point, by: int) -> Point:
    return Point(x=p.x + by, label=p.label.upper())


@actor.task
def write_file(text: str) -> FlyteFile:
    path = os.path.join(tempfile.mkdtemp(), "greeting.txt")
    with open(path, "w") as f:
        f.write(text)
    # Uploaded under the raw output prefix at a path of its own choosing (a random one would differ from run to run).
    return FlyteFile(path, remote_path=f"{current_context().raw_output_prefix}/files/greeting.txt")


@actor.task
def read_file(f: FlyteFile) -> str:
    with open(f) as handle:
        return handle.read()


@actor.task
def numbers(n: int) -> List[int]:
    return list(range(n))


@actor.task
def user_error(message: str) -> int:
    if message:
        raise ValueError(message)
    return 0


@actor.task
def wrong_output() -> int:
    return "not an int"  # flytekit fails converting the output


@actor.task
def lineage() -> str:
    """The replica's process group (its pid) and this executor's parent (the executors' fork server)."""
    return f"{os.getpgid(0)} {os.getppid()}"


@actor.task(enable_deck=True)
def with_deck(name: str) -> str:
    """Outputs a deck, whose Timeline is what flytekit's ``timeit`` measured: the fast path measures for it."""
    return f"hello {name}"
