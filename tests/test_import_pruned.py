"""import-pruned: channel-pruned models from Torch-Pruning and ModelOpt (fixtures made once with the real tools,
tests/fixtures/peers/SOURCES.md) become a bundle that finetunes, exports, validates and plans an engine; the
imported model computes what the tool's pruned model computed. Neither tool is imported here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import error_line, run_cli
from sls_deploy.config.recipe import load_recipe
from sls_deploy.core.inert_pickle import Opaque, load_inert
from sls_deploy.pruning.channels.pruned_file import read_pruned_file
from sls_deploy.backends.loading import load_model

PEERS = Path(__file__).parent / "fixtures" / "peers"
DENSE = PEERS / "edsr_tiny_dense.safetensors"
KEPT = json.loads((PEERS / "kept_units.json").read_text())
REF = load_file(str(PEERS / "reference.safetensors"))
TOOLS = {"torch-pruning": ("tp_edsr_tiny.pth", "tp_output", "Torch-Pruning"),
         "modelopt": ("modelopt_edsr_tiny.pth", "modelopt_output", "ModelOpt")}
ATOL = 1e-5  # the imported model's output against the tool's own, on [0, 1] images (float32 sums reordered)
TRIPWIRE = Path("/nonexistent")  # set per test: a file a tripwire writes if it is ever unpickled


class Tripwire(nn.Module):
    """A module whose unpickling writes a file: it must never happen."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.wire = ""

    def __setstate__(self, state):
        Path(state["wire"]).write_text("unpickled")
        super().__setstate__(state)


def _import(capsys, recipe, source, out, *extra):
    return run_cli(capsys, "import-pruned", source, "--recipe", recipe, "--weights", DENSE, "--out", out,
                   "--no-progress", *extra)


def _imported_output(recipe_path: Path, bundle: Path) -> torch.Tensor:
    recipe = load_recipe(recipe_path)
    plan = json.loads((bundle / "plan.json").read_text())
    model = load_model(recipe, bundle / "search.safetensors", widths=plan["widths"])
    with torch.no_grad():
        return model(REF["input"])


@pytest.mark.parametrize("tool, graphs", [("torch-pruning", ()), ("modelopt", ("--precision", "fp32"))])
def test_peer_model_imports_then_finetunes_exports_validates(capsys, tmp_path, tiny_recipe, tool, graphs):
    """Torch-Pruning's through all three graphs (the recipe's), ModelOpt's through FP32 (the suite's time)."""
    name, ref_key, label = TOOLS[tool]
    out = tmp_path / "b"
    code, stdout, err = _import(capsys, tiny_recipe, PEERS / name, out)
    assert code == 0, err
    assert f"imported a {label} model" in stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "imported-channels" and plan["kind"] == "structured"
    kept = {g["name"]: g["kept"] for g in plan["groups"]}
    assert {g: kept[g] for g in KEPT[tool]} == KEPT[tool]  # the tool's own record of what it kept
    assert kept["upsample.0"] == kept["upsample.2"] == list(range(16))  # both tools left the upsampler whole
    assert plan["budget"] >= plan["macs"]["ratio"] > plan["budget"] - 1e-4
    torch.testing.assert_close(_imported_output(tiny_recipe, out), REF[ref_key], atol=ATOL, rtol=0)
    for args in (("finetune", out, "--steps", "1", "--no-progress"), ("export", out, *graphs),
                 ("validate", out, "--no-latency"), ("engine", out, "--dry-run", *graphs)):
        code, _, err = run_cli(capsys, *args)
        assert code == 0, f"{args[0]}: {err}"
    assert (out / "model.onnx").is_file() and (out / "engine" / "build.json").is_file()


def test_plain_state_dict_of_the_pruned_model_imports_the_same(capsys, tmp_path, tiny_recipe):
    sd = read_pruned_file(PEERS / "modelopt_edsr_tiny.pth").state
    plain = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(plain))
    code, stdout, err = _import(capsys, tiny_recipe, plain, tmp_path / "b")
    assert code == 0, err
    assert "imported a state dict model" in stdout
    kept = {g["name"]: g["kept"] for g in json.loads((tmp_path / "b" / "plan.json").read_text())["groups"]}
    assert {g: kept[g] for g in KEPT["modelopt"]} == KEPT["modelopt"]
    torch.testing.assert_close(_imported_output(tiny_recipe, tmp_path / "b"), REF["modelopt_output"], atol=ATOL,
                               rtol=0)


def test_whole_pickled_module_refused_unread(capsys, tmp_path, tiny_recipe):
    wire = tmp_path / "tripped"
    model = Tripwire()
    model.wire = str(wire)
    path = tmp_path / "model.pth"
    torch.save(model, path)
    before = path.read_bytes()
    code, _, err = _import(capsys, tiny_recipe, path, tmp_path / "b")
    assert code == 1
    line = error_line(err)
    assert "whole pickled object (test_import_pruned.Tripwire)" in line and "tp.state_dict(model)" in line
    assert not wire.exists() and not (tmp_path / "b").exists() and path.read_bytes() == before


def test_objects_inside_a_checkpoint_are_read_inert(tmp_path):
    """tp.state_dict-like: module objects beside the tensors become Opaque records; none is unpickled."""
    wire = tmp_path / "tripped"
    model = Tripwire()
    model.wire = str(wire)
    w = torch.arange(12.0).view(3, 4)
    path = tmp_path / "mixed.pth"
    torch.save({"module": model, "w": w, "half": w[1:].half(), "ids": {1, 2}}, path)
    obj = load_inert(path)
    assert not wire.exists()
    assert isinstance(obj["module"], Opaque) and obj["module"].name == "test_import_pruned.Tripwire"
    torch.testing.assert_close(obj["w"], w, atol=0, rtol=0)
    torch.testing.assert_close(obj["half"], w[1:].half(), atol=0, rtol=0)
    assert obj["ids"] == {1, 2}


