"""The executor's loop without the replica around it, for profiling with py-spy (which cannot follow a replica's
executors here): a process that imports what a replica's fork server preloads (the executor module, nothing else),
then runs ``executor.run_task`` with a ``TaskSandbox`` exactly as ``executor.serve`` does, for ``--n`` copies of a
TaskRun the connector built (``--spec``: its serialized bytes), each with its own output prefix.
Prints the median seconds of run_task."""

import argparse
import os
import shutil
import statistics
import tempfile
import time

from flytekitplugins.actor.worker import executor  # what the fork server preloads
from flytekitplugins.actor.worker.sandbox import TaskSandbox
from flytekitplugins.actor.protocol import lease_pb2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with open(args.spec, "rb") as f:
        spec = lease_pb2.TaskRun.FromString(f.read())
    scratch = tempfile.mkdtemp(prefix="flyte-actors-executor-")
    sandbox = TaskSandbox(scratch)
    out = tempfile.mkdtemp(prefix="flyte-actors-outputs-")
    times = []
    for i in range(args.n):
        spec.output_prefix = os.path.join(out, str(i))
        started = time.perf_counter()
        result = executor.run_task(spec, sandbox, scratch)
        times.append(time.perf_counter() - started)
        if result["phase"] != executor.SUCCEEDED:
            raise SystemExit(f"task failed: {result.get('message')}")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"run_task p50 {statistics.median(times) * 1000:.2f} ms over {args.n} tasks")


if __name__ == "__main__":
    main()
