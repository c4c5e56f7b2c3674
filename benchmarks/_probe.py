"""Imported by the executors' fork server of a probed replica (see ``_probe_replica``): wraps the executor's
``run_task`` to record, per task, when the executor started and finished it (``time.monotonic``, the machine's
CLOCK_MONOTONIC, which the agent's scheduler uses too). One line per task, ``output_prefix start end``, appended
to ``$BENCH_PROBE_DIR/<pid>.tsv`` (the end is when the executor hands the result back; the write happens after)."""

import os
import time

from flytekitplugins.actor.worker import executor

_run_task = executor.run_task
_probe_dir = os.environ.get("BENCH_PROBE_DIR")


def run_task(spec, sandbox, scratch_root, report=None):
    started = time.monotonic()
    ended = []

    def probed_report(result):
        ended.append(time.monotonic())  # the executor is done with the task when it hands the result back
        if report is not None:
            report(result)

    try:
        return _run_task(spec, sandbox, scratch_root, report=probed_report)
    finally:
        end = ended[0] if ended else time.monotonic()
        if _probe_dir:
            with open(os.path.join(_probe_dir, f"{os.getpid()}.tsv"), "a") as f:
                f.write(f"{spec.output_prefix}\t{started!r}\t{end!r}\n")


executor.run_task = run_task
