"""The build pipeline end to end on a tiny EDSR: bundle contents, masks through export, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from sls_deploy.core import atomic
from sls_deploy.core.errors import BundleError, CheckpointError, PlanError, RecipeError, UsageError
from sls_deploy.onnx.export import graph_weights, reduction_last
from sls_deploy.stages.build import build_bundle
from sls_deploy.backends.loading import load_model
from sls_deploy.config.recipe import load_recipe
from sls_deploy.pruning.nm import Plan, nm_mask
from sls_deploy.backends.runtime import ort_infer


def _opts(weights: Path, budget: float = 0.4, logs: list | None = None, **kw) -> dict:
    kw.setdefault("method", "oneshot")  # these tests check masks derived from the base weights
    return dict(budget=budget, weights=str(weights), progress=False,
                log=(logs.append if logs is not None else (lambda s: None)), **kw)


@pytest.fixture
def built(tmp_path, tiny_recipe, tiny_weights):
    out = tmp_path / "bundle"
    rep = build_bundle(load_recipe(tiny_recipe), out, **_opts(tiny_weights))
    return out, rep, tiny_recipe, tiny_weights


def test_bundle_holds_every_artifact_with_recorded_hashes(built):
    out, rep, _, _ = built
    for name in ("manifest.json", "plan.json", "model.safetensors", "model.onnx", "report.json", "report.md",
                 "recipe.yaml", "report_layers.png", "report.html", "report_tradeoff.png", "report_crop.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    for name, sha in manifest["files"].items():
        assert atomic.sha256_file(out / name) == sha
    assert set(manifest["libraries"]) >= {"torch", "onnx", "onnxruntime", "polygraphy", "numpy"}
    assert not list(out.rglob("*.tmp"))


def test_report_fields_and_budget(built):
    out, rep, _, _ = built
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["budget"] == 0.4
    assert on_disk["macs"]["ratio"] <= 0.4
    assert on_disk["macs"]["pruned"] == pytest.approx(on_disk["macs"]["dense"] * on_disk["macs"]["ratio"])
    for key in ("bicubic", "dense", "pruned", "channel", "eval_images"):
        assert key in on_disk["psnr"]
    assert on_disk["psnr"]["eval_images"] == ["astronaut.png", "chelsea.png"]
    assert on_disk["onnx_vs_torch"]["max_abs"] <= 1e-4
    # the profile's min/opt/max, then the odd size, then the recipe's extra sizes
    assert [s["lr_hw"] for s in on_disk["onnx_vs_torch"]["sizes"]] == [[8, 8], [16, 24], [24, 32], [11, 7], [9, 13]]
    plan = Plan.load(out / "plan.json")
    assert [l["name"] for l in on_disk["layers"]] == [l.name for l in plan.layers]
    for l in on_disk["layers"]:
        assert {"name", "n", "m", "macs_dense", "macs_pruned"} <= set(l)


def test_plan_keeps_first_and_last_conv_dense(built):
    out, _, _, _ = built
    plan = Plan.load(out / "plan.json")
    names = [l.name for l in plan.layers]
    assert "conv_first" not in names and "conv_last" not in names
    assert {d.name for d in plan.dense_layers} == {"conv_first", "conv_last"}
    assert "upsample.0" in names and "body.0.conv1" in names
    # the one-shot planner is uniform: with 0.4 and M=4 only N=1 fits
    assert {l.n for l in plan.layers} == {1}


def test_masks_survive_finetune_and_export(built):
    out, _, tiny_recipe, tiny_weights = built
    recipe = load_recipe(tiny_recipe)
    plan = Plan.load(out / "plan.json")
    base = load_model(recipe, tiny_weights)
    tuned = load_file(str(out / "model.safetensors"))
    base_modules = dict(base.named_modules())
    graph = {w.tensor: w for w in graph_weights(onnx.load(str(out / "model.onnx")))}
    for layer in plan.layers:
        mask = nm_mask(base_modules[layer.name].weight, layer.n, layer.m)
        w = tuned[f"{layer.name}.weight"]
        assert torch.all(w[~mask] == 0), layer.name  # pruned entries exactly zero
        assert torch.all(w[mask] != 0), layer.name  # and the kept ones really kept
        # the graph holds the same weights: exactly N non-zeros in every group of M input channels
        arr = reduction_last(graph[f"{layer.name}.weight"])
        groups = np.moveaxis(arr, 1, -1).reshape(-1, layer.m)
        assert np.all((groups != 0).sum(-1) == layer.n), layer.name
        np.testing.assert_array_equal(arr, w.numpy())


def test_onnx_runs_at_two_sizes_and_matches_torch(built):
    out, _, tiny_recipe, _ = built
    recipe = load_recipe(tiny_recipe)
    model = load_model(recipe, out / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    with ort_infer(out / "model.onnx") as run:
        for n, h, w in [(1, 12, 12), (2, 7, 19)]:
            x = torch.rand(n, 3, h, w, generator=g)
            got = run(x)
            assert got.shape == (n, 3, 4 * h, 4 * w)
            with torch.no_grad():
                np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=0)


def test_rerun_skips_finished_stages_and_changes_nothing(built):
    out, _, tiny_recipe, tiny_weights = built
    before = {p.name: atomic.sha256_file(p) for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    logs: list[str] = []
    build_bundle(load_recipe(tiny_recipe), out, **_opts(tiny_weights, logs=logs))
    assert sum("up to date" in line for line in logs) == 4
    after = {p.name: atomic.sha256_file(p) for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert before == after


def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, tiny_recipe, tiny_weights, monkeypatch):
    recipe = load_recipe(tiny_recipe)
    reference = tmp_path / "uninterrupted"
    build_bundle(recipe, reference, **_opts(tiny_weights))

    from sls_deploy.data.patches import PatchSampler

    real_batch, calls = PatchSampler.batch, {"n": 0}

    def flaky_batch(self):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C during the 4th finetune step
            raise KeyboardInterrupt
        return real_batch(self)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(PatchSampler, "batch", flaky_batch)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(recipe, out, **_opts(tiny_weights))
    assert (out / "work" / "finetune.ckpt").is_file()
    assert not (out / "model.safetensors").exists()  # no half-written final artifact
    assert not list(out.rglob("*.tmp"))

    monkeypatch.setattr(PatchSampler, "batch", real_batch)
    logs: list[str] = []
    build_bundle(recipe, out, **_opts(tiny_weights, logs=logs))
    assert any("resuming finetune from step 3/4" in line for line in logs)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert not (out / "work" / "finetune.ckpt").exists()


def test_output_folder_of_another_build_is_refused(built):
    out, _, tiny_recipe, tiny_weights = built
    before = atomic.sha256_file(out / "model.safetensors")
    with pytest.raises(BundleError, match="holds another bundle"):
        build_bundle(load_recipe(tiny_recipe), out, **_opts(tiny_weights, budget=0.6))
    assert atomic.sha256_file(out / "model.safetensors") == before


def test_non_bundle_folder_is_refused(tmp_path, tiny_recipe, tiny_weights):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        build_bundle(load_recipe(tiny_recipe), out, **_opts(tiny_weights))
    assert (out / "notes.txt").read_text() == "mine"


def test_unreachable_budget_names_smallest_reachable(tmp_path, tiny_recipe, tiny_weights):
    import re

    from sls_deploy.pruning.nm.search import plan_uniform, split_layers

    def make_plan(recipe, model, budget, method, m):
        return plan_uniform(recipe, split_layers(recipe, model, m), budget, m, method)

    recipe = load_recipe(tiny_recipe)
    with pytest.raises(PlanError, match=r"smallest reachable budget is 0\.\d{4}") as info:
        build_bundle(recipe, tmp_path / "b", **_opts(tiny_weights, budget=0.1))
    floor = float(re.search(r"reachable budget is (0\.\d+)", str(info.value)).group(1))
    assert 0.1 < floor < 1
    model = load_model(recipe, tiny_weights)
    plan = make_plan(recipe, model, floor + 1e-3, "oneshot", 4)  # just above the floor: N=1 everywhere
    assert {l.n for l in plan.layers} == {1} and plan.ratio == pytest.approx(floor, abs=1e-4)
    with pytest.raises(PlanError):
        make_plan(recipe, model, floor - 1e-3, "oneshot", 4)


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2])
def test_budget_out_of_range(tmp_path, tiny_recipe, tiny_weights, budget):
    with pytest.raises(UsageError):
        build_bundle(load_recipe(tiny_recipe), tmp_path / "b", **_opts(tiny_weights, budget=budget))
    assert not (tmp_path / "b").exists()


def test_corrupt_base_weights(tmp_path, tiny_recipe):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        build_bundle(load_recipe(tiny_recipe), tmp_path / "b", **_opts(bad))


def test_tampered_file_is_detected(built):
    from sls_deploy.stages.build import reopen
    from sls_deploy.stages.validate import run_validate

    out, _, _, _ = built
    data = bytearray((out / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    run = reopen(out, lambda s: None)
    with pytest.raises(BundleError, match="sha256"):
        run_validate(run)


def test_the_default_dynamo_exporter_gives_graphs_that_pass_every_export_check(tmp_path, tiny_images, capsys):
    """The default exporter (no export section: dynamo, torch.export-based, opset 18): the FP32/FP16/INT8 graphs
    pass every check (2:4 patterns survive, ONNX Runtime == PyTorch at several sizes), and the graph is dynamo's
    (its nodes carry torch.export's metadata, which the TorchScript exporter does not write)."""
    from conftest import write_tiny_recipe, write_tiny_weights

    from sls_deploy.cli import main

    recipe = write_tiny_recipe(tmp_path, tiny_images, export={})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code = main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.9", "--method",
                 "oneshot", "--n", "2", "--out", str(out), "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads(captured.out)
    assert rep["onnx_vs_torch"]["passed"] and {s["lr_hw"][0] for s in rep["onnx_vs_torch"]["sizes"]} > {8}
    export = json.loads((out / "manifest.json").read_text())["stages"]["export"]["result"]
    assert export["opset"] == 18 and export["exporter"] == "dynamo"
    assert export["layers_2to4"] == export["layers_nm"] > 0
    assert set(export["graphs"]) == {"fp32", "fp16", "int8"}
    graph = onnx.load(str(out / "model.onnx"))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert any(p.key.startswith("pkg.torch.onnx") for n in graph.graph.node for p in n.metadata_props)
    # no stack trace, so no path of the exporting checkout, in any graph: the same model gives the same bytes
    import sls_deploy
    from sls_deploy.onnx.export import STACK_TRACE

    source = str(Path(sls_deploy.__file__).resolve().parent).encode()
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        g = onnx.load(str(out / name))
        assert not any(p.key == STACK_TRACE for n in g.graph.node for p in n.metadata_props), name
        assert source not in (out / name).read_bytes(), name
    (tmp_path / "bad").mkdir()
    bad = write_tiny_recipe(tmp_path / "bad", tiny_images, export={"opset": 17, "exporter": "dynamo"})
    assert main(["search", "--recipe", str(bad), "--budget", "0.9", "--out", str(tmp_path / "c")]) == 1
    assert "set export.opset: 18" in capsys.readouterr().err


def test_the_exporter_a_recipe_gets(tmp_path, tiny_images):
    """No export section: dynamo at opset 18. Opset 17 without an exporter (recipes and bundles from before dynamo
    became the default): TorchScript, the exporter that writes it. TorchScript stays a choice at any opset."""
    from conftest import write_tiny_recipe

    def got(export):
        r = load_recipe(write_tiny_recipe(tmp_path, tiny_images, export=export))
        return r.exporter, r.opset

    assert got({}) == ("dynamo", 18)
    assert got({"opset": 19}) == ("dynamo", 19)
    assert got({"opset": 17}) == ("torchscript", 17)
    assert got({"opset": 18, "exporter": "torchscript"}) == ("torchscript", 18)
    with pytest.raises(RecipeError, match="must be dynamo or torchscript, not 'jit'"):
        got({"exporter": "jit"})


def test_strip_stack_traces_reaches_subgraphs_and_keeps_other_metadata():
    from onnx import helper

    from sls_deploy.onnx.export import STACK_TRACE, strip_stack_traces

    def traced(node):
        node.metadata_props.add(key=STACK_TRACE, value='File "/home/me/src/model.py", line 1')
        node.metadata_props.add(key="namespace", value="m/relu")
        return node

    then = helper.make_graph([traced(helper.make_node("Relu", ["x"], ["t"]))], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1])])
    top = traced(helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other))
    model = helper.make_model(helper.make_graph(
        [top], "g", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                     helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    assert strip_stack_traces(model) == 2
    branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    nodes = [model.graph.node[0], branch.node[0]]
    assert all([(p.key, p.value) for p in n.metadata_props] == [("namespace", "m/relu")] for n in nodes)
    assert b"/home/me" not in model.SerializeToString()
    assert strip_stack_traces(model) == 0
