"""Every shipped recipe parses; the default recipe's shipped weights fit it and beat bicubic on a real image."""

from __future__ import annotations

import re

import pytest
import torch

from sls_deploy.data import bicubic_up, load_pair, psnr, quantize, to_image
from sls_deploy.data.sources import skimage_data_dir
from sls_deploy.core.errors import RecipeError
from sls_deploy.backends.loading import load_model, resolve_base_weights
from sls_deploy.config.recipe import builtin_models, load_recipe, resolve_recipe


def test_builtin_models_listed():
    assert "edsr" in builtin_models()


@pytest.mark.parametrize("name", builtin_models())
def test_every_recipe_parses(name):
    r = resolve_recipe(name, None)
    assert r.scale in (1, 2, 3, 4) and r.sls.m == r.sparsity_m  # 1: the deblurring model


def test_shipped_weights_fit_and_beat_bicubic():
    recipe = resolve_recipe("edsr", None)
    model = load_model(recipe, resolve_base_weights(recipe, None))
    hr, lr = load_pair(skimage_data_dir() / "astronaut.png", 4)
    lr, hr = lr[:, :, 32:96, 32:96], hr[:, :, 128:384, 128:384]  # a 64x64 LR crop keeps the test fast
    with torch.no_grad():
        sr = model(lr)
    gt = quantize(to_image(hr))
    assert psnr(quantize(to_image(sr)), gt, 4, True) > psnr(quantize(to_image(bicubic_up(lr, 4))), gt, 4, True)


@pytest.mark.parametrize("text, fragment", [
    ("model: {arch: edsr}\nsls: {alpha: 0.5}\n", "alpha"),
    ("model: {arch: edsr}\nsls: {lam: abc}\n", "sls"),
    ("model: {arch: edsr}\nsparsity: {m: 5}\n", "sparsity.m"),
    ("model: {arch: edsr}\nfinetune: {stepz: 3}\n", "finetune.stepz"),
    ("model: {arch: edsr, scale: 5}\n", "scale"),
])
def test_bad_recipe_fields(tmp_path, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=fragment):
        load_recipe(path)


def _recipe_with(tmp_path, **changes):
    import yaml

    from sls_deploy.config.recipe import recipe_for_model

    raw = yaml.safe_load(recipe_for_model("edsr").read_text())
    raw.update(changes)
    raw["base_weights"] = str(resolve_base_weights(resolve_recipe("edsr", None), None))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_or_unsupported_modality_is_one_line_naming_the_choices(tmp_path, capsys):
    from conftest import error_line, run_cli

    with pytest.raises(RecipeError, match=r"unknown modality 'video' \(known: image, clip, step\)"):
        load_recipe(_recipe_with(tmp_path, modality="video"))
    with pytest.raises(RecipeError, match="modality 'clip' is not supported by model 'edsr' \\(it supports: image\\)"):
        load_recipe(_recipe_with(tmp_path, modality="clip"))
    code, _, err = run_cli(capsys, "build", "--recipe", str(_recipe_with(tmp_path, modality="step")), "--budget",
                           "0.5", "--out", str(tmp_path / "b"))
    assert code == 1 and "is not supported by model 'edsr'" in error_line(err) and not (tmp_path / "b").exists()


def test_unknown_strategy_in_a_recipe_is_one_line_naming_the_methods(tmp_path, capsys):
    from conftest import error_line, run_cli

    path = _recipe_with(tmp_path, sparsity={"method": "magic", "m": 4})
    code, _, err = run_cli(capsys, "build", "--recipe", str(path), "--budget", "0.5", "--out", str(tmp_path / "b"))
    assert code == 2 and "unknown method 'magic' (known: sls, oneshot, srste, ssl, l1, l1-global, hybrid)" in error_line(err)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("section, value, fragment", [
    ("finetune", {"lr": float("nan")}, "finetune.lr must be a finite number"),
    ("finetune", {"batch_size": 1e9}, "finetune.batch_size must be in 1..1024"),
    ("finetune", {"steps": 4.9}, "finetune.steps must be an integer, not 4.9"),
    ("finetune", {"warmup": -5}, "finetune.warmup must be in 0.."),
    ("train", {"lr": "fast"}, "train.lr must be a finite number"),
    ("name", "../../evil", "recipe name '../../evil' must be letters"),
    ("name", "/abs/evil", "recipe name '/abs/evil' must be letters"),
])
def test_recipe_numbers_and_names_are_checked_at_load(tmp_path, section, value, fragment):
    import yaml

    from sls_deploy.config.recipe import recipe_for_model

    raw = yaml.safe_load(recipe_for_model("edsr").read_text())
    if isinstance(value, dict):
        raw[section] = {**raw.get(section, {}), **value}
    else:
        raw[section] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        load_recipe(path)


def test_scale_must_be_an_integer(tmp_path):
    import yaml

    from sls_deploy.config.recipe import recipe_for_model

    raw = yaml.safe_load(recipe_for_model("edsr").read_text())
    raw["model"]["scale"] = 4.7
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="model.scale must be an integer, not 4.7"):
        load_recipe(path)


@pytest.mark.parametrize("model", ["edsr", "basicvsr", "deblur"])
@pytest.mark.parametrize("key,value", [("num_block", 10**9), ("num_feat", 10**7), ("num_block", 0)])
def test_absurd_architecture_sizes_are_one_line_errors_not_memory_exhaustion(tmp_path, model, key, value):
    """Found by the Hypothesis fuzz: num_block 1e9 built a billion-entry width table and ran out of memory."""
    import yaml

    from sls_deploy.config.recipe import recipe_for_model

    raw = yaml.safe_load(recipe_for_model(model).read_text())
    raw["model"][key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=f"model.{key} must be between 1 and"):
        load_recipe(path)
