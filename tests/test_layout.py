"""The package's structure (issue 18): no import cycle, no private name crossing a module boundary,
no function-level import of the package's own modules, one optimiser loop.

Read from the source with ``ast``: the checks fail on the line that breaks the rule.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "schashformer"
MODULES = {p: ".".join(p.relative_to(SRC.parent).with_suffix("").parts) for p in SRC.rglob("*.py")}
# function-level imports allowed: optional or heavy third-party packages loaded only where used
LAZY_ALLOWED = {"scanpy", "umap", "scvi", "harmonypy", "matplotlib", "torch.distributed.run", "sklearn.neighbors",
                "pynndescent", "leidenalg", "igraph", "scib_metrics", "fcntl"}


def _module_name(path: Path) -> str:
    name = MODULES[path]
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """Absolute module of a relative ``from ... import``."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if not path.name == "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, top_level_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node)
            for alias in node.names:
                yield node, mod, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None


def _internal(mod: str, name: str | None) -> str | None:
    """The package module an import refers to (``from . import x`` -> ``schashformer.x``), or None."""
    if not mod.startswith("schashformer"):
        return None
    candidate = f"{mod}.{name}" if name else mod
    return candidate if candidate in set(map(_module_name, MODULES)) else mod


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for path in MODULES:
        for node, mod, name in _imports(path, top_level_only=False):
            if name and name.startswith("_") and mod.startswith("schashformer") and name != "__version__":
                bad.append(f"{path.name}:{node.lineno} imports {name} from {mod}")
    assert not bad, bad


def test_no_function_level_import_of_the_package_or_required_libraries():
    bad = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mod = _resolve(path, node) if isinstance(node, ast.ImportFrom) else node.names[0].name
                if not any(mod == lib or mod.startswith(lib + ".") for lib in LAZY_ALLOWED):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno} imports {mod} inside a function")
    assert not bad, "\n".join(bad)


def test_module_imports_form_no_cycle():
    graph = {}
    for path in MODULES:
        me = _module_name(path)
        deps = set()
        for _, mod, name in _imports(path, top_level_only=True):
            target = _internal(mod, name)
            if target and target != me and not me.startswith(target + "."):  # a package's own __init__ aside
                deps.add(target)
        graph[me] = deps
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_one_optimiser_loop_in_the_method_code():
    """Only the engine builds an optimiser (the ZINB-DEC baseline, a peer, keeps its own)."""
    owners = sorted(str(p.relative_to(SRC)) for p in MODULES
                    if "optim.Adam" in p.read_text() and "baselines" not in p.parts)
    assert owners == ["engine.py"], owners
