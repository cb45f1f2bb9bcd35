"""Issue 24 on CPU: every PyTorch path follows the model's device, mixed precision, device-independent checkpoints,
the device resolver and its refusals, ONNX Runtime providers, out of device memory.

"Device-agnostic by construction" runs each training path with the model on a fake accelerator
(``fake_device``): tensors that report another device and hold real CPU data, with every op checked as a GPU
checks it. A tensor created on a hard-coded device next to the model's tensors fails there exactly as it would
on CUDA (``test_the_fake_device_catches_planted_bugs`` plants such bugs and watches the steps fail).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import error_line, run_cli, write_tiny_recipe, write_tiny_weights
from fake_device import FAKE, DeviceMismatch, FakeDevice, is_fake, to_fake
from sls_deploy.config.recipe import load_recipe
from sls_deploy.core.device import (Compute, ComputeSection, check_amp, model_device, resolve_compute,
                                    resolve_device, to_cpu)
from sls_deploy.core.errors import DeviceMemoryError, RecipeError, UsageError
from sls_deploy.modalities import registry as modalities
from sls_deploy.training.loop import TrainConfig, train

# the fake tensors report the meta device, and load_state_dict warns (then copies all the same) on a meta parameter
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")


# --------------------------------------------------------------------------- helpers


def tiny_model(recipe_path: Path, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return load_recipe(recipe_path).build_model()


def sampler(recipe_path: Path, seed: int = 1):
    r = load_recipe(recipe_path)
    return modalities.sampler(r, "image", r.data_train, seed)


def plain_cpu(state) -> bool:
    """Every tensor in a nested checkpoint is an ordinary CPU tensor."""
    if isinstance(state, torch.Tensor):
        return type(state) is torch.Tensor and state.device.type == "cpu"
    if isinstance(state, dict):
        return all(plain_cpu(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(plain_cpu(v) for v in state)
    return True


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def all_fake(model: nn.Module) -> bool:
    return all(is_fake(t) for t in list(model.parameters()) + list(model.buffers()))


# --------------------------------------------------------------------------- the fake device itself


def test_the_fake_device_mixes_like_a_gpu():
    conv = to_fake(nn.Conv2d(3, 4, 3, padding=1))
    with FakeDevice():
        x = torch.rand(1, 3, 8, 8).to(model_device(conv))
        y = conv(x)
        follows = y * torch.ones(4, 1, 1, device=model_device(conv))  # created where the model is: fine
        scalar = y * torch.tensor(2.0)  # a 0-dim CPU tensor mixes, as with CUDA
        with pytest.raises(DeviceMismatch, match=r"a \(4, 1, 1\) tensor on cpu"):
            y * torch.ones(4, 1, 1)  # hard-coded CPU tensor
        with pytest.raises(DeviceMismatch):
            conv(torch.rand(1, 3, 8, 8))  # a CPU batch into the model
        with pytest.raises(RuntimeError, match="numpy"):
            y.detach().numpy()  # as on CUDA: .cpu() first
        back = follows.detach().cpu()
    assert is_fake(y) and is_fake(follows) and is_fake(scalar) and not is_fake(back)
    assert torch.equal(back, follows.elem.detach())  # real values underneath


# --------------------------------------------------------------------------- one training step of every path


def test_finetune_step_on_the_model_device_writes_cpu_checkpoints(tmp_path, tiny_images):
    from sls_deploy.pruning.nm import MaskSet, nm_mask

    recipe = write_tiny_recipe(tmp_path, tiny_images)
    model = to_fake(tiny_model(recipe))
    ckpt = tmp_path / "ft.ckpt"
    with FakeDevice():
        masks = MaskSet({"body.0.conv1": nm_mask(model.get_submodule("body.0.conv1").weight, 2, 4)})
        result = train(model, sampler(recipe), TrainConfig(steps=2, checkpoint_every=2), checkpoint=ckpt,
                       controller=masks, progress=False)
    assert result.steps_done == 2 and torch.isfinite(torch.tensor(result.final_loss))
    assert all_fake(model)
    w = model.get_submodule("body.0.conv1").weight.elem
    assert int((w.reshape(w.shape[0], -1, 4, *w.shape[2:]) != 0).sum(2).max()) <= 2  # 2:4 held on the device
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and plain_cpu(state)


def test_sls_search_step_on_the_model_device(tmp_path, tiny_images):
    from sls_deploy.pruning.nm.search import search_sls, split_layers
    from sls_deploy.training.loop import TrainConfig, train

    recipe_path = write_tiny_recipe(tmp_path, tiny_images)
    recipe = load_recipe(recipe_path)
    model = to_fake(tiny_model(recipe_path))
    with FakeDevice():
        split = split_layers(recipe, model, 4, "none")
        plan, info = search_sls(recipe, model, split, 0.6, recipe.sls, sampler(recipe_path), max_steps=2, lr=1e-3,
                                seed=0, train=lambda m, d, controller, desc, **cfg: train(
                                    m, d, TrainConfig(**cfg), checkpoint=tmp_path / "s.ckpt", resume=True,
                                    run_key="k", controller=controller, desc=desc, progress=False))
    assert info["steps"] >= 1 and plan.layers and all_fake(model) and plan.ratio <= 0.6 + 1e-9


def test_ssl_scales_step_on_the_model_device(tmp_path, tiny_images):
    from sls_deploy.pruning.channels.scales import ChannelScales

    recipe_path = write_tiny_recipe(tmp_path, tiny_images)
    recipe = load_recipe(recipe_path)
    model = to_fake(tiny_model(recipe_path))
    groups = recipe.adapter.channel_groups(model)
    with FakeDevice():
        scales = ChannelScales(model, groups, reg=1e-3, delta=1e-3, grow_every=1, cap=1.0, lr=1e-2, align=0.1)
        scales.mark({g.name: torch.arange(4) for g in groups})
        train(model, sampler(recipe_path), TrainConfig(steps=2, checkpoint_every=1), checkpoint=tmp_path / "c.ckpt",
              controller=scales, progress=False)
    assert scales.folded_importance and all(not is_fake(v) for v in scales.folded_importance.values())
    assert all_fake(model) and plain_cpu(torch.load(tmp_path / "c.ckpt", weights_only=True))


def test_fisher_saliency_on_the_model_device(tmp_path, tiny_images):
    from sls_deploy.pruning.channels.saliency import fisher_saliency

    recipe_path = write_tiny_recipe(tmp_path, tiny_images)
    recipe = load_recipe(recipe_path)
    cpu_model = tiny_model(recipe_path)
    model = to_fake(tiny_model(recipe_path))
    groups = recipe.adapter.channel_groups(model)
    batch = sampler(recipe_path).batch()
    on_cpu = fisher_saliency(cpu_model, groups, [batch], nn.functional.l1_loss)
    with FakeDevice():
        on_dev = fisher_saliency(model, groups, [batch], nn.functional.l1_loss)
    assert set(on_dev) == set(on_cpu)
    for k in on_cpu:  # CPU results, equal to the CPU model's (the fake device computes on the CPU)
        assert not is_fake(on_dev[k])
        torch.testing.assert_close(on_dev[k], on_cpu[k], rtol=1e-6, atol=0)


def test_unit_masks_joint_step_on_the_model_device(tmp_path, tiny_images):
    from sls_deploy.adaptive.nested import train_shared

    recipe_path = write_tiny_recipe(tmp_path, tiny_images)
    recipe = load_recipe(recipe_path)
    model = to_fake(tiny_model(recipe_path))
    groups = recipe.adapter.channel_groups(model)
    members = {"small": {g.name: torch.arange(4) for g in groups}, "large": {g.name: torch.arange(8) for g in groups}}
    with FakeDevice():
        result = train_shared(model, groups, members, sampler(recipe_path), TrainConfig(steps=2, checkpoint_every=0),
                              progress=False)
    assert result.steps_done == 2 and all_fake(model)


def test_routers_fit_and_choose_on_the_model_device():
    from sls_deploy.adaptive.patchset import PatchSet
    from sls_deploy.adaptive.routers import ROUTERS, make_router

    g = torch.Generator().manual_seed(0)
    ps = PatchSet(torch.rand(24, 3, 16, 16, generator=g), torch.rand(24, 3, generator=g) * 50 + 1,
                  torch.tensor([0.1, 0.5, 1.0]))
    fit, calib = ps.split(0.75, 0)
    chosen = {}
    with FakeDevice():
        fit_d, calib_d = fit.to(FAKE), calib.to(FAKE)
        for name in ROUTERS:
            r = make_router(name)
            r.fit(fit_d, calib_d, 0.5, seed=0, steps=2)
            assert all(is_fake(t) for t in list(r.module().parameters()) + list(r.module().buffers()))
            chosen[name] = r.choose(calib.lr)  # CPU patches in, CPU choices out
    for name, c in chosen.items():
        assert not is_fake(c) and c.shape == (calib.lr.shape[0],) and int(c.max()) < 3


def test_temporal_distillation_step_on_the_model_device():
    from sls_deploy.models.basicvsr import StreamVSR
    from sls_deploy.training.distill import Controllers, temporal_finetuning

    class Clips:
        g = torch.Generator().manual_seed(0)

        def batch(self):
            return torch.rand(1, 3, 3, 8, 8, generator=self.g), torch.rand(1, 3, 3, 32, 32, generator=self.g)

        def state(self):
            return {}

        def set_state(self, s):
            pass

    torch.manual_seed(0)
    teacher = to_fake(StreamVSR(num_feat=8, num_block=1, spynet=False))
    student = to_fake(StreamVSR(num_feat=8, num_block=1, spynet=False))
    with FakeDevice():
        tf = temporal_finetuning(teacher, ("forward_trunk",), 0.5)
        train(student, Clips(), TrainConfig(steps=1), controller=Controllers(tf), progress=False)
    assert tf.last["temporal finetuning"] > 0 and all_fake(student)


def test_search_finetune_and_torch_validate_of_a_bundle_on_the_model_device(tmp_path, tiny_images, monkeypatch,
                                                                          capsys):
    """The stages themselves: ssl search (learned scales, slicing), finetune, and validate's PyTorch reference,
    with Compute(device=<fake>); then the manifest says where they ran. Then `upscale --backend torch --device`
    (``cuda`` standing for the fake accelerator) writes the same image as on the CPU, with the model there."""
    from sls_deploy.config.settings import Settings
    from sls_deploy.stages.build import start
    from sls_deploy.stages.export import run_export
    from sls_deploy.stages.finetune import run_finetune
    from sls_deploy.stages.search import run_search
    from sls_deploy.stages.validate import run_validate
    from sls_deploy.stages.validate_common import ValidateOptions

    recipe_path = write_tiny_recipe(tmp_path, tiny_images)
    recipe = load_recipe(recipe_path)
    base = write_tiny_weights(recipe_path, tmp_path / "w.safetensors")
    s = Settings.resolve(recipe, budget=0.6, method="ssl", steps=4, weights=str(base))
    with FakeDevice():
        run = start(recipe, s, tmp_path / "b", lambda m: None, False, Compute(device=FAKE))
        run_search(run)
        run_finetune(run)
    run_export(dataclasses.replace(run, compute=Compute()))  # torch.onnx tracing runs outside the fake mode
    with FakeDevice():
        rep = run_validate(run, ValidateOptions(backend="torch", latency=False))
    from sls_deploy.modalities.image import evaluate, torch_infer
    from sls_deploy.pruning.registry import load_plan
    from sls_deploy.backends.loading import load_model, plan_widths

    pruned = load_model(recipe, tmp_path / "b" / "model.safetensors", plan_widths(load_plan(tmp_path / "b" / "plan.json")))
    on_cpu = evaluate(torch_infer(pruned), sorted(tiny_images["eval"].iterdir()), recipe.scale, "y")
    assert rep["psnr"]["pruned"] == on_cpu.psnr and rep["ssim"]["pruned"] == on_cpu.ssim
    stages = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
    for name in ("search", "finetune", "validate"):
        assert stages[name]["compute"]["device"] == "meta" and stages[name]["compute"]["amp"] == "off"
    assert "compute" not in stages["export"]
    assert not list((tmp_path / "b").rglob("*.ckpt"))

    from sls_deploy.core import device as device_mod
    from sls_deploy.backends import loading as models

    resolve, build_module, used = device_mod.inference_device, models.bundle_module, []
    monkeypatch.setattr(device_mod, "inference_device",
                        lambda sec, dev=None: FAKE if dev == "cuda" else resolve(sec, dev))
    monkeypatch.setattr(models, "bundle_module", lambda *a, **kw: used.append(build_module(*a, **kw)) or used[-1])
    picture = sorted(tiny_images["eval"].iterdir())[0]
    outs = {}
    for dev in ("cpu", "cuda"):
        with FakeDevice() if dev == "cuda" else contextlib.nullcontext():
            code, _, err = run_cli(capsys, "upscale", tmp_path / "b", picture, "-o", tmp_path / dev, "--backend",
                                   "torch", "--device", dev, "--no-progress")
        assert code == 0, err
        outs[dev] = (tmp_path / dev / picture.name).read_bytes()
    assert [model_device(m).type for m in used] == ["cpu", FAKE.type] and outs["cpu"] == outs["cuda"]


@pytest.mark.parametrize("bug", ["sls gates left on the cpu", "luma weights on the cpu", "batch left on the cpu"])
def test_the_fake_device_catches_planted_bugs(tmp_path, tiny_images, monkeypatch, bug):
    """Each of these hard-coded-device bugs (the code before this issue) fails its one-step test."""
    from sls_deploy.adaptive import patchset, routers
    from sls_deploy.pruning.nm import sls
    from sls_deploy.training import loop

    if bug == "sls gates left on the cpu":
        attach = sls.SLSSearch.attach

        def cpu_gates(self, model):
            attach(self, model)
            self.gates.to("cpu")

        monkeypatch.setattr(sls.SLSSearch, "attach", cpu_gates)
        run = lambda: test_sls_search_step_on_the_model_device(tmp_path, tiny_images)  # noqa: E731
    elif bug == "luma weights on the cpu":
        def cpu_luma(x):
            w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype).view(1, 3, 1, 1)
            return (x.clamp(0, 1) * w).sum(1, keepdim=True) + 16.0

        monkeypatch.setattr(patchset, "luma", cpu_luma)
        monkeypatch.setattr(routers, "luma", cpu_luma)
        run = test_routers_fit_and_choose_on_the_model_device
    else:
        monkeypatch.setattr(loop, "to_device", lambda batch, device: batch)
        run = lambda: test_finetune_step_on_the_model_device_writes_cpu_checkpoints(tmp_path, tiny_images)  # noqa: E731
    with pytest.raises(DeviceMismatch):
        run()


# --------------------------------------------------------------------------- checkpoints and graphs anywhere


def _interrupted_at(step: int):
    def on_step(done, loss):
        if done == step:
            raise KeyboardInterrupt

    return on_step


@pytest.mark.parametrize("first, second", [("fake", "cpu"), ("cpu", "fake")])
def test_a_run_interrupted_on_one_device_resumes_on_the_other_to_the_same_weights(tmp_path, tiny_images, first,
                                                                                  second):
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    cfg = TrainConfig(steps=4, lr=1e-3, checkpoint_every=0, seed=3)
    reference = tiny_model(recipe)
    train(reference, sampler(recipe), cfg, progress=False)

    def run(where: str, **kw):
        model = tiny_model(recipe)  # the same initial weights, built on the CPU
        if where == "fake":
            to_fake(model)
            with FakeDevice():
                train(model, sampler(recipe), cfg, checkpoint=tmp_path / "x.ckpt", resume=True, progress=False, **kw)
        else:
            train(model, sampler(recipe), cfg, checkpoint=tmp_path / "x.ckpt", resume=True, progress=False, **kw)
        return model

    with pytest.raises(KeyboardInterrupt):
        run(first, on_step=_interrupted_at(2))
    assert plain_cpu(torch.load(tmp_path / "x.ckpt", weights_only=True))
    resumed = run(second)
    a, b = weights(reference), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_and_graphs_do_not_depend_on_the_training_device(tmp_path, tiny_images):
    from sls_deploy.core.checkpoints import save_weights
    from sls_deploy.onnx.export import export_onnx
    from sls_deploy.backends.loading import graph_spec

    recipe_path = write_tiny_recipe(tmp_path, tiny_images)
    recipe = load_recipe(recipe_path)
    cpu, dev = tiny_model(recipe_path), to_fake(tiny_model(recipe_path))
    example = recipe.adapter.example_input(recipe.model, 8, 8)
    save_weights(cpu, tmp_path / "cpu.safetensors")
    save_weights(dev, tmp_path / "dev.safetensors")
    assert (tmp_path / "cpu.safetensors").read_bytes() == (tmp_path / "dev.safetensors").read_bytes()
    export_onnx(recipe.adapter.export_module(cpu), graph_spec(recipe), example, tmp_path / "cpu.onnx")
    export_onnx(recipe.adapter.export_module(dev), graph_spec(recipe), example, tmp_path / "dev.onnx")
    assert (tmp_path / "cpu.onnx").read_bytes() == (tmp_path / "dev.onnx").read_bytes()
    assert all_fake(dev)  # exported from a CPU copy: the model stays where it is
    assert plain_cpu(to_cpu({"a": [dev.conv_first.weight], "b": (torch.zeros(2),)}))


# --------------------------------------------------------------------------- mixed precision on the CPU


def test_bf16_autocast_trains_on_cpu_and_resumes_exactly(tmp_path, tiny_images):
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    cfg = TrainConfig(steps=4, lr=1e-3, checkpoint_every=0, seed=1, amp="bf16")
    fp32, bf16, resumed = tiny_model(recipe), tiny_model(recipe), tiny_model(recipe)
    train(fp32, sampler(recipe), dataclasses.replace(cfg, amp="off"), progress=False)
    result = train(bf16, sampler(recipe), cfg, progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))
    a, b = weights(fp32), weights(bf16)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast did run the convs in bfloat16
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(recipe), sampler(recipe), cfg, checkpoint=tmp_path / "a.ckpt", resume=True, progress=False,
              on_step=_interrupted_at(2))
    train(resumed, sampler(recipe), cfg, checkpoint=tmp_path / "a.ckpt", resume=True, progress=False)
    c = weights(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_fp16_gradient_scaler_state_is_checkpointed_and_restored(tmp_path, tiny_images):
    """fp16 needs a GPU at the command line (refused on a CPU); the loop's scaler bookkeeping runs anywhere."""
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    cfg = TrainConfig(steps=4, lr=1e-3, checkpoint_every=1, seed=1, amp="fp16")
    train(tiny_model(recipe), sampler(recipe), cfg, checkpoint=tmp_path / "u.ckpt", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(recipe), sampler(recipe), cfg, checkpoint=tmp_path / "r.ckpt", resume=True, progress=False,
              on_step=_interrupted_at(2))
    assert torch.load(tmp_path / "r.ckpt", weights_only=True)["scaler"]["_growth_tracker"] == 2
    train(tiny_model(recipe), sampler(recipe), cfg, checkpoint=tmp_path / "r.ckpt", resume=True, progress=False)
    u, r = (torch.load(tmp_path / f, weights_only=True) for f in ("u.ckpt", "r.ckpt"))
    assert u["scaler"] == r["scaler"] and u["scaler"]["_growth_tracker"] == 4
    assert all(torch.equal(u["model"][k], r["model"][k]) for k in u["model"])


