"""Modalities as objects: the registry (every recipe modality has one object, an unknown name is one line), and
each modality's sampler, loss, evaluation, calibration feeds and frames per graph run on tiny data."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sls_deploy.pruning.channels.plan import StructuredPlan
import torch.nn.functional as F
import yaml

from sls_deploy.config.recipe import MODALITIES, load_recipe
from sls_deploy.core.errors import RecipeError
from sls_deploy.data import PatchSampler, resolve_images
from sls_deploy.data.calibration import BUILTIN_CALIB
from sls_deploy.data.catalog import training_images
from sls_deploy.data.degradations import BicubicDown
from sls_deploy.data.video import ClipSampler, resolve_clips
from sls_deploy.modalities import registry
from sls_deploy.modalities.clip import CALIB_CROP, CALIB_WINDOWS, bicubic_clip_infer, evaluate_clips
from sls_deploy.modalities.image import bicubic_infer, evaluate
from sls_deploy.stages.build import plan_line
from sls_deploy.stages.validate import VALIDATORS
from conftest import write_tiny_recipe

torch.set_num_threads(1)


def frames(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return [np.clip(127 + 100 * np.sin(0.2 * (xx + 2 * t) + 0.1 * yy)[..., None] + rng.normal(0, 8, (h, w, 3)),
                    0, 255).astype(np.uint8) for t in range(n)]


@pytest.fixture(scope="module")
def clip_recipes(tmp_path_factory) -> dict[str, object]:
    """A clip (BasicVSR) and a step (StreamVSR) recipe on synthetic clips of two sizes."""
    root = tmp_path_factory.mktemp("modality_clips")
    for split, name, (n, h, w), seed in (("train", "a", (5, 32, 32), 1), ("train", "b", (4, 36, 40), 2),
                                         ("eval", "e", (4, 32, 40), 3)):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i, f in enumerate(frames(n, h, w, seed)):
            iio.imwrite(folder / f"{i:04d}.png", f)
    out = {}
    for arch in ("basicvsr", "streamvsr"):
        r = {"name": f"{arch}-tiny", "model": {"arch": arch, "scale": 4, "num_feat": 8, "num_block": 1, "clip_len": 3},
             "data": {"train": str(root / "train"), "eval": str(root / "eval"), "metric_channel": "y"},
             "train": {"steps": 1, "lr": 1e-3, "batch_size": 3, "lr_patch": 6, "checkpoint_every": 1},
             "finetune": {"steps": 1, "lr": 1e-3, "batch_size": 2, "lr_patch": 8, "checkpoint_every": 1}}
        path = root / f"{arch}.yaml"
        path.write_text(yaml.safe_dump(r))
        out[arch] = load_recipe(path)
    return out


@pytest.fixture(scope="module")
def image_recipe(tmp_path_factory, tiny_images):
    return load_recipe(write_tiny_recipe(tmp_path_factory.mktemp("modality_image"), tiny_images))


# --------------------------------------------------------------------------- registry


def test_the_registry_holds_one_object_per_recipe_modality():
    assert tuple(registry.REGISTRY) == MODALITIES
    for name in MODALITIES:
        m = registry.lookup(name)
        assert m.name == name and m is registry.REGISTRY[name]
        assert m.validation in VALIDATORS  # every modality's validate driver exists in stages/validate.py
    assert {n: registry.lookup(n).unit for n in MODALITIES} == {"image": "image", "clip": "frame", "step": "frame"}


@pytest.mark.parametrize("name", ["audio", "", None, "IMAGE", "x" * 10_000])
def test_an_unknown_modality_is_one_line_recipe_error(name):
    with pytest.raises(RecipeError) as e:
        registry.lookup(name)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 120, msg
    assert msg.startswith("unknown modality") and msg.endswith("(known: image, clip, step)")
    with pytest.raises(RecipeError, match="unknown modality"):  # the stages' entry points say the same
        registry.loss_fn(name, 0.0)


def test_the_recipe_modality_picks_the_object(image_recipe, clip_recipes):
    assert [registry.lookup(r.modality).name for r in (image_recipe, clip_recipes["basicvsr"],
                                                       clip_recipes["streamvsr"])] == ["image", "clip", "step"]


def test_plan_line_counts_macs_per_unit_of_the_modality():
    class Group:
        kept_units, dense_units = 4, 8

    class ChannelPlan(StructuredPlan):  # the channel strategy's plan line reads only these
        method, groups, layers, frames, macs_pruned, macs_dense, ratio = "l1", [Group()], [], 3, 3e9, 6e9, 0.5

        def __init__(self):
            pass

    assert plan_line(ChannelPlan(), "image").endswith("MACs 1.00 / 2.00 G per image (ratio 0.500)")
    assert plan_line(ChannelPlan(), "clip").endswith("MACs 1.00 / 2.00 G per frame (ratio 0.500)")
    assert plan_line(ChannelPlan(), "step").endswith("G per frame (ratio 0.500)")


# --------------------------------------------------------------------------- sampler


def _same_batches(a, b, n: int = 2) -> bool:
    return all(all(torch.equal(x, y) for x, y in zip(a.batch(), b.batch())) for _ in range(n))


def test_image_sampler_draws_the_sections_patches(image_recipe):
    r = image_recipe
    m = registry.lookup("image")
    s = m.sampler(r, r.data_train, seed=3)
    lr, hr = s.batch()
    assert lr.shape == (r.finetune.batch_size, 3, r.finetune.lr_patch, r.finetune.lr_patch)
    assert hr.shape == (r.finetune.batch_size, 3, r.finetune.lr_patch * r.scale, r.finetune.lr_patch * r.scale)
    direct = PatchSampler(training_images(r.data_train), r.scale, r.finetune.lr_patch, r.finetune.batch_size, seed=3,
                          degradation=r.adapter.degradation(r.model))
    assert _same_batches(m.sampler(r, r.data_train, seed=3), direct)
    assert not torch.equal(m.sampler(r, r.data_train, seed=4).batch()[1], hr)  # the seed is the sampler's
    # the train section (sls-deploy train) and a given degradation
    t = m.sampler(r, r.data_train, seed=3, section=r.train, degradation=BicubicDown(r.scale))
    assert t.batch()[0].shape == (r.train.batch_size, 3, r.train.lr_patch, r.train.lr_patch)
    assert registry.sampler(r, "image", r.data_train, 3).batch()[0].shape == lr.shape  # the stages' entry point


@pytest.mark.parametrize("arch", ["basicvsr", "streamvsr"])
def test_clip_and_step_samplers_draw_clips_of_clip_len_frames(clip_recipes, arch):
    r = clip_recipes[arch]
    m = registry.lookup(r.modality)
    lr, hr = m.sampler(r, r.data_train, seed=5).batch()
    assert lr.shape == (2, 3, 3, 8, 8) and hr.shape == (2, 3, 3, 32, 32)  # finetune: batch 2, clip_len 3, patch 8
    direct = ClipSampler(resolve_clips(r.data_train), r.scale, 8, 3, 2, seed=5)
    assert _same_batches(m.sampler(r, r.data_train, seed=5), direct)
    t = m.sampler(r, r.data_train, seed=5, section=r.train)
    assert t.batch()[0].shape == (3, 3, 3, 6, 6)  # train: batch 3, patch 6


# --------------------------------------------------------------------------- loss


def test_image_loss_is_plain_l1():
    assert registry.lookup("image").loss(0.5) is None and registry.loss_fn("image", 0.5) is None


@pytest.mark.parametrize("name", ["clip", "step"])
def test_clip_loss_adds_the_frame_difference_term(name):
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 4, 3, 8, 8, generator=g)
    sr = hr + 0.1 * torch.randn(2, 4, 3, 8, 8, generator=g)
    plain = F.l1_loss(sr, hr)
    diff = F.l1_loss(sr[:, 1:] - sr[:, :-1], hr[:, 1:] - hr[:, :-1])
    assert float(diff) > 0
    assert torch.equal(registry.lookup(name).loss(0.0)(sr, hr), plain)
    torch.testing.assert_close(registry.lookup(name).loss(0.5)(sr, hr), plain + 0.5 * diff)
    # a constant offset over every frame does not flicker: only the per-frame term sees it
    torch.testing.assert_close(registry.loss_fn(name, 2.0)(hr + 0.25, hr), torch.tensor(0.25))
    # an image batch (N,C,H,W) or a single frame has no temporal term
    torch.testing.assert_close(registry.loss_fn(name, 2.0)(sr[:, 0], hr[:, 0]), F.l1_loss(sr[:, 0], hr[:, 0]))


# --------------------------------------------------------------------------- frames per graph run


def test_frames_per_run_of_each_modalitys_graph(image_recipe, clip_recipes):
    def example(r):
        return r.adapter.example_input(r.model, 16, 16)

    assert registry.frames_per_run(example(image_recipe)) == 1
    assert registry.frames_per_run(example(clip_recipes["basicvsr"])) == 3  # the clip graph runs clip_len frames
    assert registry.frames_per_run(example(clip_recipes["streamvsr"])) == 1  # a step graph runs one frame


# --------------------------------------------------------------------------- evaluation and baseline


def test_image_evaluation_and_baseline(image_recipe):
    r = image_recipe
    m = registry.lookup("image")
    files = m.resolve_data(r.data_eval)
    assert [f.name for f in files] == ["astronaut.png", "chelsea.png"]
    label, base = m.baseline(r)
    assert label == "bicubic"
    q = m.evaluate(base, files, r, with_ssim=False)
    ref = evaluate(bicubic_infer(r.scale), files, r.scale, "y", with_ssim=False)
    assert q.psnr == ref.psnr and q.per_item_psnr() == {k: v["psnr"] for k, v in ref.per_image.items()}
    assert 15 < q.psnr < 40
    assert m.packed_eval_data(r.data_eval) == resolve_images(r.data_eval)


@pytest.mark.parametrize("arch", ["basicvsr", "streamvsr"])
def test_clip_evaluation_and_baseline(clip_recipes, arch):
    r = clip_recipes[arch]
    m = registry.lookup(r.modality)
    clips = m.resolve_data(r.data_eval)
    label, base = m.baseline(r)
    assert label == "bicubic"
    q = m.evaluate(base, clips, r, with_ssim=False)
    ref = evaluate_clips(bicubic_clip_infer(4), clips, 3, 4, "y", with_ssim=False)
    assert len(q.per_clip["e"]["psnr"]) == 3  # the first clip_len frames of the 4-frame clip
    assert q.psnr == ref.psnr and q.per_item_psnr() == pytest.approx({"e": float(np.mean(ref.per_clip["e"]["psnr"]))})
    assert m.packed_eval_data(r.data_eval) == []  # eval clips are not packed


# --------------------------------------------------------------------------- calibration feeds


def test_image_calibration_feeds_are_the_calibration_images(image_recipe, tiny_images):
    r = image_recipe
    m = registry.lookup("image")
    feeds, hashes = m.calibration_feeds(r, "builtin", r.data_train, "lr")
    names = sorted(p.name for p in BUILTIN_CALIB.glob("*.png"))
    assert sorted(hashes) == names and len(feeds) == len(names)
    assert all(set(f) == {"lr"} and f["lr"].shape[:2] == (1, 3) and f["lr"].dtype == np.float32 for f in feeds)
    own, own_hashes = m.calibration_feeds(r, str(tiny_images["eval"]), r.data_train, "x")
    assert sorted(own_hashes) == ["astronaut.png", "chelsea.png"] and [f["x"].shape for f in own] == [
        (1, 3, 64, 64), (1, 3, 56, 68)]


def test_clip_and_step_calibration_feeds_are_windows_of_the_training_clips(clip_recipes):
    clip_feeds, clip_hashes = registry.lookup("clip").calibration_feeds(clip_recipes["basicvsr"], "builtin",
                                                                        clip_recipes["basicvsr"].data_train, "lr")
    step_feeds, step_hashes = registry.lookup("step").calibration_feeds(clip_recipes["streamvsr"], "builtin",
                                                                        clip_recipes["streamvsr"].data_train, "lr")
    assert CALIB_CROP > 10 and CALIB_WINDOWS >= 2
    # two training clips (LR 8x8 and 9x10): windows of clip_len frames, centre-cropped to their smaller side
    assert [f["lr"].shape for f in clip_feeds] == [(1, 3, 3, 8, 8), (1, 3, 3, 9, 9)]
    assert list(clip_hashes) == ["window0", "window1"]
    # a step graph gets the same windows under "__clip__", driven through its recurrence at export
    assert [set(f) for f in step_feeds] == [{"__clip__"}] * 2
    assert all(np.array_equal(a["lr"], b["__clip__"]) for a, b in zip(clip_feeds, step_feeds))
    assert step_hashes == clip_hashes
