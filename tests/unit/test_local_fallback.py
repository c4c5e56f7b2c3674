"""Local runs with only the SDK usable: actor tasks (and actor maps) run in the calling process, after a one-line
hint on stderr, printed once per process.

Each case runs a small workflow in a fresh interpreter where the SDK sees the agent as not installed (no entry point
for the local fleet, and the package refused by the import system: only the SDK installed, as in a notebook), or as
installed but failing to load (its entry point is there, the module it names is refused: as next to a flytekit older
than the agent needs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os
    import sys


    class Refuse:
        # A meta path finder that makes one module (and its submodules) unimportable, as if not installed.
        def find_spec(self, name, path=None, target=None):
            if name == BLOCKED or name.startswith(BLOCKED + "."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    BLOCKED, ENTRY_POINT = sys.argv[1:]
    sys.meta_path.insert(0, Refuse())

    # The agent's distribution, as the SDK finds it: through its local-fleet entry point, present or not.
    from importlib import metadata

    all_entry_points = metadata.entry_points


    def entry_points(**selection):
        if selection.get("group") != "flytekitplugins.actor.local_fleet":
            return all_entry_points(**selection)
        found = [metadata.EntryPoint("embedded", ENTRY_POINT, selection["group"])] if ENTRY_POINT else []
        return metadata.EntryPoints(found)


    metadata.entry_points = entry_points

    from flytekit import workflow
    from flytekitplugins.actor import ActorEnvironment, map

    actor = ActorEnvironment(name="fallback", replica_count=2, environment={"FALLBACK_VAR": "set"})


    @actor.task
    def where(x: int) -> str:
        return f"{x}:{os.getpid()}:{os.environ.get('FALLBACK_VAR')}"


    @workflow
    def wf(x: int) -> str:
        return where(x=x)


    @workflow
    def mapped(xs: list[int]) -> list[str]:
        return map(where)(x=xs)


    print(wf(x=1))
    print(wf(x=2))
    print(",".join(mapped(xs=[3, 4])))
    print("agent imported:", "flyte_actor_agent.embedded" in sys.modules)
    print("pid:", os.getpid())
    """
)


@pytest.mark.parametrize(
    "blocked, entry_point, hint",
    [
        (
            "flyte_actor_agent",
            "",
            "flyte-actors: the local fleet needs flyte-actors-agent (pip install flyte-actors-agent); "
            "running actor tasks in this process",
        ),
        (
            "flyte_actor_agent.embedded",
            "flyte_actor_agent.embedded:local_agent",
            "flyte-actors: the local fleet cannot load flyte-actors-agent (",
        ),
    ],
    ids=["sdk-only", "agent-unloadable"],
)
def test_actor_tasks_run_in_process_with_one_hint_when_the_agent_cannot_be_imported(tmp_path, blocked, entry_point, hint):
    script = tmp_path / "fallback_wf.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "FLYTE_ACTOR_LOCAL_MODE"}  # the default: fleet
    run = subprocess.run(
        [sys.executable, str(script), blocked, entry_point], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    pid = lines[-1].removeprefix("pid: ")
    assert lines[:3] == [f"1:{pid}:set", f"2:{pid}:set", f"3:{pid}:set,4:{pid}:set"]
    assert lines[3] == "agent imported: False"
    hints = [line for line in run.stderr.splitlines() if line.startswith("flyte-actors:")]
    assert len(hints) == 1 and hints[0].startswith(hint), run.stderr
    assert hints[0].endswith("; running actor tasks in this process")