# --------------------------------------------------------------------------- the resolver


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with two GPUs would answer (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_device_choices_on_a_two_gpu_machine(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # torchrun: LOCAL_RANK picks the GPU
    assert resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="under torchrun would put every rank on one GPU"):
        resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UsageError, match="LOCAL_RANK 2: this machine has 2 CUDA.*--nproc-per-node at most that"):
        resolve_device("cuda")


def test_device_and_amp_refusals_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for text in ("cuda", "cuda:0"):
        with pytest.raises(UsageError, match=f"--device {text}: CUDA is not available here"):
            resolve_device(text)
    for bad in ("cuda:x", "gpu", "", "CUDA", "cuda:", "cuda:-1", "cpu:0", "cuda:1:2", "x" * 10_000):
        with pytest.raises(UsageError, match="--device must be auto, cpu, cuda or cuda:N") as e:
            resolve_device(bad)
        assert len(str(e.value)) < 200
    with pytest.raises(UsageError, match="--amp fp16 needs a CUDA device .*use --amp bf16 or off"):
        check_amp("fp16", torch.device("cpu"))
    assert check_amp("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match="the recipe's compute.device cuda: CUDA is not available"):
        resolve_compute(ComputeSection(device="cuda"))
    with pytest.raises(UsageError, match="the recipe's compute.amp fp16 needs a CUDA device"):
        resolve_compute(ComputeSection(amp="fp16"))
    c = resolve_compute(ComputeSection(amp="bf16", channels_last="cuda"), device="cpu")
    assert c == Compute(torch.device("cpu"), "bf16", False)
    assert resolve_compute(channels_last="on").channels_last
    rec = c.record()
    assert rec["device"] == "cpu" and rec["device_name"] == "cpu" and rec["amp"] == "bf16"
    assert rec["torch"] == torch.__version__ and rec["cuda"] == torch.version.cuda


def test_recipe_compute_section(tmp_path, tiny_images):
    path = write_tiny_recipe(tmp_path, tiny_images)
    assert load_recipe(path).compute == ComputeSection()
    text = path.read_text()
    path.write_text(text + "compute:\n  device: cuda:1\n  amp: off\n  channels_last: on\n")  # YAML's off/on
    r = load_recipe(path)
    assert r.compute == ComputeSection("cuda:1", "off", "on")
    (tmp_path / "x").mkdir()
    assert r.digest() == load_recipe(write_tiny_recipe(tmp_path / "x", tiny_images)).digest()  # not in run keys
    for bad, fragment in (("device: tpu", "compute.device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
                          ("amp: fp8", "compute.amp must be one of off, bf16, fp16, not 'fp8'"),
                          ("channels_last: 3", "compute.channels_last must be one of off, on, cuda, not 3"),
                          ("gpus: 2", "unknown recipe key 'compute.gpus'")):
        path.write_text(text + f"compute:\n  {bad}\n")
        with pytest.raises(RecipeError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
            load_recipe(path)


# --------------------------------------------------------------------------- ONNX Runtime providers


def test_providers_follow_the_device(monkeypatch):
    from sls_deploy.backends import providers

    assert providers.providers_for(None) == ["CPUExecutionProvider"]
    assert providers.providers_for(torch.device("cuda", 1)) == ["CPUExecutionProvider"]  # no onnxruntime-gpu here
    monkeypatch.setattr(providers, "available", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers.providers_for(torch.device("cuda", 1)) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                                "CPUExecutionProvider"]
    assert providers.providers_for("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert providers.providers_for("cpu") == ["CPUExecutionProvider"]


def test_every_onnx_runtime_session_gets_its_providers_from_one_place():
    import sls_deploy

    root = Path(sls_deploy.__file__).parent
    naming = [str(p.relative_to(root)) for p in root.rglob("*.py")
              if "CPUExecutionProvider" in p.read_text() and p.name != "providers.py"]
    opening = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if "InferenceSession(" in p.read_text() and p.name != "sessions.py"]  # on providers.py's providers
    assert naming == [] and opening == []


# --------------------------------------------------------------------------- out of device memory


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_out_of_memory_is_one_line_naming_batch_patch_and_keeps_the_checkpoint(tmp_path, tiny_images, monkeypatch,
                                                                                error):
    from sls_deploy.training import loop

    recipe = write_tiny_recipe(tmp_path, tiny_images)
    calls = {"n": 0}
    real = loop.F.l1_loss

    def l1_then_oom(a, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return real(a, b)

    monkeypatch.setattr(loop.F, "l1_loss", l1_then_oom)
    ckpt = tmp_path / "o.ckpt"
    with pytest.raises(DeviceMemoryError) as e:
        train(tiny_model(recipe), sampler(recipe), TrainConfig(steps=5, checkpoint_every=2), checkpoint=ckpt,
              progress=False, desc="finetune")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cpu out of memory at step 3 of finetune on cpu (batch 2 x LR patch 8x8): lower "
                          "finetune.batch_size or finetune.lr_patch in the recipe")
    assert f"the last checkpoint (step 2, {ckpt}) is kept" in msg
    assert torch.load(ckpt, weights_only=True)["step"] == 2


def test_other_runtime_errors_pass_through_the_loop(tmp_path, tiny_images, monkeypatch):
    from sls_deploy.training import loop

    recipe = write_tiny_recipe(tmp_path, tiny_images)

    def broken(a, b):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(loop.F, "l1_loss", broken)
    with pytest.raises(RuntimeError, match="^shapes do not match$"):
        train(tiny_model(recipe), sampler(recipe), TrainConfig(steps=2), progress=False)


def test_out_of_memory_in_train_command_exits_1_with_one_line(tmp_path, tiny_images, monkeypatch, capsys):
    from sls_deploy.training import loop

    recipe = write_tiny_recipe(tmp_path, tiny_images)

    def oom(a, b):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(loop.F, "l1_loss", oom)
    out = tmp_path / "w.safetensors"
    code, _, err = run_cli(capsys, "train", "--recipe", recipe, "--out", out, "--no-progress", "--device", "cpu")
    line = error_line(err)
    assert code == 1 and "train.batch_size or train.lr_patch" in line and "no checkpoint was written yet" in line
    assert not out.exists()


# --------------------------------------------------------------------------- the command line


def test_device_refusals_at_the_command_line_write_nothing(tmp_path, tiny_images, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    weights_file = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cuda = torch.cuda.is_available()
    cases = [(["build", "--recipe", recipe, "--weights", weights_file, "--budget", "0.5", "--out", "b",
               "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, not 'cuda:x'"),
             (["train", "--recipe", recipe, "--out", "t.safetensors", "--amp", "fp8"], "Invalid value for '--amp'"),
             (["search", "--recipe", recipe, "--weights", weights_file, "--budget", "0.5", "--out", "s",
               "--device", "tpu"], "--device must be")]
    if not cuda:
        cases += [(["build", "--recipe", recipe, "--weights", weights_file, "--budget", "0.5", "--out", "b",
                    "--device", "cuda"], "--device cuda: CUDA is not available here"),
                  (["train", "--recipe", recipe, "--out", "t.safetensors", "--device", "cuda:0"],
                   "--device cuda:0: CUDA is not available here"),
                  (["build", "--recipe", recipe, "--weights", weights_file, "--budget", "0.5", "--out", "b",
                    "--amp", "fp16"], "--amp fp16 needs a CUDA device"),
                  (["train", "--recipe", recipe, "--out", "t.safetensors", "--amp", "fp16"],
                   "--amp fp16 needs a CUDA device")]
    for args, fragment in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and fragment in error_line(err), (args, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_build_records_where_it_ran_and_finetune_moves_devices(tmp_path, tiny_images, capsys):
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    weights_file = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "build", "--recipe", recipe, "--weights", weights_file, "--budget", "0.6",
                           "--method", "oneshot", "--precision", "fp32", "--out", out, "--no-progress",
                           "--device", "cpu", "--amp", "bf16")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    ft = m["stages"]["finetune"]["compute"]
    assert (ft["device"], ft["device_name"], ft["amp"], ft["torch"]) == ("cpu", "cpu", "bf16", torch.__version__)
    assert "cuda" in ft and m["stages"]["validate"]["compute"]["amp"] == "off"  # validate evaluates in FP32
    rep = json.loads((out / "report.json").read_text())
    assert rep["latency"]["provider"] == "CPUExecutionProvider" and rep["latency"]["device"] == "cpu"
    assert "(CPUExecutionProvider on cpu)" in (out / "report.md").read_text()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".sls-deploy.lock"}
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "finetune", out, "--device", "cuda")
        assert code == 2 and "CUDA is not available" in error_line(err)
        code, _, err = run_cli(capsys, "validate", out, "--device", "cuda:1")
        assert code == 2 and "CUDA is not available" in error_line(err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".sls-deploy.lock"} == files
    sd = load_file(str(out / "model.safetensors"))
    assert all(v.device.type == "cpu" for v in sd.values())


def test_process_group_backends(monkeypatch):
    """gloo without CUDA; with CUDA both ("cpu:gloo,cuda:nccl"): NCCL for a model on the GPU, gloo for one on
    the CPU and for the object exchanges."""
    from sls_deploy.core import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: seen.update(b=backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.update(d=i))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_from_env() and seen == {"b": "gloo"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.init_from_env() and seen == {"b": "cpu:gloo,cuda:nccl", "d": 1}


def test_train_under_torchrun_draws_a_stream_per_rank_and_only_rank_0_writes(tmp_path, tiny_images, monkeypatch):
    from sls_deploy.core import distributed
    from sls_deploy.modalities import image as image_modality
    from sls_deploy.training import base

    seeds = []
    real = image_modality.PatchSampler

    def recording(*a, **kw):
        seeds.append(kw["seed"])
        return real(*a, **kw)

    monkeypatch.setattr(image_modality, "PatchSampler", recording)  # the image modality's sampler
    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_images))
    out = tmp_path / "w.safetensors"
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert base.train_base(recipe, out, steps=1, seed=5, progress=False) == {}
    assert seeds == [1005] and not out.exists() and not list(tmp_path.glob("*.ckpt"))
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    assert base.train_base(recipe, out, steps=1, seed=5, progress=False)["steps"] == 1
    assert seeds == [1005, 5] and out.is_file()
