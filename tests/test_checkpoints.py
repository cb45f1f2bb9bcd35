"""EDSR adapter and safe checkpoint loading: layouts, fit errors, corrupt and unsafe files."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sls_deploy.core.checkpoints import check_fit, load_weights, read_state_dict
from sls_deploy.core.errors import CheckpointError, RecipeError
from sls_deploy.models.edsr import DEFAULT_RGB_MEAN, EDSRAdapter

ADAPTER = EDSRAdapter()


def cfg_of(**kw):
    return ADAPTER.parse_config({"arch": "edsr", "scale": 4, "num_feat": 8, "num_block": 2, **kw})


def built(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = cfg_of(**kw)
    return cfg, ADAPTER.build(cfg).eval()


def x_in(h=6, w=5):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(123))


def outputs_equal(a, b, atol=0.0):
    with torch.no_grad():
        ya, yb = a(x_in()), b(x_in())
    return torch.allclose(ya, yb, rtol=0, atol=atol)


def load_into_fresh(path, cfg, seed=99):
    torch.manual_seed(seed)  # a differently initialised target model
    model = ADAPTER.build(cfg).eval()
    sd = ADAPTER.convert_state_dict(read_state_dict(path), cfg)
    return load_weights(model, sd, "the test recipe")


def one_line_naming(err: Exception, key: str):
    msg = str(err)
    assert "\n" not in msg
    assert key in msg, msg


# --------------------------------------------------------------------------- BasicSR layout


def test_basicsr_params_checkpoint_loads(tmp_path):
    cfg, ref = built()
    path = tmp_path / "net_g.pth"
    torch.save({"params": ref.state_dict()}, path)
    model = load_into_fresh(path, cfg)
    assert not outputs_equal(ADAPTER.build(cfg).eval(), ref)  # sanity: a fresh model differs
    assert outputs_equal(model, ref)


def test_params_ema_is_preferred_over_params(tmp_path):
    cfg, ema = built(seed=0)
    _, other = built(seed=1)
    path = tmp_path / "net_g.pth"
    torch.save({"params": other.state_dict(), "params_ema": ema.state_dict()}, path)  # params first in order
    model = load_into_fresh(path, cfg)
    assert outputs_equal(model, ema)
    assert not outputs_equal(model, other)


def test_plain_and_wrapped_state_dicts_and_module_prefix(tmp_path):
    cfg, ref = built()
    sd = ref.state_dict()
    for i, obj in enumerate([sd, {"state_dict": sd}, {"model": {f"module.{k}": v for k, v in sd.items()}},
                             {"params": sd, "iter": 5, "optimizer": "x"}]):
        path = tmp_path / f"c{i}.pt"
        torch.save(obj, path)
        assert outputs_equal(load_into_fresh(path, cfg), ref)


def test_safetensors_fp16_loads_and_converts_dtype(tmp_path):
    cfg, ref = built()
    path = tmp_path / "w.safetensors"
    save_file({k: v.half().contiguous() for k, v in ref.state_dict().items()}, str(path))
    sd = read_state_dict(path)
    assert all(v.dtype == torch.float16 for v in sd.values())
    model = load_into_fresh(path, cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k].half().float()), k
    assert outputs_equal(model, ref, atol=5e-2)


# --------------------------------------------------------------------------- official EDSR-PyTorch layout


def to_official(sd: dict[str, torch.Tensor], num_block: int, mean=DEFAULT_RGB_MEAN, rgb_range=255.0):
    """Our (BasicSR) names -> sanghyun-son/EDSR-PyTorch names, with its MeanShift 1x1 convs."""
    out = {}
    for k, v in sd.items():
        param = k.rsplit(".", 1)[1]
        if k.startswith("conv_first."):
            nk = f"head.0.{param}"
        elif m := re.match(r"^body\.(\d+)\.conv([12])\.", k):
            nk = f"body.{m.group(1)}.body.{0 if m.group(2) == '1' else 2}.{param}"
        elif k.startswith("conv_after_body."):
            nk = f"body.{num_block}.{param}"
        elif m := re.match(r"^upsample\.(\d+)\.", k):
            nk = f"tail.0.{m.group(1)}.{param}"
        elif k.startswith("conv_last."):
            nk = f"tail.1.{param}"
        else:
            raise AssertionError(f"unexpected key {k}")
        out[nk] = v.clone()
    eye = torch.eye(3).view(3, 3, 1, 1)
    mean_t = torch.tensor(mean)
    out["sub_mean.weight"], out["sub_mean.bias"] = eye.clone(), -rgb_range * mean_t
    out["add_mean.weight"], out["add_mean.bias"] = eye.clone(), rgb_range * mean_t
    return out


@pytest.mark.parametrize("scale,num_block", [(4, 2), (2, 3), (3, 1)])
def test_official_layout_converts(tmp_path, scale, num_block):
    cfg, ref = built(scale=scale, num_block=num_block)
    official = to_official(ref.state_dict(), num_block)
    assert "body.0.body.0.weight" in official and f"body.{num_block}.weight" in official
    path = tmp_path / "edsr_official.pt"
    torch.save(official, path)
    model = load_into_fresh(path, cfg)
    assert outputs_equal(model, ref)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_official_layout_with_other_mean_is_refused(tmp_path):
    cfg, ref = built()
    official = to_official(ref.state_dict(), 2, mean=(0.5, 0.5, 0.5))
    with pytest.raises(CheckpointError) as exc:
        ADAPTER.convert_state_dict(official, cfg)
    one_line_naming(exc.value, "sub_mean")
    # the same checkpoint fits a recipe that declares that mean
    cfg2 = cfg_of(rgb_mean=[0.5, 0.5, 0.5])
    assert set(ADAPTER.convert_state_dict(official, cfg2)) == set(ref.state_dict())


def test_official_meanshift_with_std_is_refused():
    cfg, ref = built()
    official = to_official(ref.state_dict(), 2)
    official["sub_mean.weight"] = official["sub_mean.weight"] / 0.5
    with pytest.raises(CheckpointError) as exc:
        ADAPTER.convert_state_dict(official, cfg)
    one_line_naming(exc.value, "sub_mean")


def test_basicsr_layout_passes_convert_unchanged():
    cfg, ref = built()
    sd = ref.state_dict()
    out = ADAPTER.convert_state_dict(sd, cfg)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)


# --------------------------------------------------------------------------- fit errors


def _fit_error(model, sd) -> CheckpointError:
    with pytest.raises(CheckpointError) as exc:
        load_weights(model, sd, "recipe 'x'")
    return exc.value


def test_x2_checkpoint_into_x4_recipe_names_missing_key():
    _, x2 = built(scale=2)
    _, x4 = built(scale=4)
    err = _fit_error(x4, x2.state_dict())
    one_line_naming(err, "'upsample.2.weight'")
    assert "missing" in str(err)


def test_x4_checkpoint_into_x2_recipe_names_unexpected_key():
    _, x2 = built(scale=2)
    _, x4 = built(scale=4)
    err = _fit_error(x2, x4.state_dict())
    one_line_naming(err, "'upsample.2.weight'")
    assert "unexpected" in str(err)


def test_wider_checkpoint_names_first_shape_mismatch():
    _, wide = built(num_feat=16)
    _, model = built()
    err = _fit_error(model, wide.state_dict())
    one_line_naming(err, "'conv_first.weight'")
    assert "(16, 3, 3, 3)" in str(err) and "(8, 3, 3, 3)" in str(err)


def test_deeper_checkpoint_names_unexpected_key():
    _, deep = built(num_block=3)
    _, model = built()
    err = _fit_error(model, deep.state_dict())
    one_line_naming(err, "'body.2.conv1.weight'")
    assert "unexpected" in str(err)


def test_missing_key_is_named():
    _, model = built()
    sd = dict(model.state_dict())
    del sd["body.1.conv2.bias"]
    err = _fit_error(model, sd)
    one_line_naming(err, "'body.1.conv2.bias'")


def test_failed_fit_leaves_the_model_untouched():
    _, model = built()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, other = built(seed=5)
    sd = dict(other.state_dict())
    del sd["conv_last.bias"]
    with pytest.raises(CheckpointError):
        load_weights(model, sd, "x")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_check_fit_accepts_an_exact_fit():
    _, model = built()
    check_fit(model, model.state_dict(), "x")


# --------------------------------------------------------------------------- unreadable / unsafe files


def _read_error(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path)
    assert "\n" not in str(exc.value)
    return exc.value


def test_missing_file(tmp_path):
    err = _read_error(tmp_path / "nope.pth")
    assert "nope.pth" in str(err)
    _read_error(tmp_path / "nope.safetensors")
    _read_error(tmp_path)  # a folder is not a checkpoint


def test_corrupt_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    for i, data in enumerate([rng.bytes(4096), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson"]):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(data)
        _read_error(path)


def test_truncated_safetensors(tmp_path):
    _, model = built()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _read_error(path)


def test_truncated_pth(tmp_path):
    _, model = built()
    path = tmp_path / "w.pth"
    torch.save({"params": model.state_dict()}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path.write_bytes(data[:cut])
        _read_error(path)


def test_random_bytes_pth(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    _read_error(path)


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_custom_class_is_not_executed(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _, model = built()
    obj = {"params": model.state_dict(), "payload": _Evil(str(marker))}
    if legacy:
        with open(path, "wb") as f:  # a bare pickle, not torch's zip format
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    assert not marker.exists()
    _read_error(path)
    assert not marker.exists()


def test_files_without_tensors(tmp_path):
    cases = {"empty.pth": {}, "scalars.pth": {"a": 1, "b": "x"}, "list.pth": [torch.zeros(2)],
             "tensor.pth": torch.zeros(3), "nested_empty.pth": {"params": {}}, "params_scalars.pth": {"params": {"a": 1}}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        _read_error(tmp_path / name)


def test_safetensors_with_no_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    _read_error(path)


# --------------------------------------------------------------------------- EDSR build / config


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_edsr_build_output_size(scale):
    cfg, model = built(scale=scale, num_block=1)
    with torch.no_grad():
        y = model(torch.rand(2, 3, 5, 7))
    assert y.shape == (2, 3, 5 * scale, 7 * scale)
    assert ADAPTER.example_input(cfg, 5, 7, batch=2).shape == (2, 3, 5, 7)


def test_edsr_identity_when_body_is_zero():
    """Mean shift and range folding: with the last conv zeroed, the output is exactly the mean image."""
    _, model = built()
    with torch.no_grad():
        model.conv_last.weight.zero_()
        model.conv_last.bias.zero_()
        y = model(torch.rand(1, 3, 4, 4))
    mean = torch.tensor(DEFAULT_RGB_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(y, mean.expand_as(y), atol=1e-7)


def test_edsr_paper_size_parameter_count():
    cfg = ADAPTER.parse_config({"arch": "edsr", "scale": 4, "num_feat": 256, "num_block": 32, "res_scale": 0.1})
    with torch.device("meta"):
        model = ADAPTER.build(cfg)
    count = sum(p.numel() for p in model.parameters())
    c = 256
    conv = c * c * 9 + c
    expected = (3 * c * 9 + c) + 64 * conv + conv + 2 * (c * 4 * c * 9 + 4 * c) + (c * 3 * 9 + 3)
    assert count == expected
    assert abs(count - 43.1e6) / 43.1e6 < 0.01
    assert model.body[0].res_scale == 0.1


def test_edsr_layers_declare_first_and_last_dense():
    _, model = built()
    decls = ADAPTER.layers(model)
    names = [d.name for d in decls]
    assert names[0] == "conv_first" and names[-1] == "conv_last"
    assert {d.name for d in decls if not d.prunable} == {"conv_first", "conv_last"}
    assert set(names) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@pytest.mark.parametrize("section", [
    {"arch": "edsr", "scale": 5},
    {"arch": "edsr", "scale": 6},
    {"arch": "edsr", "scale": 1},
    {"arch": "edsr", "scale": "four"},
    {"arch": "edsr", "num_feats": 64},
    {"arch": "edsr", "scale": 4, "bogus": 1},
    {"arch": "edsr", "num_feat": 0},
    {"arch": "edsr", "num_block": 0},
    {"arch": "edsr", "rgb_mean": [0.4, 0.4]},
])
def test_parse_config_rejects(section):
    with pytest.raises(RecipeError) as exc:
        ADAPTER.parse_config(section)
    assert "\n" not in str(exc.value)


def test_parse_config_unknown_key_is_named():
    with pytest.raises(RecipeError, match="num_feats"):
        ADAPTER.parse_config({"arch": "edsr", "num_feats": 64})


def test_parse_config_defaults():
    cfg = ADAPTER.parse_config({"arch": "edsr"})
    assert cfg.scale == 4
    assert cfg.options["num_feat"] == 64 and cfg.options["num_block"] == 16
    assert cfg.options["rgb_mean"] == DEFAULT_RGB_MEAN


def test_official_rgb_range_1_checkpoint_loads_with_img_range_1(tmp_path):
    """EDSR-PyTorch trained with --rgb_range 1: MeanShift bias = mean (not 255 x mean). With the recipe's
    default range 255 the error names the fix; with model.img_range: 1 it loads and matches the model."""
    cfg1 = cfg_of(img_range=1.0)
    ref = ADAPTER.build(cfg1).eval()
    official = to_official(ref.state_dict(), 2, rgb_range=1.0)
    with pytest.raises(CheckpointError) as exc:
        ADAPTER.convert_state_dict(official, cfg_of())
    one_line_naming(exc.value, "trained with rgb_range 1")
    assert "set model.img_range: 1" in str(exc.value)
    path = tmp_path / "edsr_rgb1.pt"
    torch.save(official, path)
    model = load_into_fresh(path, cfg1)
    assert outputs_equal(model, ref)
