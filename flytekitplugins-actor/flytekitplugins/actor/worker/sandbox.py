"""What a replica resets between two tasks, so that one task's state does not leak into the next.

Reset after every task:
  * user modules imported by the task: every module that was not loaded before the task and does not come from
    the standard library or an installed package (site-packages) is dropped from ``sys.modules``, so the next
    task imports it afresh: its globals, ``functools.lru_cache`` and class attributes start clean;
  * flytekit's registries of tasks, workflows and launch plans, which those modules added to;
  * ``os.environ``, the working directory and ``sys.path``;
  * the task's temporary directory (``tempfile`` and ``TMPDIR`` point into it while the task runs), which also
    holds flytekit's sandbox of downloaded inputs.

Kept: ``@actor_cache`` entries, installed packages a task imported (they stay imported, with their module state;
packages installed in editable mode count as installed),
files a task wrote outside its temporary directory, threads a task started and left running.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from types import ModuleType
from typing import Dict, List, Set

from flytekit.core.context_manager import FlyteEntities
from flytekit.core.launch_plan import LaunchPlan


def _library_roots() -> List[str]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))}
    return sorted(os.path.realpath(r) + os.sep for r in roots)


def _installed_top_level_names() -> Set[str]:
    """Top-level packages of installed distributions, editable installs included (they live outside
    site-packages but are libraries all the same)."""
    from importlib import metadata

    return set(metadata.packages_distributions())


class TaskSandbox:
    """Snapshot the process before a task (``enter``) and put it back after (``exit``)."""

    def __init__(self, scratch_root: str):
        self._scratch_root = scratch_root
        self._roots = _library_roots()
        self._installed = _installed_top_level_names()
        self._modules: Set[str] = set()
        self._environ: Dict[str, str] = {}
        self._cwd = ""
        self._path: List[str] = []
        self._entities = 0
        self._launch_plans: Set[str] = set()
        self.tmpdir = ""

    def enter(self, env: Dict[str, str]) -> None:
        self._modules = set(sys.modules)
        self._environ = dict(os.environ)
        self._cwd = os.getcwd()
        self._path = list(sys.path)
        self._entities = len(FlyteEntities.entities)
        self._launch_plans = set(LaunchPlan.CACHE)
        self.tmpdir = tempfile.mkdtemp(prefix="task-", dir=self._scratch_root)
        os.environ.update(env)
        os.environ["TMPDIR"] = self.tmpdir
        tempfile.tempdir = self.tmpdir

    def exit(self) -> None:
        for name in [n for n in sys.modules if n not in self._modules]:
            module = sys.modules.get(name)
            if module is not None and not self._is_library(module):
                del sys.modules[name]
        del FlyteEntities.entities[self._entities :]
        for name in [n for n in LaunchPlan.CACHE if n not in self._launch_plans]:
            del LaunchPlan.CACHE[name]
        os.environ.clear()
        os.environ.update(self._environ)
        try:
            os.chdir(self._cwd)
        except OSError:
            pass
        sys.path[:] = self._path
        tempfile.tempdir = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _is_library(self, module: ModuleType) -> bool:
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.origin in ("built-in", "frozen"):
            return True
        if module.__name__.partition(".")[0] in self._installed:
            return True
        locations = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", None) or [])
        locations = [os.path.realpath(p) for p in locations if isinstance(p, str)]
        if not locations:
            return True  # nothing on disk to re-import from: leave it alone
        return all(any(loc.startswith(root) for root in self._roots) for loc in locations)