def test_disagreeing_residual_producers_refused(capsys, tmp_path, tiny_recipe):
    sd = dict(read_pruned_file(PEERS / "tp_edsr_tiny.pth").state)
    perm = torch.tensor([1, 0, *range(2, 8)])  # block 0 adds its output to the stream in another channel order
    sd["body.0.conv2.weight"], sd["body.0.conv2.bias"] = sd["body.0.conv2.weight"][perm], sd["body.0.conv2.bias"][perm]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    code, _, err = _import(capsys, tiny_recipe, path, tmp_path / "b")
    assert code == 1
    assert "the residual producers of group 'stream' disagree: 'body.0.conv2' keeps other channels than " \
           "'conv_first'" in error_line(err)
    assert not (tmp_path / "b").exists()


def _write(name: str, data: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return make


def _truncated(tmp_path):
    data = (PEERS / "tp_edsr_tiny.pth").read_bytes()
    p = tmp_path / "cut.pth"
    p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize("make, fragment", [
    (lambda t: t / "missing.pth", "pruned model not found"),
    (_write("empty.pth", b""), "is empty"),
    (_write("junk.pth", b"\x80\x02junk" * 50), "not a torch.save archive"),
    (_truncated, "not a torch.save archive"),
    (_write("x.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), "cannot read"),
    (lambda t: Path(__file__).parent / "fixtures" / "modelopt_edsr_tiny.pth", "import it with `sls-deploy import-sls`"),
])
def test_bad_files_one_line_exit_1(capsys, tmp_path, tiny_recipe, make, fragment):
    path = make(tmp_path)
    code, _, err = _import(capsys, tiny_recipe, path, tmp_path / "b")
    assert code == 1
    assert fragment in error_line(err)
    assert not (tmp_path / "b").exists()


def test_other_dense_weights_refused(capsys, tmp_path, tiny_recipe, tiny_weights):
    code, _, err = run_cli(capsys, "import-pruned", PEERS / "tp_edsr_tiny.pth", "--recipe", tiny_recipe,
                           "--weights", tiny_weights, "--out", tmp_path / "b")
    assert code == 1
    assert "layer 'conv_first': the pruned model's channels are not channels of the dense weights" in error_line(err)
    assert not (tmp_path / "b").exists()


def test_usage_errors_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "import-pruned", PEERS / "tp_edsr_tiny.pth", "--out", tmp_path / "b")
    assert code == 2 and not (tmp_path / "b").exists()
    code, _, _ = run_cli(capsys, "import-pruned", "--recipe")
    assert code == 2


def test_pixelshuffle_units_and_reordered_channels_map_back():
    """A narrower model keeping upsampler units (4 channels each, PixelShuffle(2)) in a shuffled order maps back to
    the kept units, ascending, computing the same output; a unit split apart is refused in one line."""
    from sls_deploy.core.errors import CheckpointError
    from sls_deploy.models.edsr import EDSRAdapter
    from sls_deploy.pruning.channels.importing import map_kept_channels
    from sls_deploy.pruning.channels.slicing import slice_into

    adapter = EDSRAdapter()
    cfg = {"arch": "edsr", "scale": 4, "num_feat": 16, "num_block": 2}
    dense = adapter.build(adapter.parse_config(cfg))
    dense.load_state_dict(load_file(str(DENSE)))
    groups = adapter.channel_groups(dense)
    keep = {"stream": [1, 4, 6, 7, 12, 15], "upsample.0": [0, 3, 5, 9, 10, 14], "body.1.conv1": [2, 8, 11]}
    widths = {g: len(k) for g, k in keep.items()}
    narrow = adapter.build(adapter.parse_config({**cfg, "widths": widths}))
    slice_into(dense, narrow, groups, {g: torch.tensor(k) for g, k in keep.items()})
    sd = narrow.state_dict()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # upsample.0's units in another order: its rows and the next conv's inputs
    rows = (perm.view(-1, 1) * 4 + torch.arange(4)).reshape(-1)
    sd["upsample.0.weight"], sd["upsample.0.bias"] = sd["upsample.0.weight"][rows], sd["upsample.0.bias"][rows]
    sd["upsample.2.weight"] = sd["upsample.2.weight"][:, perm]
    mapped = map_kept_channels(dense, groups, sd)
    assert {g: mapped.keep[g] for g in keep} == keep and mapped.reordered == ["upsample.0"]
    assert mapped.keep["body.0.conv1"] == list(range(16))
    x = REF["input"]
    reloaded = adapter.build(adapter.parse_config({**cfg, "widths": mapped.widths}))
    reloaded.load_state_dict(mapped.state)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), narrow(x), atol=ATOL, rtol=0)
    split = dict(sd)
    swap = torch.arange(24)
    swap[[1, 4]] = swap[[4, 1]]  # a channel of the first kept unit swapped with one of the second
    split["upsample.0.weight"], split["upsample.0.bias"] = sd["upsample.0.weight"][swap], sd["upsample.0.bias"][swap]
    with pytest.raises(CheckpointError, match="not whole units of 4 consecutive channels"):
        map_kept_channels(dense, groups, split)
