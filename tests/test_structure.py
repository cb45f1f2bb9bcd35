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


# -- pruning strategies: the stages call the contract (issue 25) ------------------------------------------------
PLAN_TYPES = {"Plan", "StructuredPlan"}


def _method_names() -> set[str]:
    from sls_deploy.core import vocabulary

    return set(vocabulary.FAMILY_OF)


def _plan_switches(tree: ast.AST) -> list[int]:
    """Lines of ``isinstance(x, Plan)`` / ``isinstance(x, (.., StructuredPlan))`` calls."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any((getattr(k, "id", None) or getattr(k, "attr", None)) in PLAN_TYPES for k in kinds):
                out.append(node.lineno)
    return out


def _method_comparisons(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing anything with a method-name string (``x == "sls"``, ``x in ("ssl", "hybrid")``)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(i, ast.Constant) and i.value in names for i in items):
                out.append(node.lineno)
                break
    return out


def _outside_pruning():
    return [p for p in PKG.rglob("*.py") if "pruning" not in p.relative_to(PKG).parts]


def test_the_structure_checks_find_switches():
    tree = ast.parse('isinstance(p, Plan)\nisinstance(p, (int, x.StructuredPlan))\nif m == "sls": pass\n'
                     'ok = m in ("ssl", "hybrid")\nfine = m in GROUP\nisinstance(p, dict)\n')
    assert _plan_switches(tree) == [1, 2]
    assert _method_comparisons(tree, _method_names()) == [3, 4]


def test_no_plan_type_switch_outside_pruning():
    bad = [f"{p.relative_to(PKG)}:{line}" for p in _outside_pruning() for line in _plan_switches(ast.parse(p.read_text()))]
    assert bad == []


def test_no_method_name_comparison_outside_pruning():
    names = _method_names()
    bad = [f"{p.relative_to(PKG)}:{line}" for p in _outside_pruning()
           for line in _method_comparisons(ast.parse(p.read_text()), names)]
    assert bad == []


def test_config_imports_nothing_from_pruning():
    graph = _graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("sls_deploy.config")
                 for d in deps if d.startswith("sls_deploy.pruning"))
    assert bad == []


def test_pruning_imports_no_higher_layer():
    """pruning/ sits below training, modalities and the stages: their services reach a strategy through its
    SearchContext."""
    graph = _graph()
    higher = ("sls_deploy.training", "sls_deploy.stages", "sls_deploy.modalities", "sls_deploy.adaptive",
              "sls_deploy.data", "sls_deploy.cli")
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("sls_deploy.pruning")
                 for d in deps if d.startswith(higher))
    assert bad == []


# --------------------------------------------------------------------------- modalities (issue 25)


def _references(path: Path, name: str) -> bool:
    """Does ``path`` define, import, call or otherwise name ``name`` (an identifier, an attribute, an import)?"""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == name or isinstance(node, ast.Attribute) and node.attr == name:
            return True
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(a.name.split(".")[-1] == name for a in node.names):
            return True
    return False


def _sub_package(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else ""


def _package_imports(package: str) -> set[str]:
    """The sub-packages the modules of ``sls_deploy.<package>`` import (functions' lazy imports included)."""
    graph = _graph()
    return {_sub_package(t) for m, targets in graph.items() if _sub_package(m) == package for t in targets}


def test_the_reference_finder_sees_every_use(tmp_path):
    for src in ("from x import is_video\n", "import m\nm.is_video('clip')\n", "def is_video(m):\n    return m\n",
                "f = is_video\n"):
        (tmp_path / "m.py").write_text(src)
        assert _references(tmp_path / "m.py", "is_video"), src
    (tmp_path / "m.py").write_text("video = 'is_video'\nis_video_x = 1\n")
    assert not _references(tmp_path / "m.py", "is_video")


def test_is_video_is_named_only_inside_the_modality_package():
    outside = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if "modalities" not in p.relative_to(PKG).parts and _references(p, "is_video")]
    assert outside == []


def test_config_imports_nothing_from_the_modalities():
    assert "modalities" not in _package_imports("config")


def test_the_modalities_import_neither_training_nor_the_stages():
    """The modalities sit below training and the stages (which use their samplers, losses and evaluation)."""
    assert not _package_imports("modalities") & {"training", "stages", "pruning", "onnx", "cli"}


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
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import)
                or isinstance(n, ast.ImportFrom) and n.module != "__future__"]


# -- layers: the sub-packages import each other one way only (issue 25) -----------------------------------------
def _package_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        src = _sub_package(mod) or mod
        out.setdefault(src, set()).update(d for d in (_sub_package(t) or t for t in deps) if d != src)
    return out


def test_the_sub_packages_form_layers_without_a_cycle():
    """core at the bottom, the CLI at the top: no sub-package reaches back into one that imports it (e.g. core ->
    onnx, or backends -> trt -> onnx -> backends, both removed)."""
    graph = _package_graph()
    graph.pop("sls_deploy", None)  # the package's __init__ (its version): imported by anyone, imports nothing
    graph = {k: v - {"sls_deploy"} for k, v in graph.items()}
    assert _cycles({k: v & set(graph) for k, v in graph.items()}) == []
    assert graph["core"] == set()  # the bottom layer imports no other sub-package
    assert _cycles({"core": {"onnx"}, "onnx": {"core"}}) == [["core", "onnx"]]  # what a reach-back would give
