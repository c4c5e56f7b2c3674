"""Runs tasks of fast_path_tasks.py through the executor's ``run_task`` in a process of its own, as an executor
does, each on the path the case names, and prints what each run produced as JSON (see test_fast_path.py).

Usage: ``python fast_path_runner.py CASES.json`` where each case is ``{"task", "inputs" (hex LiteralMap),
"path" ("fast" | "full" | "element" | "batch"), "output_prefix", "raw_prefix", "env"}``; consecutive "batch" cases
of one task run as one batch (``executor.run_batch``). "element" and "batch" runs are actor map elements: they leave their
outputs.pb in the output prefix as well."""

import json
import os
import re
import shutil
import sys
import tempfile

from flyteidl.core import errors_pb2

from flytekitplugins.actor.protocol import lease_pb2
from flytekitplugins.actor.worker import executor
from flytekitplugins.actor.worker.sandbox import TaskSandbox

RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"


def files_under(root: str) -> dict:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read().hex()
    return found


#: Frames of the runner that ran a flytekit coroutine for ``run_sync``: flytekit's own hands it to a loop thread and
#: waits on a future (pyflyte-execute), an executor runs it on its own thread (``executor._InlineRunner``). A
#: traceback through ``run_sync`` shows one set or the other, and which line of ``Future.result`` re-raised depends
#: on timing; nothing else in it differs, so these frames are left out before comparing.
_RUNNER_FRAME = re.compile(r' *File "[^"]*(flytekit/utils/asyn\.py", line \d+, in run|concurrent/futures/_base\.py", '
                           r'line \d+, in (result|__get_result)|actor/worker/executor\.py", line \d+, in run|'
                           r'asyncio/base_events\.py", line \d+, in run_until_complete)$')


def without_runner_frames(text: str) -> str:
    out, skip_deeper = [], None
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip(" "))
        if skip_deeper is not None and indent > skip_deeper:
            continue  # the frame's source line and its carets
        skip_deeper = indent if _RUNNER_FRAME.match(line) else None
        if skip_deeper is None:
            out.append(line)
    return "\n".join(out)


def without_timestamp(error: bytes) -> str:
    """The ErrorDocument with what differs between two runs by nature taken out: its timestamp, and the frames of
    flytekit's coroutine runner in a traceback (see above)."""
    if not error:
        return ""
    document = errors_pb2.ErrorDocument.FromString(error)
    document.error.ClearField("timestamp")
    document.error.message = without_runner_frames(document.error.message)
    return document.SerializeToString(deterministic=True).hex()


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    scratch = tempfile.mkdtemp(prefix="fast-path-runner-")
    sandbox = TaskSandbox(scratch)
    assert executor.run_flytekit_coroutines_inline(), "as executor.serve does"
    assert executor.keep_engine_files_in_memory(), "as executor.serve does"
    assert executor.skip_unused_timings(), "as executor.serve does"
    results = []
    i = 0
    while i < len(cases):
        # A run of "batch" cases of one task goes through run_batch together, as one map's elements queued on one
        # executor.
        group = [cases[i]]
        while (cases[i]["path"] == "batch" and i + len(group) < len(cases) and cases[i + len(group)]["path"] == "batch"
               and cases[i + len(group)]["task"] == cases[i]["task"]):
            group.append(cases[i + len(group)])
        i += len(group)
        specs = [_spec(case) for case in group]
        if group[0]["path"] == "batch":
            sent = []
            executor.run_batch([(str(n), spec) for n, spec in enumerate(specs)], sandbox, scratch, sent.extend)
            assert [lease_id for lease_id, _ in sent] == [str(n) for n in range(len(specs))], sent
            got = [result for _, result in sent]
        else:
            got = [executor.run_task(specs[0], sandbox, scratch)]
        for case, result in zip(group, got):
            results.append({
                "phase": result["phase"],
                "outputs": result.get("outputs", b"").hex(),
                "error": without_timestamp(result.get("error", b"")),
                "message": without_runner_frames(result.get("message", "")),
                "retryable": result.get("retryable", False),
                "output_files": files_under(case["output_prefix"]),
                "raw_files": files_under(case["raw_prefix"]),
                "outputs_group": result.get("outputs_group", ""),
                "modules": sandbox.last_modules,
                "not_kept": sandbox.not_kept,
            })
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results))


def _spec(case: dict) -> lease_pb2.TaskRun:
    for prefix in (case["output_prefix"], case["raw_prefix"]):
        shutil.rmtree(prefix, ignore_errors=True)
    env = dict(case.get("env", {}))
    env[executor.FAST_PATH_VARIABLE] = "0" if case["path"] == "full" else "1"
    return lease_pb2.TaskRun(
        task_name=case["task"], resolver=RESOLVER, resolver_args=["task-module", "fast_path_tasks", "task-name",
                                                                  case["task"]],
        inputs=bytes.fromhex(case["inputs"]), output_prefix=case["output_prefix"],
        raw_output_data_prefix=case["raw_prefix"], env=env, batch_key="map" if case["path"] == "batch" else "",
        outputs_to_prefix=case["path"] in ("element", "batch"),
        outputs_group_prefix=case.get("group_prefix", ""), element_index=case.get("index", 0),
    )


if __name__ == "__main__":
    main()
