"""The deblurring model family: the network (any size, ONNX), its channel groups, its checkpoints, the blur
degradation its adapter declares (deterministic eval, random training patches), BicubicDown's bit-identity with
the old bicubic pairs, and its recipe."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml

from sls_deploy.config.recipe import load_recipe, resolve_recipe
from sls_deploy.core.errors import CheckpointError, DataError, RecipeError
from sls_deploy.data.degradations import BicubicDown, Blur, blur_tensor, gaussian_kernel, motion_kernel
from sls_deploy.data.images import bicubic_down, bicubic_up, load_pair, mod_crop, pair_at_size, read_rgb, to_tensor
from sls_deploy.data.patches import PatchSampler
from sls_deploy.data.sources import skimage_data_dir
from sls_deploy.models import get_adapter
from sls_deploy.models.deblur import DeblurNet
from sls_deploy.modalities.image import baseline_infer, bicubic_infer, evaluate
from sls_deploy.onnx.export import export_onnx
from sls_deploy.pruning.channels.groups import check_groups, unit_count
from sls_deploy.pruning.channels.slicing import slice_into, zero_units

ADAPTER = get_adapter("deblur")


def cfg_of(**kw):
    return ADAPTER.parse_config({"arch": "deblur", "num_feat": 8, "num_block": 2, **kw})


def built(seed=0, **kw):
    """A tiny model with non-trivial weights (a fresh one starts near the identity)."""
    torch.manual_seed(seed)
    cfg = cfg_of(**kw)
    model = ADAPTER.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model


def rand(h, w, n=1, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- the network --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(4, 4), (5, 7), (13, 22), (33, 17)])
def test_any_size_keeps_the_input_size(h, w):
    _, model = built()
    x = rand(h, w, n=2)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    # = the model on the input reflect-padded to a multiple of 4 (which needs no padding), cropped back
    xp = F.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="reflect")
    with torch.no_grad():
        assert torch.allclose(model(xp)[:, :, :h, :w], y, atol=1e-6)


def test_onnx_dynamic_hw_matches_pytorch(tmp_path):
    cfg, model = built()
    spec = ADAPTER.export_spec(cfg)
    assert spec.input_names == ("lr",) and spec.output_names == ("sr",)
    path = export_onnx(ADAPTER.export_module(model), spec, ADAPTER.example_input(cfg, 24, 32),
                       tmp_path / "deblur.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((17, 23), (40, 52)):  # sizes other than the example's; 17x23 needs reflect padding
        x = ADAPTER.example_input(cfg, h, w)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(None, {"lr": x.numpy()})
        assert got.shape == (1, 3, h, w)
        assert np.abs(got - ref).max() <= 1e-4


def test_layers_declare_every_conv_first_and_last_dense():
    _, model = built()
    decls = ADAPTER.layers(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [d.name for d in decls] == convs
    dense = {d.name: d.reason for d in decls if not d.prunable}
    assert set(dense) == {"conv_first", "conv_last"} and all(dense.values())
    assert set(ADAPTER.default_fp32_islands(model)) <= set(convs)
    assert ADAPTER.min_input_size(cfg_of()) == 4


def test_zeroing_then_slicing_each_channel_group_is_exact():
    cfg, src = built(num_block=2)
    groups = ADAPTER.channel_groups(src)
    units = check_groups(src, groups)
    assert units == DeblurNet.dense_widths(8, 2) and len(groups) == 10
    x = rand(19, 26)
    for g in groups:
        n = unit_count(src, g)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        keep = torch.sort(perm[: n // 2 + 1]).values
        zeroed = ADAPTER.build(cfg).eval()
        zeroed.load_state_dict(src.state_dict())
        zero_units(zeroed, g, torch.tensor([i for i in range(n) if i not in set(keep.tolist())]))
        sliced = ADAPTER.build(cfg_of(num_block=2, widths={g.name: len(keep)})).eval()
        slice_into(zeroed, sliced, groups, {g.name: keep})
        with torch.no_grad():
            assert torch.allclose(sliced(x), zeroed(x), atol=1e-5), g.name
    # all groups at once
    keep = {g.name: torch.arange(0, units[g.name], 2) for g in groups}
    for g in groups:
        zero_units(src, g, torch.arange(1, units[g.name], 2))
    sliced = ADAPTER.build(cfg_of(num_block=2, widths={k: len(v) for k, v in keep.items()})).eval()
    slice_into(src, sliced, groups, keep)
    with torch.no_grad():
        assert torch.allclose(sliced(x), src(x), atol=1e-5)


def test_checkpoints_round_trip_and_mismatches_are_named():
    cfg, model = built()
    sd = model.state_dict()
    fresh = ADAPTER.build(cfg).eval()
    fresh.load_state_dict(ADAPTER.convert_state_dict({"params_ema": {f"module.{k}": v for k, v in sd.items()}}, cfg))
    x = rand(12, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    _, wide = built(num_feat=12)
    with pytest.raises(CheckpointError, match="key 'conv_first.weight' has shape"):
        ADAPTER.convert_state_dict(wide.state_dict(), cfg)
    with pytest.raises(CheckpointError, match="unexpected key 'head.0.weight'"):
        ADAPTER.convert_state_dict({**sd, "head.0.weight": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="'conv_last.bias' is missing"):
        ADAPTER.convert_state_dict({k: v for k, v in sd.items() if k != "conv_last.bias"}, cfg)


# --- degradations -------------------------------------------------------------------------------------------


def _old_load_pair(path, scale):
    """load_pair as it was before degradations existed."""
    hr = to_tensor(mod_crop(read_rgb(path), scale))
    return hr, bicubic_down(hr, scale)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_down_is_bit_identical_to_the_old_pairs(scale):
    f = skimage_data_dir() / "chelsea.png"
    hr0, lr0 = _old_load_pair(f, scale)
    for deg in (None, BicubicDown(scale)):
        hr, lr = load_pair(f, scale, deg)
        assert torch.equal(hr, hr0) and torch.equal(lr, lr0)
    d = BicubicDown(scale)
    arr = d.degrade(mod_crop(read_rgb(f), scale), 123)
    assert torch.equal(to_tensor(arr), lr0) and d.name == "bicubic"
    assert torch.equal(bicubic_infer(scale)(lr0), bicubic_up(lr0, scale))
    assert torch.equal(baseline_infer(d)(lr0), bicubic_up(lr0, scale))
    assert ADAPTER.degradation(cfg_of()) != d and get_adapter("edsr").degradation(
        get_adapter("edsr").parse_config({"arch": "edsr", "scale": scale})) == d


def test_patch_sampler_default_and_explicit_bicubic_draw_the_same_batches(tiny_images):
    files = sorted(tiny_images["train"].iterdir())
    a = PatchSampler(files, 2, 8, 3, seed=4)
    b = PatchSampler(files, 2, 8, 3, seed=4, degradation=BicubicDown(2))
    for _ in range(3):
        (la, ha), (lb, hb) = a.batch(), b.batch()
        assert torch.equal(la, lb) and torch.equal(ha, hb)
    with pytest.raises(DataError, match="scale 1, not 2"):
        PatchSampler(files, 2, 8, 3, degradation=Blur())


@pytest.mark.parametrize("kernel", [gaussian_kernel(0.8), gaussian_kernel(2.0), motion_kernel(5, 0.3),
                                    motion_kernel(11, 2.0), motion_kernel(7.5, np.pi / 2)])
def test_kernels_sum_to_one_are_odd_and_centred(kernel):
    assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
    assert abs(float(kernel.sum()) - 1.0) < 1e-5 and (kernel >= 0).all()
    assert np.allclose(kernel, kernel[::-1, ::-1])
    x = torch.full((1, 3, 20, 20), 0.4)
    assert torch.allclose(blur_tensor(x, kernel), x, atol=1e-6)  # a constant image stays constant (reflect)


def test_sampled_kernels_sum_to_one():
    d = Blur()
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        kind, k = d.sample_kernel(rng)
        kinds.add(kind)
        assert abs(float(k.sum()) - 1.0) < 1e-5 and k.shape[0] // 2 <= d.context()
    assert kinds == {"gaussian", "motion"}


def test_blur_eval_pairs_are_deterministic_and_differ_per_image(tiny_images):
    d = Blur()
    f1, f2 = sorted(tiny_images["eval"].iterdir())
    hr, lr = load_pair(f1, 1, d)
    hr_again, lr_again = load_pair(f1, 1, Blur())
    assert torch.equal(lr, lr_again) and torch.equal(hr, hr_again)
    assert lr.shape == hr.shape and not torch.equal(lr, hr)
    assert d.sample_kernel(d.eval_seed(f1.name))[1].tolist() != d.sample_kernel(d.eval_seed(f2.name))[1].tolist()
    other_seed = Blur(seed=1)
    assert not torch.equal(load_pair(f1, 1, other_seed)[1], lr)
    _, lr_c, _ = pair_at_size(f1, 1, (20, 24), d)
    assert torch.equal(pair_at_size(f1, 1, (20, 24), d)[1], lr_c) and lr_c.shape == (1, 3, 20, 24)
    # the baseline is the blurred input itself
    q = evaluate(baseline_infer(d), [f1, f2], 1, "y", with_ssim=False, degradation=d)
    q_id = evaluate(lambda x: x, [f1, f2], 1, "y", with_ssim=False, degradation=d)
    assert q.psnr == q_id.psnr and 15 < q.psnr < 60 and d.name == "blurred input"


def test_blur_training_patches_are_random_reproducible_and_crops_of_the_degraded_image(tiny_images):
    files = sorted(tiny_images["train"].iterdir())
    d = Blur(noise=0.0)
    a, b = PatchSampler(files, 1, 16, 4, seed=3, degradation=d), PatchSampler(files, 1, 16, 4, seed=3, degradation=d)
    la, ha = a.batch()
    lb, hb = b.batch()
    assert torch.equal(la, lb) and torch.equal(ha, hb) and la.shape == ha.shape == (4, 3, 16, 16)
    la2, _ = a.batch()
    assert not torch.equal(la, la2)
    # the same HR patch gets different kernels in different draws
    px = a.builder.pixels(0)
    p1, h1 = a.builder.crop(0, px, 5, 7, seed=1)
    p2, h2 = a.builder.crop(0, px, 5, 7, seed=2)
    assert torch.equal(h1, h2) and not torch.equal(p1, p2)
    # a patch is exactly the crop of the whole image blurred with the same kernel (reflect border)
    whole = d.degrade_tensor(to_tensor(read_rgb(files[0])), 1)
    assert torch.allclose(p1, whole[:, :, 5:21, 7:23], atol=1e-6)
    corner, _ = a.builder.crop(0, px, 0, 0, seed=1)
    assert torch.allclose(corner, whole[:, :, :16, :16], atol=1e-6)
    far, _ = a.builder.crop(0, px, px.shape[0] - 16, px.shape[1] - 16, seed=1)  # the bottom-right border
    assert torch.allclose(far, whole[:, :, -16:, -16:], atol=1e-6)
    # resuming from the state redraws the same kernels
    state = a.state()
    nxt = a.batch()
    a.set_state(state)
    assert torch.equal(a.batch()[0], nxt[0])


def test_blur_noise_and_bad_options():
    hr = rand(24, 24)
    clean, noisy = Blur(kinds=("gaussian",)), Blur(kinds=("gaussian",), noise=0.05)
    assert torch.equal(noisy.degrade_tensor(hr, 5), noisy.degrade_tensor(hr, 5))
    diff = noisy.degrade_tensor(hr, 5) - clean.degrade_tensor(hr, 5)
    assert 0.02 < float(diff.std()) < 0.08
    with pytest.raises(DataError, match="kinds"):
        Blur(kinds=("box",))
    with pytest.raises(DataError, match="sigma"):
        Blur(sigma=(2.0, 1.0))


# --- recipe -------------------------------------------------------------------------------------------------


def test_builtin_recipe_loads():
    r = resolve_recipe("deblur", None)
    assert r.scale == 1 and r.model.arch == "deblur" and r.reference_input_hw() == (720, 1280)
    assert r.modality == "image"
    deg = r.adapter.degradation(r.model)
    assert isinstance(deg, Blur) and deg.kinds == ("gaussian", "motion") and deg.scale == 1
    assert r.engine.profile_sizes()["opt"] == (720, 1280) and r.base_weights == "deblur_small.fp16.safetensors"
    assert set(r.precision.fp32_islands) <= {n for n, m in r.build_model().named_modules()
                                             if isinstance(m, torch.nn.Conv2d)}


@pytest.mark.parametrize("patch, match", [
    ({"scale": 2}, "model.scale must be 1 for deblur"),
    ({"num_feat": 0}, "num_feat"),
    ({"depth": 3}, "model.depth is not a deblur option"),
    ({"blur": {"kind": ["box"]}}, "model.blur: blur kinds"),
    ({"blur": {"sigma": [2.0, 1.0]}}, "model.blur: blur sigma"),
    ({"blur": {"sigma": 1.0}}, "model.blur: blur sigma must be"),
    ({"blur": {"motion_len": [0.5, 3]}}, "model.blur: blur motion_len"),
    ({"blur": {"noise": -0.1}}, "model.blur: blur noise"),
    ({"blur": {"radius": 3}}, "model.blur.radius is not a blur option"),
    ({"blur": [1, 2]}, "model.blur must be a mapping"),
    ({"widths": {"enc0.0.conv1": 99}}, "model.widths.enc0.0.conv1 must be an integer in 1..32"),
])
def test_bad_recipe_options_are_one_line_recipe_errors(tmp_path, patch, match):
    raw = yaml.safe_load(open(resolve_recipe("deblur", None).path).read())
    raw["model"] = {**raw["model"], **patch}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=match) as exc:
        load_recipe(path)
    assert "\n" not in str(exc.value)


def test_train_reports_the_blurred_input_baseline(tmp_path, tiny_images):
    from sls_deploy.training.base import train_base

    raw = yaml.safe_load(open(resolve_recipe("deblur", None).path).read())
    raw["model"].update(num_feat=8)
    raw["data"] = {"train": str(tiny_images["train"]), "eval": str(tiny_images["eval"]), "metric_channel": "y"}
    raw["train"].update(steps=2, batch_size=2, lr_patch=16, checkpoint_every=0)
    path = tmp_path / "deblur_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train_base(load_recipe(path), tmp_path / "w.safetensors", progress=False)
    assert res["baseline"] == "blurred input" and res["psnr_baseline"] == res["psnr_bicubic"]
    assert res["margin_db"] == pytest.approx(res["psnr_model"] - res["psnr_baseline"])
    assert set(res["per_image"]) == {"astronaut.png", "chelsea.png"}
    assert (tmp_path / "w.safetensors").is_file()


def test_shipped_weights_fit_and_beat_the_blurred_input():
    from pathlib import Path

    import sls_deploy
    from sls_deploy.core.checkpoints import load_weights, read_state_dict
    from sls_deploy.data.images import quantize, to_image
    from sls_deploy.data.metrics import psnr

    r = resolve_recipe("deblur", None)
    weights = Path(sls_deploy.__file__).parent / "weights" / r.base_weights
    assert weights.stat().st_size < 2_000_000
    model = r.build_model()
    load_weights(model, r.adapter.convert_state_dict(read_state_dict(weights), r.model), "deblur")
    model.float().eval()
    deg = r.adapter.degradation(r.model)
    hr, lr = load_pair(skimage_data_dir() / "camera.png", 1, deg)
    hr, lr = hr[:, :, 200:328, 200:328], lr[:, :, 200:328, 200:328]  # a 128x128 crop keeps the test fast
    with torch.no_grad():
        out = model(lr)
    gt = quantize(to_image(hr))
    assert psnr(quantize(to_image(out)), gt, 1, True) > psnr(quantize(to_image(deg.baseline(lr))), gt, 1, True) + 0.3
