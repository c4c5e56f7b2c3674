"""The replica sandbox's kept modules (``worker/sandbox.py``): a module imported by one task and kept for the next
must look to the next task exactly as a fresh import would, and a module that cannot be put back is re-imported."""

import os
import sys
import textwrap
import threading

import pytest

from flytekitplugins.actor.worker.sandbox import TaskSandbox

MODULE = textwrap.dedent('''
    import functools
    import os
    from dataclasses import dataclass, field

    COUNT = 0
    ITEMS = [1, 2]
    TABLE = {"a": 1}
    SEEN = set()
    MODE = os.environ.get("SANDBOX_TEST_MODE", "plain")

    @dataclass
    class Point:
        x: int = 0
        tags: list = field(default_factory=list)

    class Registry:
        entries = []

        def __init__(self):
            self.name = "registry"

    REGISTRY = Registry()

    @functools.lru_cache(maxsize=None)
    def square(n):
        return n * n

    def append(x, into=[]):
        into.append(x)
        return into

    def mutate():
        global COUNT
        COUNT += 1
        ITEMS.append(3)
        TABLE["b"] = 2
        SEEN.add("x")
        Registry.entries.append(1)
        Registry.added = True
        REGISTRY.name = "changed"
        square(4)
        append(1)
        append.__defaults__ = ([9],)
        globals()["NEW"] = 1
''')


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    sandbox = TaskSandbox(str(tmp_path / "scratch"))
    yield code, sandbox
    for name in [n for n in sys.modules if n.startswith("sandboxmod")]:
        del sys.modules[name]


def run_task(sandbox, code, body, env=None):
    """One task as the executor's fast path runs it: enter, import through the sandbox, run, exit."""
    sandbox.enter(env or {}, str(code))
    try:
        module = sandbox.snapshot_imports(lambda: __import__("sandboxmod"))
        return body(module)
    finally:
        sandbox.exit()


def state(m):
    return (m.COUNT, list(m.ITEMS), dict(m.TABLE), set(m.SEEN), list(m.Registry.entries),
            hasattr(m.Registry, "added"), m.REGISTRY.name, m.square.cache_info().currsize, tuple(m.append(0)),
            hasattr(m, "NEW"), m.MODE)


def test_a_kept_module_is_put_back_as_freshly_imported(workspace):
    code, sandbox = workspace
    (code / "sandboxmod.py").write_text(MODULE)
    fresh = run_task(sandbox, code, state)
    assert fresh == (0, [1, 2], {"a": 1}, set(), [], False, "registry", 0, (0,), False, "plain")
    first = run_task(sandbox, code, lambda m: id(m))
    run_task(sandbox, code, lambda m: m.mutate())
    assert sandbox.last_modules == "kept"
    assert run_task(sandbox, code, lambda m: (id(m), state(m))) == (first, fresh)
    assert sandbox.kept_modules == ["sandboxmod"]


def test_a_module_holding_what_cannot_be_reset_is_reimported(workspace):
    code, sandbox = workspace
    (code / "sandboxmod.py").write_text("import threading\nLOCK = threading.Lock()\n")
    first = run_task(sandbox, code, lambda m: m)  # held, so that a new module cannot reuse its address
    assert sandbox.last_modules == "dropped"
    assert "threading.lock" in sandbox.not_kept.lower() or "lock" in sandbox.not_kept
    assert run_task(sandbox, code, lambda m: m) is not first


def test_a_changed_source_file_is_reimported(workspace):
    code, sandbox = workspace
    path = code / "sandboxmod.py"
    path.write_text("VALUE = 1\n")
    assert run_task(sandbox, code, lambda m: m.VALUE) == 1
    path.write_text("VALUE = 22\n")
    assert run_task(sandbox, code, lambda m: m.VALUE) == 22


def test_a_module_is_reimported_when_an_environment_variable_its_import_read_changes(workspace):
    code, sandbox = workspace
    (code / "sandboxmod.py").write_text(MODULE)
    assert run_task(sandbox, code, lambda m: m.MODE, {"SANDBOX_TEST_MODE": "a"}) == "a"
    assert run_task(sandbox, code, lambda m: m.MODE, {"SANDBOX_TEST_MODE": "a"}) == "a"
    assert sandbox.last_modules == "kept"
    assert run_task(sandbox, code, lambda m: m.MODE, {"SANDBOX_TEST_MODE": "b"}) == "b"
    assert "SANDBOX_TEST_MODE" not in os.environ


def test_another_code_root_reimports(workspace, tmp_path):
    code, sandbox = workspace
    (code / "sandboxmod.py").write_text("VALUE = 1\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "sandboxmod.py").write_text("VALUE = 2\n")
    assert run_task(sandbox, code, lambda m: m.VALUE) == 1
    sys.path.insert(0, str(other))
    try:
        assert run_task(sandbox, other, lambda m: m.VALUE) == 2
    finally:
        sys.path.remove(str(other))


def test_the_full_path_drops_kept_modules(workspace):
    code, sandbox = workspace
    (code / "sandboxmod.py").write_text("VALUE = 1\n")
    first = run_task(sandbox, code, lambda m: m)  # held, so that a new module cannot reuse its address
    sandbox.enter({}, str(code), keep_modules=False)
    try:
        assert "sandboxmod" not in sys.modules
    finally:
        sandbox.exit()
    assert run_task(sandbox, code, lambda m: m) is not first


def test_environment_and_temp_dir_are_reset(workspace):
    code, sandbox = workspace
    (code / "sandboxmod.py").write_text("VALUE = 1\n")

    def body(m):
        os.environ["SANDBOX_LEAK"] = "1"
        os.environ.pop("HOME", None)
        with open(os.path.join(os.environ["TMPDIR"], "left.txt"), "w") as f:
            f.write("x")
        os.makedirs(os.path.join(os.environ["TMPDIR"], "a", "b"))

    home = os.environ.get("HOME")
    run_task(sandbox, code, body, {"TASK_VAR": "1"})
    assert "SANDBOX_LEAK" not in os.environ and "TASK_VAR" not in os.environ
    assert os.environ.get("HOME") == home
    assert os.listdir(sandbox.tmpdir) == []
    assert threading.active_count() >= 1


def test_installed_distributions_are_read_once_per_process_not_per_executor(tmp_path, monkeypatch):
    # An executor makes its sandbox when it starts; reading every distribution's metadata there cost ~0.15 s of CPU
    # per executor (25 of them when a fleet of 25 starts). The fork server reads it once, before forking them.
    from importlib import metadata

    from flytekitplugins.actor.worker.sandbox import TaskSandbox, _installed_top_level_names

    names = _installed_top_level_names()
    assert "flytekit" in names

    def read_again():
        raise AssertionError("installed distributions read again")

    monkeypatch.setattr(metadata, "packages_distributions", read_again)
    TaskSandbox(str(tmp_path / "a"))
    TaskSandbox(str(tmp_path / "b"))
    assert _installed_top_level_names() is names
