"""The executor's fast path against its full path and against ``pyflyte-execute``: the same tasks, compared byte
for byte (outputs, error documents without their timestamps, files written to the output and raw prefixes)."""

import json
import os
import subprocess
import sys

import pytest
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.types.file import FlyteFile

import fast_path_tasks as ft
from flytekitplugins.actor.protocol import element_groups
from fast_path_runner import files_under, without_timestamp

pytestmark = pytest.mark.timeout(300)

HERE = os.path.dirname(os.path.abspath(__file__))
#: Files the executor hands back to the agent in-band (the fast path does not upload them; propeller writes
#: outputs.pb from the agent's answer).
IN_BAND = ("outputs.pb", "error.pb")


def _inputs(task, **values) -> str:
    ctx = FlyteContextManager.current_context()
    return TypeEngine.dict_to_literal_map(ctx, values, task.get_input_types()).to_flyte_idl().SerializeToString().hex()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-path")
    source = root / "source.txt"
    source.write_text("read me")
    made = [
        ("noop", {}, {}),
        ("hello", {"name": "world"}, {}),
        ("move", {"p": ft.Point(x=1, label="a"), "by": 2}, {}),
        ("write_file", {"text": "hi there"}, {}),
        ("read_file", {"f": FlyteFile(str(source))}, {}),
        ("numbers", {"n": 50}, {}),
        ("numbers", {"n": 50}, {"_F_L_MIN_SIZE_MB": "0"}),  # every output offloaded to the output prefix
        ("user_error", {"message": "bad input 42"}, {}),
        ("wrong_output", {}, {}),
    ]
    return [
        {"task": name, "inputs": _inputs(getattr(ft, name), **values), "env": env,
         "output_prefix": str(root / f"out-{i}"), "raw_prefix": str(root / f"raw-{i}")}
        for i, (name, values, env) in enumerate(made)
    ]


def _run(cases, tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, os.path.join(HERE, "fast_path_runner.py"), str(path)], cwd=HERE,
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in sys.path if p])
    return env


def _without_in_band(files):
    return {name: data for name, data in files.items() if name not in IN_BAND}


def test_fast_path_gives_the_bytes_of_the_full_path(cases, tmp_path):
    # Per case: the full path, then the fast path twice (the second with the task's module kept from the first).
    runs = [dict(case, path=path) for case in cases for path in ("full", "fast", "fast")]
    results = _run(runs, tmp_path)
    for i, case in enumerate(cases):
        full, fast, again = results[3 * i : 3 * i + 3]
        what = f"{case['task']} {case['env']}"
        for result in (fast, again):
            assert result["phase"] == full["phase"], what
            assert result["outputs"] == full["outputs"], what
            assert result["error"] == full["error"], what
            assert (result["message"], result["retryable"]) == (full["message"], full["retryable"]), what
            assert result["raw_files"] == full["raw_files"], what
            assert result["output_files"] == _without_in_band(full["output_files"]), what
        # What the full path uploaded is what the fast path returned in-band.
        if full["phase"] == "succeeded":
            assert full["output_files"]["outputs.pb"] == fast["outputs"], what
        else:
            assert without_timestamp(bytes.fromhex(full["output_files"]["error.pb"])) == fast["error"], what
        assert full["modules"] == "dropped", what
        assert again["modules"] == "kept", f"{what}: the fast path re-imported the task's module"
    phases = {case["task"]: results[3 * i]["phase"] for i, case in enumerate(cases)}
    assert phases["user_error"] == phases["wrong_output"] == "failed"
    assert any(name.endswith("greeting.txt") for name in results[9]["raw_files"]), "no FlyteFile was uploaded"
    assert "o0_offloaded_metadata.pb" in results[18]["output_files"], "nothing was offloaded"


def test_a_batch_of_elements_gives_the_bytes_of_lone_runs(cases, tmp_path):
    # Per case: a lone map element, then the same task three times in one batch (as one map's elements queued on
    # one executor; with the lone run's prefixes, so that file names and references compare equal).
    runs = [dict(case, path=path) for case in cases for path in ("element", "batch", "batch", "batch")]
    results = _run(runs, tmp_path)
    for i, case in enumerate(cases):
        lone, *batch = results[4 * i : 4 * i + 4]
        what = f"{case['task']} {case['env']}"
        for result in batch:
            for field in ("phase", "outputs", "error", "message", "retryable", "raw_files", "output_files"):
                assert result[field] == lone[field], (what, field)
    phases = [r["phase"] for r in results]
    assert phases.count("failed") == 4 * 2 and phases.count("succeeded") == 4 * (len(cases) - 2)


