"""The package's structure: no import cycles between its modules, no model-kind switch in the CLI, no private
names imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import CHECKOUT

PKG = CHECKOUT / "sls_deploy"  # the source tree


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py") if "calib" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[mod] |= {n for n in names if n in files and n != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_private_names_imported_across_modules():
    bad = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sls_deploy"):
                bad += [f"{_module(p)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []


def test_the_cli_has_no_model_kind_switch():
    src = (PKG / "cli.py").read_text()
    assert "kind()" not in src and "is_streaming" not in src and "video_pipeline" not in src


# --------------------------------------------------------------------------- one runtime layer, vocabularies once


def _uses(names: set[str]) -> dict[str, set[str]]:
    """{module: which of ``names`` it references} (as a bare name or an attribute, e.g. ``ort.InferenceSession``)."""
    found: dict[str, set[str]] = {}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in names:
                found.setdefault(_module(p), set()).add(name)
    return found


def test_onnx_runtime_sessions_open_in_one_module():
    assert set(_uses({"InferenceSession", "SessionOptions", "RunOptions"})) == {"sls_deploy.backends.sessions"}


def test_polygraphy_runners_are_built_in_one_module():
    assert set(_uses({"TrtRunner", "OnnxrtRunner", "EngineFromBytes"})) == {"sls_deploy.backends.runtime"}


def _imports_stages(graph: dict[str, set[str]], module: str) -> list[str]:
    return sorted(m for m in graph[module] if m == "sls_deploy.stages" or m.startswith("sls_deploy.stages."))


def test_nothing_at_inference_time_imports_the_stages():
    """upscale (every module it reaches), the runtime layer and route's inference modules load models through
    backends/, never through the build stages. (adaptive/family.py and nested.py build a family: build time.)"""
    graph = _graph()
    inference = [m for m in graph if m.startswith(("sls_deploy.upscale", "sls_deploy.backends"))]
    inference += [f"sls_deploy.adaptive.{m}" for m in ("run", "members", "evaluate", "routers", "patches", "patchset")]
    assert {m: _imports_stages(graph, m) for m in inference if _imports_stages(graph, m)} == {}
    reached, todo = set(), [m for m in graph if m.startswith("sls_deploy.upscale")]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += graph[m]
    assert sorted(m for m in reached if m.startswith("sls_deploy.stages")) == []


def test_vocabularies_are_defined_once():
    """No literal tuple/list/set of the precisions, the calibration methods or the backends outside
    core/vocabulary.py (in any order): they are imported from there."""
    from sls_deploy.core import vocabulary

    vocabularies = {frozenset(v) for v in (vocabulary.PRECISIONS, vocabulary.CALIB_METHODS, vocabulary.BACKENDS)}
    copies = []
    for p in PKG.rglob("*.py"):
        if p == PKG / "core" / "vocabulary.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                if frozenset(e.value for e in node.elts) in vocabularies:
                    copies.append(f"{_module(p)}:{node.lineno}")
    assert copies == []


def test_the_vocabulary_module_imports_nothing():
    tree = ast.parse((PKG / "core" / "vocabulary.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
