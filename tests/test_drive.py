"""The graph driver (backends.drive) and `validate --backend trt` for video graphs, with ONNX Runtime (Polygraphy's
OnnxrtRunner) standing in for TensorRT's TrtRunner: both are the same runner interface (activate / infer(feed
dict) -> dict / deactivate / get_input_metadata), so what runs here is the code path an engine takes."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml
from conftest import torchscript

from sls_deploy.backends import drive
from sls_deploy.backends.runtime import onnx_runner
from sls_deploy.config.recipe import load_recipe
from sls_deploy.models import get_adapter
from sls_deploy.onnx.export import export_onnx

torch.set_num_threads(1)  # tiny models: more threads only contend


def _with_flow(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh SpyNet predicts zero flow; give it a few pixels of non-uniform flow so warping is exercised."""
    with torch.no_grad():
        for level in model.spynet.basic_module:
            last = level.basic_module[8]
            last.weight.normal_(0.0, 0.02)
            last.bias.copy_(torch.tensor([0.05, -0.04]))
    return model


def _tiny(arch: str):
    adapter = get_adapter(arch)
    cfg = adapter.parse_config({"arch": arch, "num_feat": 8, "num_block": 1, "clip_len": 3})
    torch.manual_seed(0)
    return adapter, cfg, _with_flow(adapter.build(cfg)).eval()


def _export(arch: str, path: Path):
    adapter, cfg, model = _tiny(arch)
    spec = torchscript(adapter.export_spec(cfg))
    export_onnx(adapter.export_module(model), spec, adapter.example_input(cfg, 16, 16), path)
    return spec, model


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return {arch: (root / f"{arch}.onnx", *_export(arch, root / f"{arch}.onnx")) for arch in ("streamvsr", "basicvsr")}


