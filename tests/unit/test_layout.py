"""The layering rules of docs/architecture.md, checked on the source: module-level imports form no loop in either
package, the SDK never imports the agent, and only the lease service speaks the lease protocol on the agent side."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {
    "flytekitplugins.actor": ROOT / "flytekitplugins-actor" / "flytekitplugins" / "actor",
    "flyte_actor_agent": ROOT / "backend-plugin" / "flyte_actor_agent",
}


def modules():
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            yield name, path, path.name == "__init__.py"


def module_level_imports(name: str, path: pathlib.Path, is_package: bool):
    """Modules imported at import time (not inside functions, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []:
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    target = ".".join(anchor + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)
    return found


def graph():
    names = {name: (path, is_package) for name, path, is_package in modules()}
    return {name: {i for i in module_level_imports(name, *names[name]) if i in names and i != name} for name in names}


def test_module_level_imports_form_no_loop():
    edges = graph()
    state: dict = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import loop: " + " -> ".join(trail + [node])
        state[node] = "open"
        for child in sorted(edges[node]):
            visit(child, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        visit(node, [])


def test_the_sdk_does_not_import_the_agent():
    for name, path, is_package in modules():
        if name.startswith("flytekitplugins.actor"):
            assert "flyte_actor_agent" not in path.read_text(), f"{path} names the agent package"


def test_only_the_lease_service_speaks_the_lease_protocol_in_the_agent():
    speakers = {name for name, path, _ in modules()
                if name.startswith("flyte_actor_agent") and "lease_pb2_grpc" in path.read_text()}
    assert speakers == {"flyte_actor_agent.lease_service"}
