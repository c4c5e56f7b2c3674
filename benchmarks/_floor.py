"""The floor of benchmark 2, run in a process of its own: flytekit's own entrypoint function
``flytekit.bin.entrypoint._execute_task`` (what ``pyflyte-execute`` calls) on local files, for the same no-op
task, called ``--n`` times in a row in a warm process. Also times what a replica adds on top of it between two tasks:
re-importing the task's module (the sandbox's full path drops user modules after every task).

Prints a JSON object: ``execute`` and ``reimport``, lists of seconds."""

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--task", default="noop")
    args = parser.parse_args()

    from flytekit.bin.entrypoint import _execute_task

    root = tempfile.mkdtemp(prefix="flyte-actors-floor-")
    inputs = os.path.join(root, "inputs.pb")
    with open(inputs, "wb") as f:
        f.write(b"")  # the empty LiteralMap: the no-op task has no inputs

    def execute(i: int) -> float:
        started = time.perf_counter()
        _execute_task(
            inputs=inputs,
            output_prefix=os.path.join(root, "out", str(i)),
            test=False,
            raw_output_data_prefix=os.path.join(root, "raw"),
            resolver="flytekit.core.python_auto_container.default_task_resolver",
            resolver_args=["task-module", "benchmarks.tasks", "task-name", args.task],
        )
        return time.perf_counter() - started

    for i in range(20):  # warm up: imports, first-call caches
        execute(-i - 1)
    if not os.path.exists(os.path.join(root, "out", "-1", "outputs.pb")):
        raise SystemExit("the floor task wrote no outputs.pb")
    executions = [execute(i) for i in range(args.n)]

    reimports = []
    for _ in range(200):
        for name in ("benchmarks.tasks", "benchmarks"):
            sys.modules.pop(name, None)
        started = time.perf_counter()
        importlib.import_module("benchmarks.tasks")
        reimports.append(time.perf_counter() - started)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"execute": executions, "reimport": reimports}))


if __name__ == "__main__":
    main()
