"""The replica worker with a probe in its executors (benchmarks 2 and the profile): the product's
``flytekitplugins.actor.worker.replica`` unchanged, except that the executors' fork server also preloads
``benchmarks._probe``, which wraps the executor's ``run_task``. With ``BENCH_PROFILE_DIR`` set, this process
is profiled with pyinstrument as well, from its first assignment (start-up left out) until it exits, when the
profile is saved."""

import multiprocessing.forkserver
import os

_preload = multiprocessing.forkserver.set_forkserver_preload


def _preload_with_probe(module_names):
    _preload(list(module_names) + ["benchmarks._probe"])


multiprocessing.forkserver.set_forkserver_preload = _preload_with_probe

from flytekitplugins.actor.worker.replica import ReplicaWorker, main  # noqa: E402

if __name__ == "__main__":
    profile_dir = os.environ.get("BENCH_PROFILE_DIR")
    if profile_dir:
        import atexit

        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")

        def _save():
            if not profiler.is_running:
                return
            session = profiler.stop()
            session.save(os.path.join(profile_dir, f"replica-{os.getpid()}.pyisession"))

        atexit.register(_save)
        assign = ReplicaWorker._assign

        def _assign(self, assignment):
            if not profiler.is_running:
                profiler.start()
            return assign(self, assignment)

        ReplicaWorker._assign = _assign
    main()
