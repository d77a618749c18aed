"""The package's layers point one way — config → data → models → cost → method → pruning → api → train →
evaluate → report → pipeline → cli — and no module imports itself back through others (no import cycle).

Every ``import`` of ``src/mtprune`` counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mtprune"

#: layer → the modules (and packages) in it, lowest first. ``cost`` (params, MACs, timing) holds ``export``
#: (ONNX Runtime is a runtime it times); ``api`` (one prune call) sits on pruning; ``layout`` (the run
#: folder's names) reads the methods of ``pruning`` and is read by report, pipeline and cli; ``recipe``
#: (what decides a stage) sits with training. ``mtprune`` itself (the public API) is the top.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config", ("mtprune.config", "mtprune.errors", "mtprune.interrupt", "mtprune.io", "mtprune.version")),
    ("data", ("mtprune.data",)),
    ("models", ("mtprune.models", "mtprune.checkpoint")),
    ("cost", ("mtprune.cost", "mtprune.export")),
    ("method", ("mtprune.method",)),
    ("pruning", ("mtprune.pruning",)),
    ("api", ("mtprune.api",)),
    ("layout", ("mtprune.layout",)),
    ("train", ("mtprune.train", "mtprune.recipe")),
    ("evaluate", ("mtprune.evaluate",)),
    ("report", ("mtprune.report",)),
    ("pipeline", ("mtprune.pipeline",)),
    ("cli", ("mtprune.cli", "mtprune.__main__")),
    ("top", ("mtprune",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def imports(path: Path) -> set[str]:
    """The ``mtprune`` modules ``path`` imports (``from a import b`` counts as ``a.b`` when ``a.b`` is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mtprune"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mtprune":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                out.add(sub if is_module else node.module)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_module_imports_only_its_own_layer_or_lower():
    bad = [
        f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for mod, deps in graph().items()
        for dep in deps
        if layer_of(dep) > layer_of(mod)
    ]
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` (a package's ``__init__`` is the module of the package's name), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_itself_back():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_checks_catch_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer_of("mtprune.train.engine") > layer_of("mtprune.pruning.plan") > layer_of("mtprune.models.base")
    assert layer_of("mtprune.evaluate.inference") > layer_of("mtprune.train.engine") > layer_of("mtprune.cost.latency")
    assert layer_of("mtprune") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("mtprune_other.x")
