"""The house rules of the code base, checked on the source: no import cycles, no module over 400 lines, no Dagster
in the core's ML modules, and only definitions.py and cli.py reach into assets/ or resources/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orpo_pipeline", "assets", "resources")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its body (function-level imports count too)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_cycles():
    g = graph()
    # a package's __init__ importing its own submodules is not a cycle worth reporting
    g = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in g.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(g.get(n, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_over_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, {n: k for n, k in long.items() if k > MAX_LINES}


def test_core_reaches_assets_and_resources_only_from_definitions_and_cli():
    allowed = {"orpo_pipeline.definitions", "orpo_pipeline.cli"}
    bad = {n: sorted(d for d in deps if d.split(".")[0] in ("assets", "resources"))
           for n, deps in graph().items() if n.startswith("orpo_pipeline") and n not in allowed}
    assert not {n: d for n, d in bad.items() if d}, bad


def test_core_ml_modules_import_no_dagster():
    offenders = []
    for n, p in modules().items():
        if not n.startswith("orpo_pipeline.") or n in ("orpo_pipeline.definitions", "orpo_pipeline.cli"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(x == "dagster" or x.startswith("dagster.") or x.startswith("dagster_") and x != "dagster_pipes"
                   for x in names):
                offenders.append(n)
    assert not offenders, f"core modules importing Dagster: {sorted(set(offenders))}"


def test_no_numba():
    users = [n for n, p in modules().items() if "numba" in p.read_text()]
    assert not users, users

