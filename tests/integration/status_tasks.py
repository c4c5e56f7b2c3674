"""Tasks for tests/integration/test_status_page.py: ones that fail with markup in their message, and ones that
hold their replica until the test releases them, so a real agent has fleets with running, queued and failed work
to show."""

import os
import time

from flytekitplugins.actor import ActorEnvironment

demo = ActorEnvironment(name="status-demo", replica_count=2, ttl_seconds=120)
batch = ActorEnvironment(name="team.batch", replica_count=1, ttl_seconds=120)  # a dotted name, as Union allows

#: Longest a held task waits for its release file, so a test that dies leaves no task running for ever.
HOLD_LIMIT_SECONDS = 300


def _wait_for(release: str) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


@demo.task
def fails(x: int) -> int:
    if x >= 0:
        raise ValueError("<i id='injected'>markup</i> is shown as text")
    return x


@demo.task
def hold(release: str) -> int:
    _wait_for(release)
    return 1


@batch.task
def hold_item(i: int, release: str) -> int:
    if i:
        _wait_for(release)
    return i
