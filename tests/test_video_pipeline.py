"""The video build (BasicVSR / StreamVSR, channel pruning) on tiny models and synthetic clips: slicing a channel
group equals zeroing it, end-to-end builds (clip and step graph, l1 and ssl), resume, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import onnx
import pytest
import torch
import yaml
from safetensors.torch import save_file

from sls_deploy.cli import CHANNEL_METHODS, NM_METHODS, main
from sls_deploy.core.errors import RecipeError, UsageError
from sls_deploy.models import get_adapter
from sls_deploy.config.recipe import load_recipe
from sls_deploy.pruning import registry
from sls_deploy.pruning.channels.slicing import slice_into, zero_units
from sls_deploy.stages.build import build_bundle
from sls_deploy.stages.export import op_types
from sls_deploy.backends.loading import load_model as load_video_model
from sls_deploy.backends.drive import clip_infer
from sls_deploy.backends.runtime import onnx_runner
from conftest import CHECKOUT, error_line, run_cli as run

torch.set_num_threads(1)  # the tests' models are tiny; more threads only contend

ARCHS = ("basicvsr", "streamvsr")


# --------------------------------------------------------------------------- synthetic clips and recipes


def frames(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """A smooth pattern drifting 2 px per frame with a moving bright box, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 6, 3)
    out = []
    for t in range(n):
        img = np.stack([127 + 100 * np.sin(0.2 * (xx + 2 * t) + 0.1 * yy + phase[c]) for c in range(3)], -1)
        img[6 + t:14 + t, 8 + t:18 + t] = 240
        out.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    return out


