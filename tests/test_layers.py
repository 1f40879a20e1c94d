"""The apps form layers, and no module imports its way back up.

    proto                       gRPC messages and client, the clients' kept HTTP connection;
                                no Django, none of our apps
    core                        base app: problems, schema, API keys, tokens, logs, metrics
    registry                    fleet tables and their verbs, router, placement, API, admin
    reconciler                  snapshot -> plan -> apply, its API and admin, the dashboard
    controlplane                settings, URLs, WSGI/ASGI, health, /metrics: the wiring
    gateway                     beside controlplane at the top: the OpenAI-compatible gateway;
                                it may import proto, core and registry, and no app imports it

An app may import the apps below it, never one above. The reference worker and the frontend
client (``worker``, ``cpclient``) stand beside the server: they may import ``proto`` and
nothing else of ours, and no server app imports them. Every import counts, also one inside a
function (a function-local import is not a way around a layer) - except those under
``if TYPE_CHECKING:``, which never run.

Within the project, modules form no import cycle either (``registry.router`` and
``registry.tasks`` once closed one with a function-local import), and no hand-written module
grows past ``MAX_LINES``: a longer one holds more than one job.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = ["proto", "core", "registry", "reconciler", "controlplane"]
CLIENTS = {"worker": {"proto"}, "cpclient": {"proto"}}
# Apps at the top beside ``controlplane``, each with what it may import; no other app imports them.
TOP = {"gateway": {"proto", "core", "registry"}}
PACKAGES = set(LAYERS) | set(CLIENTS) | set(TOP)
MAX_LINES = 600


def source_files():
    for package in sorted(PACKAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def generated(path: Path) -> bool:
    return path.name.endswith(("_pb2.py", "_pb2_grpc.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file that runs at some point."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import module`` imports pkg.module when it is one.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*candidate.split(".")) / "__init__.py"
                ).exists()
                found.append((node.lineno, candidate if is_module else target))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def allowed(source: str, target: str) -> bool:
    if source == target:
        return True
    if source in CLIENTS:
        return target in CLIENTS[source]
    if target in CLIENTS:
        return False
    if source in TOP:
        return target in TOP[source]
    if target in TOP:
        return False
    return LAYERS.index(target) < LAYERS.index(source)


def test_no_app_imports_a_layer_above_it_or_a_client():
    wrong = sorted(
        {
            f"{path.relative_to(ROOT)}:{line} imports {target} ({package} may not import {target.split('.')[0]})"
            for package, path in source_files()
            for line, target in imports_of(path)
            if not allowed(package, target.split(".")[0])
        }
    )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _resolve(name: str, modules: set[str]) -> str | None:
    """The project module an import lands in (``registry.models.Node`` -> ``registry.models``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_cycle_between_modules():
    files = {module_name(path): path for _, path in source_files()}
    modules = set(files)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in files.items():
        for _, target in imports_of(path):
            resolved = _resolve(target, modules)
            # A package's __init__ importing its own submodules is how packages re-export.
            if resolved and resolved != name and not resolved.startswith(name + "."):
                graph[name].add(resolved)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_no_hand_written_module_is_longer_than_the_limit():
    long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for _, path in source_files()
        if not generated(path) and (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


def test_the_layer_rules_see_the_imports_they_judge():
    """The checks above are only as good as the import reader: it must see imports inside
    functions and resolve relative ones, and skip TYPE_CHECKING blocks."""
    found = {target for _, target in imports_of(ROOT / "registry" / "managers" / "replicas.py")}
    assert "registry.models" not in found  # imported under TYPE_CHECKING only
    found = {target for _, target in imports_of(ROOT / "core" / "apps.py")}
    assert {"core.checks", "core.metrics", "core.logs"} <= found  # function-local, inside ready()