def test_a_batch_stores_the_outputs_of_its_elements_in_group_files(cases, tmp_path):
    # The same elements as lone map elements (outputs.pb each in its own prefix), then each task twice in a batch of
    # a map whose elements are stored in groups: the same outputs, errors and other files, and the outputs of the
    # successes in group files (a batch runs one task: the elements of one map).
    groups = tmp_path / "map" / "_actor" / "elements"
    picked = [c for c in cases if c["task"] in ("hello", "move", "user_error", "write_file")]
    lone = _run([dict(c, path="element") for c in picked], tmp_path)
    grouped = _run([dict(c, path="batch", group_prefix=str(groups), index=2 * i + k)
                    for i, c in enumerate(picked) for k in range(2)], tmp_path)
    stored = {}
    for path in groups.iterdir():
        stored.update({i: b.hex() for i, b in element_groups.unpack(path.read_bytes()).items()})
    for index, in_group in enumerate(grouped):
        case, alone = picked[index // 2], lone[index // 2]
        what = case["task"]
        for field in ("phase", "outputs", "error", "message", "retryable", "raw_files"):
            assert in_group[field] == alone[field], (what, field)
        assert in_group["output_files"] == {k: v for k, v in alone["output_files"].items() if k != "outputs.pb"}, what
        if alone["phase"] == "succeeded":
            assert stored[index] == alone["outputs"] == alone["output_files"]["outputs.pb"], what
            group = in_group["outputs_group"]
            assert os.path.dirname(group) == str(groups), what
            assert index in element_groups.indices_of(os.path.basename(group)), what
        else:
            assert index not in stored and not in_group["outputs_group"], what
    # Results sent together share a file (how many go together depends on time: BATCH_FLUSH_SECONDS).
    names = sorted(p.name for p in groups.iterdir())
    failed = [2 * i + k for i, c in enumerate(picked) if c["task"] == "user_error" for k in range(2)]
    assert sorted(i for n in names for i in element_groups.indices_of(n)) == [
        i for i in range(2 * len(picked)) if i not in failed], names


def test_fast_path_gives_the_bytes_of_pyflyte_execute(cases, tmp_path):
    # Per case: a task (outputs.pb goes back in-band) and a map element (outputs.pb is left in the output prefix too).
    results = _run([dict(case, path=path) for case in cases for path in ("fast", "element")], tmp_path)
    for i, case in enumerate(cases):
        fast, element = results[2 * i : 2 * i + 2]
        what = f"{case['task']} {case['env']}"
        for prefix in (case["output_prefix"], case["raw_prefix"]):
            subprocess.run(["rm", "-rf", prefix], check=True)
        inputs = tmp_path / "inputs.pb"
        inputs.write_bytes(bytes.fromhex(case["inputs"]))
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "pyflyte-execute"), "--inputs", str(inputs),
             "--output-prefix", case["output_prefix"], "--raw-output-data-prefix", case["raw_prefix"],
             "--resolver", "flytekit.core.python_auto_container.default_task_resolver", "--", "task-module", "fast_path_tasks", "task-name",
             case["task"]],
            cwd=HERE, env=dict(_env(), **case["env"]), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        written = files_under(case["output_prefix"])
        if fast["phase"] == "succeeded":
            assert written.get("outputs.pb") == fast["outputs"], f"{what}: {list(written)} {done.stdout[-1500:]}"
        else:
            assert without_timestamp(bytes.fromhex(written["error.pb"])) == fast["error"], what
        assert _without_in_band(written) == fast["output_files"], what
        assert files_under(case["raw_prefix"]) == fast["raw_files"], what
        assert {k: v for k, v in written.items() if k != "error.pb"} == element["output_files"], what
        assert (element["outputs"], element["error"]) == (fast["outputs"], fast["error"]), what
        assert element["raw_files"] == fast["raw_files"], what
    assert "outputs.pb" in results[3]["output_files"], "a map element left no outputs.pb in its prefix"


def test_fast_path_resets_module_globals(cases, tmp_path):
    case = dict(cases[0], task="count_calls", inputs=_inputs(ft.count_calls))
    results = _run([dict(case, path="fast")] * 3, tmp_path)
    assert [r["outputs"] for r in results] == [results[0]["outputs"]] * 3, "a module global leaked between tasks"
    assert [r["modules"] for r in results] == ["kept"] * 3


def test_a_task_with_a_deck_gets_its_timeline_on_the_fast_path_as_on_the_full_one(cases, tmp_path):
    # The fast path skips flytekit's timings only for tasks that output no deck (executor.skip_unused_timings): a
    # task with one gets the same Timeline rows, alone, in a batch, and after a deck-less task in the same process.
    case = dict(cases[0], task="with_deck", inputs=_inputs(ft.with_deck, name="deck"))
    hello = next(c for c in cases if c["task"] == "hello")
    runs = [dict(case, path="full"), dict(hello, path="fast"), dict(case, path="fast"), dict(case, path="batch"),
            dict(case, path="batch")]
    results = _run(runs, tmp_path)

    def timeline(result):
        html = bytes.fromhex(result["output_files"]["deck.html"]).decode()
        return [step for step in ("Translate literal to python value", "Execute user level code",
                                  "Translate the output to literals", "dispatch execute") if step in html]

    full, _, fast, *batch = results
    assert timeline(full) == ["Translate literal to python value", "Execute user level code",
                              "Translate the output to literals", "dispatch execute"], full["output_files"].keys()
    for result in (fast, *batch):
        assert result["phase"] == "succeeded" and timeline(result) == timeline(full)