def _clip(t: int, h: int = 20, w: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.rand(1, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_step_graph_driven_over_6_frames_equals_pytorch_streaming(graphs):
    path, spec, model = graphs["streamvsr"]
    clip = _clip(6)
    with torch.no_grad():
        want = model(clip).numpy()  # StreamVSR.forward steps frame by frame from a zero hidden state
    with onnx_runner(path) as runner:
        info = drive.input_info(runner)
        assert drive.graph_kind(spec, info) == drive.STEP
        got = drive.run_clip(runner, spec, clip)
    assert got.shape == want.shape == (1, 6, 3, 80, 96)
    assert float(np.abs(got - want).max()) <= 1e-4
    # the state really is carried: restarting at frame 3 (zero hidden, prev_lr = lr) gives other frames
    with onnx_runner(path) as runner:
        restarted = drive.run_clip(runner, spec, clip[:, 3:])
    assert float(np.abs(restarted - want[:, 3:]).max()) > 1e-3


def test_first_step_state_is_zero_hidden_and_prev_lr_equal_lr(graphs):
    path, spec, model = graphs["streamvsr"]
    clip = _clip(1)
    with onnx_runner(path) as runner:
        state = drive.initial_state(spec, drive.input_info(runner), clip[:, 0].numpy())
    assert set(state) == {"hidden", "prev_lr"}
    assert state["hidden"].shape == (1, 8, 20, 24) and not state["hidden"].any()  # C from the graph, H/W the frame's
    assert np.array_equal(state["prev_lr"], clip[:, 0].numpy())


def test_clip_graph_runs_windows_and_a_tail(graphs):
    path, spec, model = graphs["basicvsr"]
    clip = _clip(7)
    with torch.no_grad():  # windows of T=3: frames 0-2, 3-5, then the last 3 (4-6) of which only frame 6 is new
        want = np.concatenate([model(clip[:, 0:3]).numpy(), model(clip[:, 3:6]).numpy(),
                               model(clip[:, 4:7]).numpy()[:, 2:]], axis=1)
    with onnx_runner(path) as runner:
        assert drive.graph_kind(spec, drive.input_info(runner)) == drive.CLIP
        six = drive.run_clip(runner, spec, clip[:, :6])
        seven = drive.run_clip(runner, spec, clip)
        with pytest.raises(Exception, match="takes 3 frames per run"):
            drive.run_clip(runner, spec, clip[:, :2])
    assert six.shape == (1, 6, 3, 80, 96) and seven.shape == (1, 7, 3, 80, 96)
    assert float(np.abs(six - want[:, :6]).max()) <= 1e-4
    assert float(np.abs(seven - want).max()) <= 1e-4


class _BufferReusingRunner:
    """Returns the same output arrays from every infer, overwritten in place, as TensorRT's runner may: the driver
    must copy what it keeps (SR frames, the fed-back state)."""

    def __init__(self, inner):
        self.inner, self.buffers = inner, {}

    def activate(self):
        self.inner.activate()

    def deactivate(self):
        self.inner.deactivate()

    def get_input_metadata(self, **kwargs):
        return self.inner.get_input_metadata(**kwargs)

    def infer(self, feed):
        for k, v in self.inner.infer(feed).items():
            if k in self.buffers and self.buffers[k].shape == v.shape:
                self.buffers[k][...] = v
            else:
                self.buffers[k] = np.array(v)
        return self.buffers


def test_driver_copies_reused_output_buffers(graphs):
    path, spec, model = graphs["streamvsr"]
    clip = _clip(4)
    with torch.no_grad():
        want = model(clip).numpy()
    runner = _BufferReusingRunner(onnx_runner(path))
    runner.activate()
    try:
        got = drive.run_clip(runner, spec, clip)
    finally:
        runner.deactivate()
    assert float(np.abs(got - want).max()) <= 1e-4


# --------------------------------------------------------------------------- validate --backend trt, video bundles


def _write_clip(folder: Path, n: int, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    folder.mkdir(parents=True)
    for t in range(n):
        img = np.stack([127 + 100 * np.sin(0.2 * (xx + 2 * t) + 0.1 * yy + c) for c in range(3)], -1)
        img[6 + t:14 + t, 8 + t:18 + t] = 240
        iio.imwrite(folder / f"{t:04d}.png", np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))


def _video_bundle(root: Path, arch: str) -> tuple[Path, object]:
    """A device-side video bundle: recipe.yaml, the tiny model's FP32 graph as model.onnx, stand-in engine files."""
    clips = root / "clips"
    if not clips.exists():
        _write_clip(clips / "e", 4, 40, 48, 3)
    b = root / arch
    b.mkdir()
    raw = {"name": f"{arch}-tiny", "model": {"arch": arch, "scale": 4, "num_feat": 8, "num_block": 1, "clip_len": 3},
           "reference_output": [128, 128], "data": {"train": str(clips), "eval": str(clips), "metric_channel": "y"},
           "validate": {"sizes": [[16, 20]], "odd_size": [17, 19], "latency_warmup": 0, "latency_runs": 1},
           "engine": {"min": [1, 16, 16], "opt": [1, 16, 24], "max": [1, 20, 24]}}
    (b / "recipe.yaml").write_text(yaml.safe_dump(raw))
    _export(arch, b / "model.onnx")
    (b / "engine").mkdir()
    (b / "engine" / "model.plan").write_bytes(b"stand-in")
    (b / "engine" / "model.dense.plan").write_bytes(b"stand-in")
    return b, load_recipe(b / "recipe.yaml")


class _Noisy(_BufferReusingRunner):
    """A wrong engine: its SR output is off by a constant."""

    def infer(self, feed):
        out = dict(self.inner.infer(feed))
        out["sr"] = out["sr"] + np.float32(0.05)
        return out


@pytest.mark.parametrize("arch", ["streamvsr", "basicvsr"])
def test_trt_validate_of_a_video_bundle_with_the_ort_stand_in(tmp_path, arch):
    from sls_deploy.stages.validate_engine import validate_engine

    root, recipe = _video_bundle(tmp_path, arch)
    opened = []

    def stand_in(path):  # what TrtRunner(EngineFromBytes(path)) is on the device
        opened.append(Path(path).name)
        return onnx_runner(root / "model.onnx")

    res = validate_engine(root, recipe, "fp32", None, runs=1, open_engine=stand_in)
    assert opened == ["model.plan", "model.dense.plan"]
    assert res["passed"], res["verdict"]
    assert res["verdict"] == ("tensorrt fp32: 5 shape checks within the fp32 limit 0.05 dB; quality gate not measured "
                              "(no readable report.json: validate the bundle before packing it)")
    assert res["graph"] == ("step" if arch == "streamvsr" else "clip") and res["eval_clips"] == ["e"]
    assert res["frames_per_clip"] == 3
    rows = res["shapes"]
    assert [r["label"] for r in rows] == ["min", "opt", "max", "odd", "extra"]
    assert all(r["output_shape"] == [1, 3, 3, 4 * r["lr_hw"][0], 4 * r["lr_hw"][1]] for r in rows)
    assert all(r["max_abs"] == 0 for r in rows)  # the same graph on both sides
    lat = res["latency"][0]
    assert lat["lr_hw"] == [16, 24] and lat["frames_per_run"] == (1 if arch == "streamvsr" else 3)
    assert lat["sparse"]["runs"] == 1 and "ratio_sparse_over_dense" in lat
    assert json.loads((root / "engine" / "validate.json").read_text())["passed"]

    res = validate_engine(root, recipe, "fp32", None, runs=1,
                          open_engine=lambda p: _Noisy(onnx_runner(root / "model.onnx")))
    assert not res["passed"] and res["verdict"].startswith("tensorrt fp32 at min 16x16: PSNR drop")


def _pack_json(root: Path) -> None:
    """pack.json over the bundle's files, as `sls-deploy pack` writes it (the engine command hash-checks it)."""
    import hashlib

    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file() and p.parent.name != "engine"}
    (root / "pack.json").write_text(json.dumps({"files": files}))


@pytest.mark.parametrize("arch", ["streamvsr", "basicvsr"])
def test_engine_dry_run_of_a_video_bundle_lists_every_input(tmp_path, capsys, arch):
    from sls_deploy.cli import main

    root, _ = _video_bundle(tmp_path, arch)
    _pack_json(root)
    assert main(["engine", str(root), "--dry-run", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out.splitlines()
    if arch == "streamvsr":  # the step graph: prev_lr, lr and hidden (8 channels) in one profile, sharing H/W
        assert out[1] == ("trtexec --onnx=model.onnx --saveEngine=engine/model.plan "
                          "--minShapes=prev_lr:1x3x16x16,lr:1x3x16x16,hidden:1x8x16x16 "
                          "--optShapes=prev_lr:1x3x16x24,lr:1x3x16x24,hidden:1x8x16x24 "
                          "--maxShapes=prev_lr:1x3x20x24,lr:1x3x20x24,hidden:1x8x20x24 --memPoolSize=workspace:4096M "
                          "--timingCacheFile=engine/timing.cache --profilingVerbosity=detailed "
                          "--exportLayerInfo=engine/inspector.json --sparsity=enable --verbose")
        assert out[2] == ("polygraphy convert model.onnx --convert-to trt -o engine/model.plan "
                          "--trt-min-shapes 'prev_lr:[1,3,16,16]' 'lr:[1,3,16,16]' 'hidden:[1,8,16,16]' "
                          "--trt-opt-shapes 'prev_lr:[1,3,16,24]' 'lr:[1,3,16,24]' 'hidden:[1,8,16,24]' "
                          "--trt-max-shapes 'prev_lr:[1,3,20,24]' 'lr:[1,3,20,24]' 'hidden:[1,8,20,24]' "
                          "--pool-limit workspace:4096M --load-timing-cache engine/timing.cache "
                          "--save-timing-cache engine/timing.cache --profiling-verbosity detailed --sparse-weights")
    else:  # the clip graph: T = clip_len = 3 fixed, H/W dynamic
        assert out[1] == ("trtexec --onnx=model.onnx --saveEngine=engine/model.plan --minShapes=lr:1x3x3x16x16 "
                          "--optShapes=lr:1x3x3x16x24 --maxShapes=lr:1x3x3x20x24 --memPoolSize=workspace:4096M "
                          "--timingCacheFile=engine/timing.cache --profilingVerbosity=detailed "
                          "--exportLayerInfo=engine/inspector.json --sparsity=enable --verbose")
        assert out[2] == ("polygraphy convert model.onnx --convert-to trt -o engine/model.plan "
                          "--trt-min-shapes 'lr:[1,3,3,16,16]' --trt-opt-shapes 'lr:[1,3,3,16,24]' "
                          "--trt-max-shapes 'lr:[1,3,3,20,24]' --pool-limit workspace:4096M "
                          "--load-timing-cache engine/timing.cache --save-timing-cache engine/timing.cache "
                          "--profiling-verbosity detailed --sparse-weights")
    saved = json.loads((root / "engine" / "build.json").read_text())
    assert list(saved["settings"]["profile"]) == (["prev_lr", "lr", "hidden"] if arch == "streamvsr" else ["lr"])
    # the profile really fits the exported graph: every input named, ranks and fixed dims equal
    import onnx

    g = onnx.load(str(root / "model.onnx")).graph
    for i in g.input:
        dims = [d.dim_value or None for d in i.type.tensor_type.shape.dim]
        for shape in saved["settings"]["profile"][i.name].values():
            assert len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape)), (i.name, dims)
