"""The floors of docs/architecture.md, checked on the source: what each folder may import, no import
cycle between modules, no private name imported from another module, and imports at the top of modules
except in the modules that say why once.

The imports are read with `ast` from the files (function-level imports included), so the test needs no
import of the package and sees exactly what a reader sees.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Folder -> the folders it may import besides itself (docs/architecture.md, "Floors").
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "queue": frozenset({"core"}),
    "providers": frozenset({"core"}),
    "users": frozenset({"core", "queue"}),
    "ratelimit": frozenset({"core", "queue", "users"}),
    "campaigns": frozenset({"core", "queue", "users", "ratelimit", "providers"}),
    "automations": frozenset({"core", "queue", "users", "ratelimit", "campaigns", "providers"}),
    "gateway": frozenset({"core", "queue", "users", "ratelimit", "campaigns", "automations", "providers"}),
    "bench": frozenset({"core", "queue", "users", "ratelimit", "campaigns", "automations", "providers", "gateway"}),
}

# The command line is the program's top: `pushgw bench` runs the benchmark, which drives the gateway.
ALSO_ALLOWED = {"pushgw.gateway.cli": frozenset({"bench"})}

# Modules that import inside functions, each for the reason written at the top of the module.
# Each says why in its docstring: an entry point that sets PROMETHEUS_MULTIPROC_DIR before anything
# imports prometheus_client, a module that loads an optional library (matplotlib) only when asked, or
# the providers package, which loads a provider module (and its libraries) only when it is configured.
LAZY_IMPORTS_ALLOWED = {
    "pushgw.gateway.cli",
    "pushgw.gateway.demo",
    "pushgw.bench.run",
    "pushgw.bench.worker_overhead",
    "pushgw.campaigns.report",
    "pushgw.providers",
}


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module, e.g. pushgw.gateway.worker
    target: str  # the imported module, e.g. pushgw.queue.streams
    names: tuple[str, ...]  # names taken from it (from X import a, b)
    line: int
    top_level: bool


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["pushgw", *parts])


def package_files() -> list[Path]:
    return sorted(p for folder in ALLOWED for p in (ROOT / folder).rglob("*.py"))


MODULES = {module_name(p): p for p in package_files()} | {"pushgw": ROOT / "__init__.py"}


def resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        at_top = id(node) not in in_function
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path.name == "__init__.py", node)
            names = tuple(a.name for a in node.names)
            # `from pushgw.core import metrics` imports the module pushgw.core.metrics
            if all(f"{target}.{n}" in MODULES for n in names):
                found += [Import(module, f"{target}.{n}", (), node.lineno, at_top) for n in names]
            else:
                found.append(Import(module, target, names, node.lineno, at_top))
        elif isinstance(node, ast.Import):
            found += [Import(module, a.name, (), node.lineno, at_top) for a in node.names]
    return found


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in imports_of(module, path)]
IMPORTS = [imp for imp in ALL_IMPORTS if imp.target == "pushgw" or imp.target.startswith("pushgw.")]


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward(imports: list[Import]) -> list[str]:
    return [
        f"{imp.source} (line {imp.line}) imports {imp.target}"
        for imp in imports
        if folder(imp.target) != folder(imp.source)
        and folder(imp.target) not in ALLOWED[folder(imp.source)] | ALSO_ALLOWED.get(imp.source, frozenset())
    ]


def module_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in imports:
        target = imp.target
        while target not in MODULES and "." in target:  # `import pushgw.x.y` of a package attribute
            target = target.rsplit(".", 1)[0]
        if target != imp.source and MODULES[target].name != "__init__.py":
            graph.setdefault(imp.source, set()).add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[str]:
    found: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_folder_imports_a_folder_above_its_floor() -> None:
    assert upward(IMPORTS) == []


def test_the_module_import_graph_has_no_cycle() -> None:
    assert cycles(module_graph(IMPORTS)) == []


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [
        f"{imp.source} (line {imp.line}) imports {name} from {imp.target}"
        for imp in IMPORTS
        for name in imp.names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_imports_sit_at_the_top_except_where_a_module_says_why() -> None:
    lazy = [
        f"{imp.source} (line {imp.line}) imports {imp.target} inside a function"
        for imp in ALL_IMPORTS
        if not imp.top_level and imp.source not in LAZY_IMPORTS_ALLOWED
    ]
    assert lazy == []


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    node = ast.parse("from ..gateway.worker import Worker\n").body[0]
    assert isinstance(node, ast.ImportFrom)
    target = resolve("pushgw.core.schema", False, node)
    assert target == "pushgw.gateway.worker"
    assert upward([Import("pushgw.core.schema", target, ("Worker",), 1, True)]) == [
        "pushgw.core.schema (line 1) imports pushgw.gateway.worker"
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
