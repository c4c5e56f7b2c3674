"""Runs tasks of fast_path_tasks.py through the executor's ``run_task`` in a process of its own, as an executor
does, each on the path the case names, and prints what each run produced as JSON (see test_fast_path.py).

Usage: ``python fast_path_runner.py CASES.json`` where each case is ``{"task", "inputs" (hex LiteralMap),
"path" ("fast" | "full"), "output_prefix", "raw_prefix", "env"}``."""

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


#: In a traceback through flytekit's ``run_sync``, which line of ``Future.result`` re-raised depends on whether
#: flytekit's loop thread had finished before ``result`` was called: two runs of one path differ there too.
_FUTURE_RESULT_LINE = re.compile(r'(concurrent/futures/_base\.py", line )\d+(, in result)')


def without_timestamp(error: bytes) -> str:
    """The ErrorDocument with what differs between two runs of the same path by nature taken out: its timestamp,
    and the line of ``Future.result`` in a traceback (see above)."""
    if not error:
        return ""
    document = errors_pb2.ErrorDocument.FromString(error)
    document.error.ClearField("timestamp")
    document.error.message = _FUTURE_RESULT_LINE.sub(r"\1N\2", document.error.message)
    return document.SerializeToString(deterministic=True).hex()


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    scratch = tempfile.mkdtemp(prefix="fast-path-runner-")
    sandbox = TaskSandbox(scratch)
    results = []
    for case in cases:
        for prefix in (case["output_prefix"], case["raw_prefix"]):
            shutil.rmtree(prefix, ignore_errors=True)
        env = dict(case.get("env", {}))
        env[executor.FAST_PATH_VARIABLE] = "1" if case["path"] == "fast" else "0"
        spec = lease_pb2.TaskRun(
            task_name=case["task"], resolver=RESOLVER, resolver_args=["task-module", "fast_path_tasks", "task-name",
                                                                      case["task"]],
            inputs=bytes.fromhex(case["inputs"]), output_prefix=case["output_prefix"],
            raw_output_data_prefix=case["raw_prefix"], env=env,
        )
        result = executor.run_task(spec, sandbox, scratch)
        results.append({
            "phase": result["phase"],
            "outputs": result.get("outputs", b"").hex(),
            "error": without_timestamp(result.get("error", b"")),
            "message": _FUTURE_RESULT_LINE.sub(r"\1N\2", result.get("message", "")),
            "retryable": result.get("retryable", False),
            "output_files": files_under(case["output_prefix"]),
            "raw_files": files_under(case["raw_prefix"]),
            "modules": sandbox.last_modules,
            "not_kept": sandbox.not_kept,
        })
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