def write_clip(folder: Path, imgs: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(imgs):
        iio.imwrite(folder / f"{i:04d}.png", f)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    write_clip(root / "train" / "a", frames(5, 32, 32, 1))
    write_clip(root / "train" / "b", frames(4, 36, 40, 2))
    write_clip(root / "eval" / "e", frames(4, 32, 40, 3))
    return {"train": root / "train", "eval": root / "eval"}


def write_recipe(folder: Path, arch: str, clips: dict[str, Path], **sections) -> Path:
    r = {"name": f"{arch}-tiny", "model": {"arch": arch, "scale": 4, "num_feat": 8, "num_block": 1, "clip_len": 3},
         "reference_output": [128, 128],
         "data": {"train": str(clips["train"]), "eval": str(clips["eval"]), "metric_channel": "y"},
         # 3 steps: ssl's 2 scale-learning steps leave finetuning 1 (the search takes at most 3/4 of them)
         "finetune": {"steps": 3, "lr": 1e-3, "batch_size": 1, "lr_patch": 8, "checkpoint_every": 1},
         # random weights are below bicubic: the quality gate is reported, not enforced (test_quality_gate.py is)
         "validate": {"latency_warmup": 0, "latency_runs": 1, "max_drop_vs_dense_db": None,
                      "min_gain_vs_baseline_db": None},
         "structured": {"round_to": 2, "ssl_steps": 2, "delta": 1e-3, "grow_every": 1},
         # TorchScript for speed (a tiny video graph: seconds, vs minutes through dynamo); export={} is the
         # default (dynamo), which test_streamvsr_with_rsc_through_the_default_dynamo_exporter and
         # test_basicvsr.py's clip graph test cover
         "export": {"opset": 17, "exporter": "torchscript"}, **sections}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def with_flow(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh SpyNet predicts zero flow; give it a few pixels of non-uniform flow so warping is exercised."""
    with torch.no_grad():
        for level in model.spynet.basic_module:
            last = level.basic_module[8]
            last.weight.normal_(0.0, 0.02)
            last.bias.copy_(torch.tensor([0.05, -0.04]))
    return model


def write_weights(recipe: Path, dest: Path, seed: int = 0, **model_opts) -> Path:
    r = load_recipe(recipe)
    torch.manual_seed(seed)
    cfg = r.model if not model_opts else r.adapter.parse_config({**r.raw["model"], **model_opts})
    model = with_flow(r.adapter.build(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest))
    return dest


# --------------------------------------------------------------------------- slicing a group == zeroing it


def tiny(arch: str, seed: int = 0):
    adapter = get_adapter(arch)
    cfg = adapter.parse_config({"arch": arch, "num_feat": 8, "num_block": 1, "clip_len": 3})
    torch.manual_seed(seed)
    return adapter, cfg, with_flow(adapter.build(cfg)).eval()


CLIP = torch.rand(1, 3, 3, 20, 24, generator=torch.Generator().manual_seed(5))
GROUP_KINDS = [("basicvsr", "backward_trunk.main.2.0.conv1"), ("basicvsr", "forward_trunk.main.2.0.conv1"),
               ("basicvsr", "fusion"), ("basicvsr", "upconv1"), ("basicvsr", "upconv2"), ("basicvsr", "conv_hr"),
               ("streamvsr", "forward_trunk.main.2.0.conv1"), ("streamvsr", "upconv1"), ("streamvsr", "upconv2"),
               ("streamvsr", "conv_hr")]


@pytest.mark.parametrize("arch, group", GROUP_KINDS)
def test_zeroed_units_sliced_away_give_the_same_output(arch, group):
    adapter, cfg, dense = tiny(arch)
    groups = adapter.channel_groups(dense)
    g = next(x for x in groups if x.name == group)
    units = dense.widths[group]
    keep = torch.tensor([i for i in range(units) if i % 3 != 1])  # drop every third unit, the first kept
    zero_units(dense, g, torch.tensor([i for i in range(units) if i % 3 == 1]))
    sliced = adapter.build(model_config_of(cfg, {group: len(keep)})).eval()
    slice_into(dense, sliced, groups, {group: keep})
    with torch.no_grad():
        want, got = dense(CLIP), sliced(CLIP)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    producer = dict(sliced.named_modules())[g.producer]
    assert producer.out_channels == g.unit * len(keep) < g.unit * units  # really narrower
    if arch == "streamvsr":  # the step (the exported graph) too, with its hidden state
        h = torch.rand(1, 8, 20, 24, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            (s1, h1), (s2, h2) = dense.step(CLIP[:, 0], CLIP[:, 1], h), sliced.step(CLIP[:, 0], CLIP[:, 1], h)
        assert (s1 - s2).abs().max() <= 1e-5 and (h1 - h2).abs().max() <= 1e-5


def model_config_of(cfg, widths):
    from dataclasses import replace

    return replace(cfg, options={**cfg.options, "widths": widths})


@pytest.mark.parametrize("arch", ARCHS)
def test_slicing_single_channels_inside_a_pixel_shuffle_unit_does_not_match(arch):
    """upconv2 feeds PixelShuffle(2): post-shuffle channel k is conv channels 4k..4k+3. Removing four channels
    that straddle two units (1..4) and input channel 0 of conv_hr is not the model with those channels zeroed;
    removing the whole unit 0 (channels 0..3) is."""
    adapter, cfg, dense = tiny(arch)
    up = dense.upconv2
    outs = {}
    for name, chans in (("unit", [0, 1, 2, 3]), ("straddling", [1, 2, 3, 4])):
        zeroed = tiny(arch)[2]
        with torch.no_grad():
            for conv in (zeroed.conv_hr, zeroed.conv_last):  # a louder head (fresh convs are scaled down)
                conv.weight.mul_(5.0)
            zeroed.upconv2.weight[chans] = 0
            zeroed.upconv2.bias[chans] = 0
        sliced = adapter.build(model_config_of(cfg, {"upconv2": dense.widths["upconv2"] - 1})).eval()
        sd = zeroed.state_dict()
        rows = torch.tensor([c for c in range(up.out_channels) if c not in chans])
        sd["upconv2.weight"], sd["upconv2.bias"] = sd["upconv2.weight"][rows], sd["upconv2.bias"][rows]
        sd["conv_hr.weight"] = sd["conv_hr.weight"][:, 1:]
        sliced.load_state_dict(sd)
        with torch.no_grad():
            outs[name] = float((sliced(CLIP) - zeroed(CLIP)).abs().max())
    assert outs["unit"] <= 1e-5
    assert outs["straddling"] > 1e-3


# --------------------------------------------------------------------------- end-to-end builds


@pytest.fixture(scope="module")
def bv_l1(tmp_path_factory, clips):
    """basicvsr, l1, budget 0.5, through the command line."""
    root = tmp_path_factory.mktemp("bv")
    recipe = write_recipe(root, "basicvsr", clips)
    weights = write_weights(recipe, root / "w.safetensors")
    out = root / "bundle"
    code = main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.5", "--method", "l1",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return {"recipe": recipe, "weights": weights, "out": out}


@pytest.fixture(scope="module")
def sv_ssl(tmp_path_factory, clips):
    """streamvsr, ssl (the recipe's default method), budget 0.5, through the Python API."""
    root = tmp_path_factory.mktemp("sv")
    recipe = write_recipe(root, "streamvsr", clips)
    weights = write_weights(recipe, root / "w.safetensors")
    out = root / "bundle"
    logs: list[str] = []
    rep = build_bundle(load_recipe(recipe), out, budget=0.5, weights=str(weights), progress=False, log=logs.append)
    return {"recipe": recipe, "weights": weights, "out": out, "rep": rep, "logs": logs}


BUNDLE_FILES = ("manifest.json", "recipe.yaml", "plan.json", "search.safetensors", "model.safetensors", "model.onnx",
                "report.json", "report.md", "report.html", "report_widths.png", "report_frames.png",
                "report_drift.png")


@pytest.mark.parametrize("which", ["bv_l1", "sv_ssl"])
def test_bundle_plan_and_report(request, which):
    b = request.getfixturevalue(which)
    out = b["out"]
    for name in BUNDLE_FILES:
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp")) and not (out / "work" / "finetune.ckpt").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "structured" and plan["budget"] == 0.5
    assert plan["method"] == ("l1" if which == "bv_l1" else "ssl")
    assert 0 < plan["macs"]["ratio"] <= 0.5
    d = json.loads((out / "report.json").read_text())["drift"]  # the whole first eval clip, every frame scored
    assert d["frames"] == len(d["gap"]) == len(d["psnr_dense"]) == 4  # the eval clip has 4 frames
    assert d["gap"] == pytest.approx([a - b for a, b in zip(d["psnr_dense"], d["psnr_pruned"])])
    assert "drift over" in (out / "report.md").read_text()
    assert plan["macs"]["pruned"] == sum(l["macs_pruned"] for l in plan["layers"]) + sum(
        d["macs"] for d in plan["dense_layers"])
    assert any(d["name"].startswith("spynet.") and "SpyNet" in d["reason"] for d in plan["dense_layers"])
    for g in plan["groups"]:
        assert g["kept_units"] == g["dense_units"] or g["kept_units"] % plan["round_to"] == 0, g
        assert g["kept"] == sorted(set(g["kept"])) and len(g["kept"]) == g["kept_units"]
        assert plan["widths"][g["name"]] == g["kept_units"]
    assert any(g["kept_units"] < g["dense_units"] for g in plan["groups"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "video" and rep["checks"] == {"onnx_vs_torch": True, "budget": True,
                                                     "fp16_psnr_drop": True, "int8_psnr_drop": True,
                                                     "quality_gate": True}  # reported, no limits (random weights)
    assert [r["name"] for r in rep["quality_gate"]["rows"]] == ["pruned", "fp32 graph", "fp16 graph", "int8 graph"]
    assert rep["onnx_vs_torch"]["max_abs"] <= 1e-4 and rep["onnx_vs_torch"]["frames"] == 3
    # the whole eval clip (4 frames): the step graph carries its hidden state through all of them, the T=3 clip
    # graph covers the one whole window
    whole = rep["onnx_vs_torch"]["whole_clip"]
    assert whole["clip"] == "e" and whole["frames"] == (3 if which == "bv_l1" else 4) and whole["max_abs"] <= 1e-4
    for k in ("bicubic", "dense", "pruned"):
        assert len(rep["psnr"]["per_frame_mean"][k]) == 3
        assert all(np.isfinite(rep["psnr"]["per_frame_mean"][k]))
        assert len(rep["psnr"]["per_clip"]["e"][k]) == 3
    lat = rep["latency"]["sizes"][0]
    assert lat["lr_hw"] == [32, 32] and lat["ratio_pruned_over_dense"] > 0 and rep["latency"]["threads"] >= 1
    md = (out / "report.md").read_text()
    assert "Channel groups" in md and "Per frame" in md and "upconv2" in md
    assert "<table>" in (out / "report.html").read_text()


def test_ssl_search_learned_scales(sv_ssl):
    plan = json.loads((sv_ssl["out"] / "plan.json").read_text())
    s = plan["search"]
    assert s["ssl_steps"] == 2 and sum(s["marked_units"].values()) > 0
    marked = s["marked_units"]
    assert all(0 < v <= 1e-2 for k, v in s["final_reg"].items() if marked[k])  # the penalty grew where it acts
    assert all(v == 0 for k, v in s["final_reg"].items() if not marked[k])
    assert any(l.startswith("[1/4] search") for l in sv_ssl["logs"])
    assert any(l.startswith("[4/4] validate") for l in sv_ssl["logs"])
    assert any("plan: ssl" in l and "per frame" in l for l in sv_ssl["logs"])


def eval_lr_clip(clips, frames_n: int) -> torch.Tensor:
    from sls_deploy.data.video import load_clip_pair, resolve_clips

    _, lr = load_clip_pair(resolve_clips(str(clips["eval"]))[0], frames_n, 4)
    return lr


def test_clip_graph_matches_pytorch_over_a_clip(bv_l1, clips):
    recipe = load_recipe(bv_l1["recipe"])
    plan = json.loads((bv_l1["out"] / "plan.json").read_text())
    model = load_video_model(recipe, bv_l1["out"] / "model.safetensors", plan["widths"])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bv_l1["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["lr"] and [o.name for o in sess.get_outputs()] == ["sr"]
    lr = eval_lr_clip(clips, 3)
    with torch.no_grad():
        want = model(lr).numpy()
    with onnx_runner(bv_l1["out"] / "model.onnx") as runner:  # the runner interface TensorRT's path uses too
        got = clip_infer(runner, recipe.adapter.export_spec(recipe.model))(lr)
    assert got.shape == want.shape == (1, 3, 3, 32, 40)
    assert np.abs(got - want).max() <= 1e-4


def test_step_graph_matches_pytorch_frame_by_frame(sv_ssl, clips):
    """The step graph driven over more frames than clip_len, hidden_out fed back as hidden."""
    recipe = load_recipe(sv_ssl["recipe"])
    plan = json.loads((sv_ssl["out"] / "plan.json").read_text())
    model = load_video_model(recipe, sv_ssl["out"] / "model.safetensors", plan["widths"])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(sv_ssl["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["prev_lr", "lr", "hidden"]
    assert [o.name for o in sess.get_outputs()] == ["sr", "hidden_out"]
    lr = eval_lr_clip(clips, 4)
    with torch.no_grad():
        want = model(lr).numpy()
    with onnx_runner(sv_ssl["out"] / "model.onnx") as runner:
        got = clip_infer(runner, recipe.adapter.export_spec(recipe.model))(lr)
    assert got.shape == want.shape == (1, 4, 3, 32, 40)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("which", ["bv_l1", "sv_ssl"])
def test_pruned_graph_has_narrower_plain_convs_and_the_dense_ops(request, which):
    from sls_deploy.onnx.export import graph_weights

    out = request.getfixturevalue(which)["out"]
    pruned, dense = onnx.load(str(out / "model.onnx")), onnx.load(str(out / "work" / "dense.onnx"))
    plan = json.loads((out / "plan.json").read_text())
    rsc = [g for g in plan["groups"] if g.get("index") and g["kept_units"] < g["dense_units"]]
    ops, dense_ops = op_types(pruned), op_types(dense)
    if not rsc:
        assert ops == dense_ops  # no Gather/Scatter/Slice added by pruning
    else:  # Residual Sparsity Connections: Gather (read) and a scatter (index add: ScatterElements from the
        # TorchScript exporter, ScatterND from dynamo's) per narrowed group
        from sls_deploy.stages.export import RSC_OPS, SCATTER_OPS

        extra = {k for k in set(ops) | set(dense_ops) if ops.get(k, 0) != dense_ops.get(k, 0)}
        assert extra <= RSC_OPS | {"Add"}
        reads = sum(1 for g in rsc if not g["producers"])
        assert ops.get("Gather", 0) - dense_ops.get("Gather", 0) >= reads
        assert sum(ops.get(k, 0) - dense_ops.get(k, 0) for k in SCATTER_OPS) >= len(rsc) - reads
    pw = {w.tensor: w.shape for w in graph_weights(pruned) if w.op == "Conv"}
    dw = {w.tensor: w.shape for w in graph_weights(dense) if w.op == "Conv"}
    assert pw["upconv2.weight"][0] < dw["upconv2.weight"][0] or pw["upconv1.weight"][0] < dw["upconv1.weight"][0]
    smaller = [k for k in pw if k in dw and np.prod(pw[k]) < np.prod(dw[k])]
    assert "conv_hr.weight" in smaller or "conv_last.weight" in smaller
    assert sum(np.prod(s) for s in pw.values()) < sum(np.prod(dw[k]) for k in pw)
    info = json.loads((out / "manifest.json").read_text())["stages"]["export"]["result"]
    assert info["graph"] == ("clip" if which == "bv_l1" else "step") and info["opset"] >= 17
    assert info["narrower_convs"] > 0


def test_second_build_is_up_to_date_and_digests_rerun_only_what_changed(capsys, bv_l1):
    args = ["build", "--recipe", bv_l1["recipe"], "--weights", bv_l1["weights"], "--budget", "0.5", "--method", "l1",
            "--out", bv_l1["out"], "--no-progress"]
    code, out, err = run(capsys, *args)
    assert code == 0 and err.count("up to date") == 4, err
    assert "verdict" in out
    code, _, err = run(capsys, *args, "--temporal-weight", "0")  # finetune loss changed: search stays
    assert code == 0
    stages = err.split("[2/4]")
    assert "up to date" in stages[0] and "up to date" not in stages[1].split("[3/4]")[0], err


def test_stage_commands_on_a_video_bundle(capsys, bv_l1):
    out = bv_l1["out"]
    code, stdout, err = run(capsys, "export", out)
    assert code == 0 and "up to date" in err and "clip graph" in stdout
    code, stdout, _ = run(capsys, "validate", out, "--no-latency", "--threads", "1")
    assert code == 0 and "verdict" in stdout and "pass" in stdout
    assert json.loads((out / "report.json").read_text())["latency"] == {"skipped": "--no-latency"}
    code, _, err = run(capsys, "validate", out, "--backend", "torch")
    assert code == 2 and "not available for video bundles" in error_line(err)
    code, stdout, _ = run(capsys, "export", out, "--precision", "fp16")  # video graphs get precisions too
    assert code == 0 and "FP16 clip graph" in stdout and (out / "model.fp16.onnx").is_file()
    code, _, err = run(capsys, "build", "--recipe", bv_l1["recipe"], "--budget", "0.5", "--method", "l1",
                       "--m", "4", "--out", out.parent / "other")
    assert code == 2 and "--m does not apply to --method l1" in error_line(err)
    assert not (out.parent / "other").exists()


def test_interrupted_finetune_resumes_from_its_checkpoint(tmp_path, clips, monkeypatch):
    from sls_deploy.data.video import ClipSampler

    recipe = write_recipe(tmp_path, "basicvsr", clips, finetune={
        "steps": 3, "lr": 1e-3, "batch_size": 1, "lr_patch": 8, "checkpoint_every": 1})
    weights = write_weights(recipe, tmp_path / "w.safetensors")
    out, calls, batch = tmp_path / "b", [], ClipSampler.batch

    def interrupted_at_second_batch(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return batch(self)

    opts = lambda logs: dict(budget=0.5, method="l1", weights=str(weights), progress=False,  # noqa: E731
                              log=logs.append)
    monkeypatch.setattr(ClipSampler, "batch", interrupted_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(load_recipe(recipe), out, **opts([]))
    assert (out / "work" / "finetune.ckpt").is_file() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(ClipSampler, "batch", batch)
    logs: list[str] = []
    build_bundle(load_recipe(recipe), out, **opts(logs))
    assert "  resuming finetune from step 1/3" in logs
    result = json.loads((out / "manifest.json").read_text())["stages"]["finetune"]["result"]
    assert result["resumed_from"] == 1 and result["steps"] == 3
    assert not (out / "work" / "finetune.ckpt").exists()


# --------------------------------------------------------------------------- refusals


def test_methods_agree():
    strategies = registry.STRATEGIES
    assert {n for n, s in strategies.items() if s.user_method} == set(NM_METHODS + CHANNEL_METHODS)
    assert all(strategies[n].family == "nm" for n in NM_METHODS)
    assert all(strategies[n].family == "channels" for n in CHANNEL_METHODS)


@pytest.mark.parametrize("budget", ["0", "1.5"])
def test_budget_out_of_range_is_usage_error(capsys, tmp_path, clips, budget):
    recipe = write_recipe(tmp_path, "basicvsr", clips)
    code, _, err = run(capsys, "build", "--recipe", recipe, "--budget", budget, "--out", tmp_path / "b")
    assert code == 2 and "0<x<=1" in error_line(err)
    with pytest.raises(UsageError, match="budget"):
        build_bundle(load_recipe(recipe), tmp_path / "b", budget=float(budget), log=lambda s: None)
    assert not (tmp_path / "b").exists()


def test_unreachable_budget_is_one_line_usage_error_and_leaves_no_folder(capsys, tmp_path, clips):
    recipe = write_recipe(tmp_path, "basicvsr", clips)
    weights = write_weights(recipe, tmp_path / "w.safetensors")
    code, _, err = run(capsys, "build", "--recipe", recipe, "--weights", weights, "--budget", "0.05", "--method", "l1",
                       "--out", tmp_path / "b", "--no-progress")
    assert code == 2 and "smallest reachable ratio" in error_line(err) and not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--n", "2"], "--n does not apply to --method ssl"), (["--m", "8"], "--m does not apply to --method ssl"),
    (["--method", "oneshot", "--round-to", "8"], "--round-to does not apply to --method oneshot"),
    (["--method", "l1", "--lam", "1e-9"], "--lam does not apply to --method l1")])
def test_options_of_the_other_strategy_are_usage_errors(capsys, tmp_path, clips, extra, fragment):
    recipe = write_recipe(tmp_path, "streamvsr", clips)
    code, _, err = run(capsys, "build", "--recipe", recipe, "--budget", "0.5", "--out", tmp_path / "b", *extra)
    assert code == 2 and fragment in error_line(err)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "l1"], "--method l1 prunes channel groups, and recipe 'edsr"), (["--method", "sls", "--round-to", "4"], "--round-to does not apply"),
    (["--method", "sls", "--temporal-weight", "0"], "--frame-diff-weight does not apply")])
def test_video_options_on_an_image_recipe_are_usage_errors(capsys, tmp_path, monkeypatch, extra, fragment):
    # EDSR declares channel groups now: stand in a model that declares none for the "--method l1" case
    from sls_deploy.models.edsr import EDSRAdapter
    monkeypatch.setattr(EDSRAdapter, "channel_groups", lambda self, model: [])
    code, _, err = run(capsys, "build", "--model", "edsr", "--budget", "0.5", "--out", tmp_path / "b", *extra)
    assert code == 2 and fragment in error_line(err)


def test_checkpoint_of_another_width_is_checkpoint_error(capsys, tmp_path, clips):
    recipe = write_recipe(tmp_path, "basicvsr", clips)
    wide = write_weights(recipe, tmp_path / "wide.safetensors", num_feat=12)
    code, _, err = run(capsys, "build", "--recipe", recipe, "--weights", wide, "--budget", "0.5", "--method", "l1",
                       "--out", tmp_path / "b", "--no-progress")
    assert code == 1
    line = error_line(err)
    assert "checkpoint does not fit" in line and "has shape" in line


def bad_clip_folder(root: Path, kind: str) -> Path:
    data = root / f"bad_{kind}"
    if kind == "sizes":
        imgs = frames(4, 32, 32, 0)
        imgs[2] = frames(1, 36, 32, 1)[0]
        write_clip(data / "c", imgs)
    elif kind == "short":
        write_clip(data / "c", frames(2, 32, 32, 0))  # clip_len is 3
    else:
        data.mkdir()
        (data / "c.mp4").write_bytes(b"this is not a video\n" * 20)
    return data


@pytest.mark.parametrize("kind, fragment", [("sizes", "frame 0002.png is 32x36 but 0000.png is 32x32"),
                                            ("short", "has 2 frames; 3 are needed"),
                                            ("notvideo", "cannot read video")])
def test_bad_clip_folders_are_one_line_data_errors(capsys, tmp_path, clips, kind, fragment):
    recipe = write_recipe(tmp_path, "basicvsr", clips)
    weights = write_weights(recipe, tmp_path / "w.safetensors")
    data = bad_clip_folder(tmp_path, kind)
    code, _, err = run(capsys, "build", "--recipe", recipe, "--weights", weights, "--budget", "0.5", "--method", "l1",
                       "--data", data, "--out", tmp_path / "b", "--no-progress")
    assert code == 1 and fragment in error_line(err)


def test_structured_recipe_section_is_checked(tmp_path, clips):
    for section, fragment in (({"methd": "l1"}, "unknown recipe key 'structured.methd'"),
                              ({"method": "magic"}, "structured.method must be one of"),
                              ({"round_to": 0}, "structured.round_to must be in 1..10000000, not 0"),
                              ({"align": float("nan")}, "structured.align must be a finite number"),
                              ({"reg": 1.0, "cap": 0.1}, "reg <= cap"),
                              ({"hybrid_2to4": True}, "not implemented")):
        path = write_recipe(tmp_path / fragment[:8].replace(" ", "_"), "basicvsr", clips, structured=section)
        with pytest.raises(RecipeError, match=fragment.replace("(", r"\(")):
            load_recipe(path)
    assert load_recipe(CHECKOUT / "recipes" / "edsr.yaml").structured.method == "ssl"  # image recipes: defaults, unused


def test_nm_strategy_on_a_clip_model_gives_2to4_video_graphs(tmp_path, clips):
    """Strategy and modality are independent: uniform 2:4 on BasicVSR's prunable convs, every graph keeps it."""
    from sls_deploy.onnx.export import verify_plan_in_graph
    from sls_deploy.pruning.nm import Plan

    recipe = write_recipe(tmp_path, "basicvsr", clips)
    weights = write_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    rep = build_bundle(load_recipe(recipe), out, budget=1.0, method="oneshot", n=2, target="none", weights=str(weights),
                       progress=False, log=lambda s: None)
    plan = Plan.load(out / "plan.json")
    assert plan.layers and all(l.n == 2 and l.m == 4 and l.sparse_2to4 for l in plan.layers)
    assert not any(l.name.startswith("spynet") for l in plan.layers)  # SpyNet stays dense
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        checks = verify_plan_in_graph(onnx.load(str(out / name)), [(l.name, l.n, l.m) for l in plan.layers])
        assert all(c["2to4"] for c in checks.values()), name
    assert rep["kind"] == "video" and rep["onnx_vs_torch"]["passed"]


def test_video_reduced_precision_graphs_are_checked_against_their_limits(bv_l1):
    """validate runs model.fp16.onnx / model.int8.onnx over the eval clips; a drop above the recipe's limit fails."""
    import copy

    from sls_deploy.core.errors import ValidationError
    from sls_deploy.stages.validate import check_report

    rep = json.loads((bv_l1["out"] / "report.json").read_text())
    assert set(rep["precisions"]) == {"fp16", "int8"}
    for p, v in rep["precisions"].items():
        assert v["passed"] and v["drop_db"] <= v["limit_db"] and rep["checks"][f"{p}_psnr_drop"]
    bad = copy.deepcopy(rep)
    bad["precisions"]["int8"].update(drop_db=0.9, passed=False)
    with pytest.raises(ValidationError, match="int8_psnr_drop failed: the int8 graph is 0.900 dB below"):
        check_report(bad)
    assert "Precisions" in (bv_l1["out"] / "report.md").read_text()


def test_eval_clips_with_tiny_frames_are_one_line(capsys, tmp_path, bv_l1):
    data = tmp_path / "tiny_eval"
    write_clip(data / "c", frames(4, 12, 12, 0))
    code, _, err = run(capsys, "validate", bv_l1["out"], "--eval-data", data, "--no-latency")
    assert code == 1 and "has frames 12 px wide x 12 px tall; evaluation needs at least" in error_line(err)


def test_drift_slope_is_the_least_squares_slope():
    from sls_deploy.modalities.drift import gap_slope

    assert gap_slope([0.1 + 0.002 * t for t in range(50)]) == pytest.approx(0.2)  # 0.002 dB/frame = 0.2 / 100
    assert gap_slope([0.3] * 10) == pytest.approx(0.0, abs=1e-12) and gap_slope([1.0]) == 0.0
    assert gap_slope([0.5 - 0.01 * t for t in range(20)]) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- temporal finetuning (TF)


def _tiny_streamvsr(seed: int):
    from sls_deploy.models.basicvsr import StreamVSR

    torch.manual_seed(seed)
    return StreamVSR(num_feat=8, num_block=1, spynet=False)


def test_tf_term_is_zero_for_identical_models_and_pulls_states_together():
    import copy

    from sls_deploy.training.distill import temporal_finetuning, hidden_state_loss

    s = torch.zeros(2, 3, requires_grad=True)
    t = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
    hidden_state_loss([s], [t]).backward()
    assert torch.all(torch.sign(s.grad[t != 0]) == -torch.sign(t[t != 0]))  # descent moves s toward t

    teacher = _tiny_streamvsr(0)
    clip = torch.rand(1, 4, 3, 12, 12)
    same = temporal_finetuning(copy.deepcopy(teacher), ("forward_trunk",), 1.0)
    student = copy.deepcopy(teacher)
    same.attach(student)
    student(clip)
    assert float(same.regularizer().detach()) == 0.0
    same.detach(student)

    student = _tiny_streamvsr(1)
    tf = temporal_finetuning(teacher, ("forward_trunk",), 1.0)
    tf.attach(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        student(clip)
        loss = tf.regularizer()
        assert len(tf.teacher_states((clip,))["forward_trunk"]) == 4  # one hidden state per frame
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    tf.detach(student)
    assert losses[0] > 0 and losses[-1] < losses[0]
    assert not any(p.requires_grad for p in teacher.parameters())


def test_build_with_temporal_finetuning(tmp_path, clips, capsys):
    recipe = write_recipe(tmp_path, "streamvsr", clips)
    weights = write_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code = main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.6", "--tf-weight",
                 "0.1", "--steps", "4", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ft = json.loads((out / "manifest.json").read_text())["stages"]["finetune"]["result"]
    assert ft["tf"]["weight"] == 0.1 and ft["tf"]["final_term"] > 0 and ft["tf"]["states"] == ["forward_trunk"]
    code = main(["build", "--model", "edsr", "--budget", "0.5", "--tf-weight", "0.1", "--out", str(tmp_path / "e")])
    assert code == 2 and "--tf-weight does not apply" in capsys.readouterr().err


# --------------------------------------------------------------------------- Residual Sparsity Connection (RSC)


def _rsc_setup(arch_cls):
    from sls_deploy.models.basicvsr import BasicVSRAdapter, StreamVSRAdapter

    torch.manual_seed(3)
    model = arch_cls(num_feat=8, num_block=2, spynet=False).eval()
    for p in model.parameters():  # weights of a trained size, so every channel matters
        p.data.normal_(0, 0.05)
    adapter = BasicVSRAdapter() if arch_cls.__name__ == "BasicVSR" else StreamVSRAdapter()
    return model, adapter.channel_groups(model)


@pytest.mark.parametrize("arch", ["BasicVSR", "StreamVSR"])
def test_rsc_slice_equals_the_zeroed_dense_model(arch):
    import copy

    from sls_deploy.models import basicvsr
    from sls_deploy.pruning.channels.groups import widths_of
    from sls_deploy.pruning.channels.slicing import slice_into, zero_units

    cls = getattr(basicvsr, arch)
    dense, groups = _rsc_setup(cls)
    by_name = {g.name: g for g in groups}
    keep = {"forward_trunk.main.2.0.read": torch.tensor([0, 2, 3, 6, 7]),
            "forward_trunk.main.2.0.write": torch.tensor([1, 2, 5]),
            "forward_trunk.main.2.1.read": torch.tensor([4, 5]),
            "forward_trunk.main.2.1.conv1": torch.tensor([0, 1, 2, 3, 7])}
    zeroed = copy.deepcopy(dense)
    for name, idx in keep.items():
        drop = [i for i in range(8) if i not in idx.tolist()]
        zero_units(zeroed, by_name[name], drop)
    widths = {**cls.dense_widths(8, 2), **widths_of(keep)}
    sliced = cls(num_feat=8, num_block=2, spynet=False, widths=widths).eval()
    slice_into(dense, sliced, groups, keep)
    assert sliced.forward_trunk.main[2][0].read_idx.tolist() == [0, 2, 3, 6, 7]
    assert sliced.forward_trunk.main[2][0].write_idx.tolist() == [1, 2, 5]
    assert not hasattr(sliced.forward_trunk.main[2][1], "write_idx")  # block 1 writes the whole stream
    clip = torch.rand(1, 3, 3, 12, 14)
    with torch.no_grad():
        a, b = zeroed(clip), sliced(clip)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # slicing a sliced model again composes the indices (channels of the full stream)
    keep2 = {"forward_trunk.main.2.0.read": torch.tensor([1, 3])}  # units 1 and 3 of [0, 2, 3, 6, 7]
    widths2 = {**widths, "forward_trunk.main.2.0.read": 2}
    again = cls(num_feat=8, num_block=2, spynet=False, widths=widths2).eval()
    adapter = basicvsr.BasicVSRAdapter() if arch == "BasicVSR" else basicvsr.StreamVSRAdapter()
    slice_into(sliced, again, adapter.channel_groups(sliced), keep2)
    assert again.forward_trunk.main[2][0].read_idx.tolist() == [2, 6]


def test_rsc_input_scales_fold_exactly_and_learn():
    from sls_deploy.models.basicvsr import StreamVSR
    from sls_deploy.pruning.channels.importance import l1_importance
    from sls_deploy.pruning.channels.scales import ChannelScales

    model, groups = _rsc_setup(StreamVSR)
    read = [g for g in groups if g.name.endswith(".read")]
    assert all(not g.producer and g.index for g in read)
    assert l1_importance(model, read[0]).shape == (8,)
    scales = ChannelScales(model, read)
    scales.attach(model)
    with torch.no_grad():
        for s in scales.scales.values():
            s.copy_(torch.linspace(0.1, 1.5, 8))
    clip = torch.rand(1, 3, 3, 10, 10)
    with torch.no_grad():
        hooked = model(clip)
    scales.fold()
    with torch.no_grad():
        folded = model(clip)
    assert torch.allclose(hooked, folded, atol=1e-5)
    assert torch.allclose(scales.folded_importance[read[0].name], torch.linspace(0.1, 1.5, 8))


def test_plan_and_weights_with_different_rsc_indices_are_refused(bv_l1, tmp_path):
    import shutil

    from sls_deploy.core.errors import PlanError
    from sls_deploy.pruning.registry import load_plan
    from sls_deploy.backends.loading import load_model, plan_widths
    from sls_deploy.stages.models import check_plan_indices
    from sls_deploy.config.recipe import load_recipe

    out = bv_l1["out"]  # uniform L1 narrows every group, the RSC reads and writes too
    plan = load_plan(out / "plan.json")
    recipe = load_recipe(out / "recipe.yaml")
    model = load_model(recipe, out / "model.safetensors", plan_widths(plan))
    check_plan_indices(model, plan)  # the bundle agrees with itself
    narrowed = [g for g in plan.groups if g.index and g.kept_units < g.dense_units]
    assert narrowed
    g = narrowed[0]
    g.kept = sorted(set(range(g.dense_units)) - set(g.kept))[:g.kept_units]
    with pytest.raises(PlanError, match="read/write indices and the weights disagree"):
        check_plan_indices(model, plan)


# --------------------------------------------------------------------------- upscale: video models


@pytest.mark.parametrize("which", ["bv_l1", "sv_ssl"])
def test_frame_stream_equals_the_whole_clip_run(request, which):
    """Frame by frame in bounded memory gives what the whole-clip drive gives: the step graph's state carried,
    the clip graph's T-frame windows and its tail."""
    from sls_deploy.backends.drive import FrameStream, clip_infer
    from sls_deploy.backends.runtime import onnx_runner
    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.backends.loading import graph_spec

    out = request.getfixturevalue(which)["out"]
    spec = graph_spec(load_recipe(out / "recipe.yaml"))
    clip = np.stack(frames(7, 20, 24, 5)).astype(np.float32).transpose(0, 3, 1, 2)[None] / 255.0  # T=7: 3+3+1
    with onnx_runner(out / "model.onnx") as runner:
        whole = clip_infer(runner, spec)(clip)
        stream = FrameStream(runner, spec)
        got = [f for t in range(7) for f in stream.push(clip[:, t])] + stream.finish()
    assert len(got) == 7
    assert np.abs(np.stack(got, axis=1) - whole).max() < 1e-5


@pytest.mark.parametrize("which", ["bv_l1", "sv_ssl"])
def test_upscale_a_video_with_a_video_model(request, which, tmp_path, capsys):
    import imageio.v2 as iio2

    out = request.getfixturevalue(which)["out"]
    src = tmp_path / "clip.mp4"
    with iio2.get_writer(str(src), "ffmpeg", fps=10, codec="libx264", macro_block_size=1,
                         ffmpeg_log_level="error") as w:
        for f in frames(7, 20, 24, 6):
            w.append_data(f)
    code = main(["upscale", str(out), str(src), "-o", str(tmp_path / "o"), "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rec = json.loads(captured.out)[0]
    assert rec["frames"] == 7 and rec["fps"] == 10 and rec["output_size"] == [96, 80]
    with iio2.get_reader(rec["output"], "ffmpeg") as r:
        assert r.count_frames() == 7 and r.get_meta_data()["size"] == (96, 80)
    img = tmp_path / "still.png"
    iio.imwrite(img, frames(1, 20, 24, 7)[0])
    code = main(["upscale", str(out), str(img), "-o", str(tmp_path / "p")])
    assert code == 2 and "is a video model; give it videos" in capsys.readouterr().err


def test_streamvsr_with_rsc_through_the_default_dynamo_exporter(tmp_path, clips):
    """The default exporter (no export section: dynamo, opset 18) on the step graph. It lowers RSC's index add to
    Transpose + ScatterND (reduction add): the export checks accept it as the RSC scatter, the FP16 graph keeps
    ScatterND in FP32 (ONNX Runtime's CPU provider has no FP16 ScatterND-add), and the step graph matches PyTorch
    over the clips with its state fed back."""
    import onnx

    recipe = write_recipe(tmp_path, "streamvsr", clips, export={}, precision={"graphs": ["fp32", "fp16"]})
    weights = write_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "bundle"
    # uniform L1 narrows every group, the RSC read/write groups included (at 0.35 the rounding's leftover, spent
    # by importance, does not widen every write group back)
    rep = build_bundle(load_recipe(recipe), out, budget=0.35, method="l1", weights=str(weights), progress=False,
                       log=lambda s: None)
    assert rep["checks"]["onnx_vs_torch"] is True
    info = json.loads((out / "manifest.json").read_text())["stages"]["export"]["result"]
    assert info["exporter"] == "dynamo" and info["opset"] == 18 and info["graph"] == "step"
    plan = json.loads((out / "plan.json").read_text())
    narrowed_writes = [g for g in plan["groups"] if g.get("index") and g["producers"]
                       and g["kept_units"] < g["dense_units"]]
    fp32 = onnx.load(str(out / "model.onnx"))
    scatters = [n for n in fp32.graph.node if n.op_type == "ScatterND"]
    assert narrowed_writes and len(scatters) == len(narrowed_writes)
    fp16 = onnx.load(str(out / "model.fp16.onnx"))
    float16 = {v.name for v in fp16.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for n in (n for n in fp16.graph.node if n.op_type == "ScatterND"):
        assert n.input[0] not in float16 and n.output[0] not in float16
