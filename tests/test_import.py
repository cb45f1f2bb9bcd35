"""import-sls: SLS-layout checkpoints and plain mask files become a bundle that finetunes, exports, validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sls_deploy.cli import main
from sls_deploy.models.edsr import EDSR
from sls_deploy.pruning.nm.patterns import nm_mask
from sls_deploy.pruning.nm.sls import group_ranks

OURS_TO_OFFICIAL = {"conv_first": "head.0", "conv_after_body": "body.2", "upsample.0": "tail.0.0",
                    "upsample.2": "tail.0.2", "conv_last": "tail.1",
                    **{f"body.{i}.conv{j + 1}": f"body.{i}.body.{2 * j}" for i in range(2) for j in range(2)}}
# scores -> N (gates = cumprod(clamp(k, 0, 1.03)) > 0.5): a different N for some layers
SCORES = {"body.0.conv1": [1.0, 1.0, 0.2], "body.0.conv2": [0.1, 1.0, 1.0], "body.1.conv1": [1.0, 0.3, 1.0],
          "body.1.conv2": [1.0, 1.0, 1.0], "conv_after_body": [0.6, 0.6, 1.0], "upsample.0": [1.0, 1.0, 0.0],
          "upsample.2": [0.0, 0.0, 0.0]}
EXPECTED_N = {"body.0.conv1": 3, "body.0.conv2": 1, "body.1.conv1": 2, "body.1.conv2": 4, "conv_after_body": 2,
              "upsample.0": 3, "upsample.2": 1}


def _sls_checkpoint(path, drop_units_of=None, bad_units_of=None):
    torch.manual_seed(3)
    model = EDSR(scale=4, num_feat=16, num_block=2)
    sd = {}
    for ours, official in OURS_TO_OFFICIAL.items():
        mod = dict(model.named_modules())[ours]
        sd[f"model.{official}.weight"] = mod.weight.detach().clone()
        sd[f"model.{official}.bias"] = mod.bias.detach().clone()
        if ours in SCORES:
            ranks = group_ranks(mod.weight, 4).long()
            units = torch.stack([(ranks == i).float() for i in range(4)])
            if ours == bad_units_of:
                units = units[:, :, :8]
            sd[f"model.{official}.priority_scores"] = torch.tensor(SCORES[ours])
            if ours != drop_units_of:
                sd[f"model.{official}.pruning_units"] = units
    mean = torch.tensor([0.4488, 0.4371, 0.4040])
    for key, sign in (("sub_mean", -1), ("add_mean", 1)):
        sd[f"model.{key}.weight"] = torch.eye(3).view(3, 3, 1, 1)
        sd[f"model.{key}.bias"] = sign * 255 * mean
    torch.save(sd, path)
    return model


def test_import_sls_checkpoint_then_finetune_export_validate(capsys, tmp_path, tiny_recipe):
    ckpt = tmp_path / "sls.pt"
    model = _sls_checkpoint(ckpt)
    out = tmp_path / "imported"
    code = main(["import-sls", str(ckpt), "--recipe", str(tiny_recipe), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert {l["name"]: l["n"] for l in plan["layers"]} == EXPECTED_N
    assert plan["method"] == "imported" and plan["m"] == 4
    from safetensors.torch import load_file

    weights = load_file(str(out / "search.safetensors"))
    for name, n in EXPECTED_N.items():
        w = dict(model.named_modules())[name].weight.detach()
        torch.testing.assert_close(weights[f"{name}.weight"], w * nm_mask(w, n, 4))
    assert main(["finetune", str(out), "--steps", "2", "--no-progress"]) == 0
    assert main(["export", str(out)]) == 0
    assert main(["validate", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["onnx_vs_torch"]["passed"]
    assert {l["name"]: l["n"] for l in rep["layers"]} == EXPECTED_N


def test_import_plain_mask_file(capsys, tmp_path, tiny_recipe, tiny_weights):
    from safetensors.torch import load_file

    base = load_file(str(tiny_weights))
    mask = nm_mask(base["body.0.conv1.weight"], 2, 4)
    masks = tmp_path / "masks.safetensors"
    save_file({"body.0.conv1": mask.to(torch.uint8)}, str(masks))
    out = tmp_path / "b"
    code = main(["import-sls", str(masks), "--recipe", str(tiny_recipe), "--weights", str(tiny_weights),
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    ns = {l["name"]: l["n"] for l in plan["layers"]}
    assert ns["body.0.conv1"] == 2 and all(n == 4 for k, n in ns.items() if k != "body.0.conv1")


@pytest.mark.parametrize("kind, fragment", [
    ("no_units", "priority scores but no pruning units"),
    ("bad_units", "do not fit weight"),
])
def test_bad_sls_checkpoints(capsys, tmp_path, tiny_recipe, kind, fragment):
    ckpt = tmp_path / "bad.pt"
    _sls_checkpoint(ckpt, drop_units_of="body.1.conv1" if kind == "no_units" else None,
                    bad_units_of="body.0.conv2" if kind == "bad_units" else None)
    code = main(["import-sls", str(ckpt), "--recipe", str(tiny_recipe), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("layer, shape, fragment", [
    ("body.0.conv1", (16, 16, 1, 1), "has shape (16, 16, 1, 1), layer 'body.0.conv1'"),
    ("conv_first", (16, 3, 3, 3), "stays dense"),
    ("body.7.conv1", (16, 16, 3, 3), "matches no layer"),
])
def test_bad_mask_files(capsys, tmp_path, tiny_recipe, tiny_weights, layer, shape, fragment):
    masks = tmp_path / "masks.safetensors"
    mask = torch.ones(shape, dtype=torch.uint8)
    mask.view(-1)[0] = 0  # a real mask (all ones would mean "dense" and be accepted)
    save_file({layer: mask}, str(masks))
    code = main(["import-sls", str(masks), "--recipe", str(tiny_recipe), "--weights", str(tiny_weights),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and fragment in err, err
    assert not (tmp_path / "o").exists()


def test_imported_uneven_and_all_zero_masks_survive_finetuning(capsys, tmp_path, tiny_recipe, tiny_weights):
    """An uneven mask (groups keeping 1 or 2 of 4) and an all-zero layer stay exactly so after finetuning: the
    masks are stored as imported, not re-derived as top-N of the weights."""
    from safetensors.torch import load_file

    base = load_file(str(tiny_weights))
    uneven = nm_mask(base["body.0.conv1.weight"], 2, 4)
    uneven[:, :4] &= nm_mask(base["body.0.conv1.weight"], 1, 4)[:, :4]  # the first group of 4 keeps only 1
    zero = torch.zeros_like(base["body.0.conv2.weight"], dtype=torch.bool)
    masks = tmp_path / "masks.safetensors"
    save_file({"body.0.conv1": uneven.to(torch.uint8), "body.0.conv2": zero.to(torch.uint8)}, str(masks))
    out = tmp_path / "b"
    assert main(["import-sls", str(masks), "--recipe", str(tiny_recipe), "--weights", str(tiny_weights),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert main(["finetune", str(out), "--steps", "3", "--no-progress"]) == 0, capsys.readouterr().err
    tuned = load_file(str(out / "model.safetensors"))
    assert torch.equal(tuned["body.0.conv1.weight"] != 0, uneven)  # not one pruned weight came back
    assert not tuned["body.0.conv2.weight"].any()  # the all-zero layer stays all zero


# --------------------------------------------------------------------------- NVIDIA ModelOpt


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fixture", ["modelopt_edsr_tiny.pth", "modelopt_edsr_tiny.safetensors"])
def test_modelopt_sparsified_model_imports_and_continues(tmp_path, tiny_images, capsys, fixture):
    """ModelOpt's layout (mto.save, or a plain state dict with *._weight_mask): its 2:4 masks become the plan,
    all-ones masks (conv_first, conv_last) mean dense, and finetune/export/validate continue with the 2:4 kept."""
    from safetensors.torch import load_file

    from conftest import write_tiny_recipe
    from sls_deploy.pruning.nm.patterns import is_2to4

    recipe = write_tiny_recipe(tmp_path, tiny_images)
    out = tmp_path / "b"
    assert main(["import-sls", str(FIXTURES / fixture), "--recipe", str(recipe), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    ns = {l["name"]: l["n"] for l in plan["layers"]}
    assert plan["m"] == 4 and plan["method"] == "imported"
    assert all(ns[k] == 2 for k in ("body.0.conv1", "body.1.conv2", "conv_after_body", "upsample.0"))
    assert "conv_first" not in ns and "conv_last" not in ns  # all-ones masks: dense, not refused
    for stage in ("finetune", "export"):
        assert main([stage, str(out)]) == 0, capsys.readouterr().err
    sd = load_file(str(out / "model.safetensors"))
    assert all(is_2to4(sd[k + ".weight"]) for k, n in ns.items() if n == 2)
    export = json.loads((out / "manifest.json").read_text())["stages"]["export"]["result"]
    assert export["layers_2to4"] == sum(n <= 2 for n in ns.values())
