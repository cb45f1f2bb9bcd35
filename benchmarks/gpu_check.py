#!/usr/bin/env python3
"""The GPU check (issue 24): what a CUDA machine must show, in one run of at most ~8 minutes on one H200.

Sections, in order (each one's result is written to OUT/gpu_check.json as soon as it ends, so a run cut short
keeps what it measured; a section that would not fit the remaining --budget-s is recorded as skipped):

1. env: GPU name, memory, capability, torch / CUDA / cuDNN / NCCL versions, bf16 support, ONNX Runtime providers.
2. throughput: EDSR-baseline x4 trained by sls-deploy's own loop (training.loop.train, batches moved by it) at
   LR patch 48, batch 16 (BasicSR's settings), FP32, AMP bf16 and AMP fp16 (with the gradient scaler), each with
   and without channels_last: steps/s and images/s over --throughput-steps timed steps after 5 warm-up steps
   (the loop reads the loss every step, so each step is complete when it is timed), peak GPU memory. Beside
   them BasicSR's own training step (train_scale.basicsr_step) on the same batches, FP32 and bf16, when basicsr
   imports; else "not measured (BasicSR not installed)".
3. build: `sls-deploy build --model edsr --budget 0.4 --device cuda --steps N` (N = --build-steps, the quick
   start's 1500 scaled down) as a subprocess: exit code, seconds per stage, PSNR, the manifest's compute record,
   the latency's provider.
4. resume: one one-shot 2:4 plan of EDSR finetuned --resume-steps steps five ways: uninterrupted on the GPU,
   uninterrupted on the CPU, interrupted (Ctrl-C semantics) halfway on the GPU and resumed on the CPU, the other
   way round, and interrupted and resumed on the GPU. Reports max |weight difference| of each against the
   uninterrupted runs (GPU and CPU convolutions differ in rounding, so GPU<->CPU is "within tolerance": the
   difference is compared with the GPU-vs-CPU difference of the uninterrupted runs; GPU->GPU bit-identical where
   cuDNN is deterministic), and that every tensor in a checkpoint written on the GPU loads as a CPU tensor.
5. oom: two ordinary training steps (a checkpoint after each), then a batch far beyond the GPU's memory: the run
   must stop with sls-deploy's one-line message naming the batch and patch, the step-2 checkpoint kept.
6. torchrun: `torchrun --standalone --nproc-per-node 1` of an SLS search and finetune with --device cuda
   (LOCAL_RANK 0); with 2 or more GPUs the same on 2 GPUs (NCCL); and 2 ranks on the CPU (--device cpu, a few
   steps) on this CUDA machine, whose process group is "cpu:gloo,cuda:nccl".

Without CUDA it stops at once: one line on stderr, exit 2, nothing written. --cpu-dry-run runs the plumbing on the
CPU instead (tests; no GPU figures). Needs this benchmarks/ folder, torch (a CUDA build) and sls-deploy with its
dependencies: the installed package if there is one, else the checkout this script lies in (the build and
torchrun subprocesses import the same one and run in the scratch folder). Nothing else: no TensorRT, no
onnxruntime-gpu (ONNX Runtime then runs on its CPU provider and the report says so), no test files.

    python benchmarks/gpu_check.py --out OUT [--budget-s 480] [--build-steps 600] [--skip SECTION ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import importlib.util

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("sls_deploy") is None:  # not installed: this checkout's package (run from a clone)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import sls_deploy  # noqa: E402

# where the sls_deploy this process runs comes from: the subprocesses (build, torchrun) import the same one
PACKAGE_PARENT = Path(sls_deploy.__file__).resolve().parent.parent

SECTIONS = ("env", "throughput", "build", "resume", "oom", "torchrun")
# rough upper bounds of each section's seconds on one H200 with 16 cores (a section runs only if it fits)
ESTIMATE_S = {"env": 5, "throughput": 80, "build": 150, "resume": 90, "oom": 40, "torchrun": 120}
CPU_TORCHRUN_STEPS = 10  # the 2-rank CPU run: a few steps are enough to exercise gloo in the mixed group
RESULT = "gpu_check.json"


class Usage(Exception):
    """A bad argument (exit 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json (created; $OUT on the device)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this (default 480)")
    ap.add_argument("--build-steps", type=int, default=600, help="--steps of the build (default 600)")
    ap.add_argument("--resume-steps", type=int, default=40, help="finetune steps of the resume round trip (default 40)")
    ap.add_argument("--torchrun-steps", type=int, default=40, help="--steps of the torchrun search (default 40)")
    ap.add_argument("--throughput-steps", type=int, default=50, help="timed steps per throughput row (default 50)")
    ap.add_argument("--patch", type=int, default=48, help="LR patch of the throughput rows (default 48)")
    ap.add_argument("--batch", type=int, default=16, help="batch of the throughput rows (default 16)")
    ap.add_argument("--oom-batch", type=int, default=1024, help="batch of the oom section (default 1024)")
    ap.add_argument("--oom-patch", type=int, default=160, help="LR patch of the oom section (default 160)")
    ap.add_argument("--skip", action="append", default=[], metavar="SECTION",
                    help=f"leave a section out (repeatable): {', '.join(SECTIONS)}")
    ap.add_argument("--recipe", type=Path, help="recipe instead of --model edsr (with --weights; for dry runs)")
    ap.add_argument("--weights", type=Path, help="base weights for --recipe")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the plumbing on the CPU (tests; no GPU figures)")
    args = ap.parse_args(argv)
    bad = [s for s in args.skip if s not in SECTIONS]
    if bad:
        ap.error(f"--skip {bad[0]!r}: sections are {', '.join(SECTIONS)}")
    for name in ("build_steps", "resume_steps", "torchrun_steps", "throughput_steps", "patch", "batch", "oom_batch",
                 "oom_patch"):
        if getattr(args, name) < (2 if name == "resume_steps" else 1):
            ap.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'resume_steps' else 1}")
    if not args.budget_s > 0:
        ap.error("--budget-s must be > 0")
    if (args.recipe is None) != (args.weights is None):
        ap.error("--recipe and --weights go together")
    return args


# --------------------------------------------------------------------------- helpers


def child_env() -> dict:
    """The environment of a subprocess: it imports the sls_deploy this process imported (an installed package
    needs nothing; a source folder goes on PYTHONPATH). Children run in the scratch folder, never in a checkout,
    whose sls_deploy ``python -m`` would otherwise pick up first."""
    env = dict(os.environ)
    if not _installed():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p)
    return env


def _installed() -> bool:
    import sysconfig

    sites = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    return PACKAGE_PARENT in sites


def cli(*args, cwd: Path, timeout: float = 600) -> dict:
    """`sls-deploy ARGS` in a subprocess: exit code, seconds, stdout, the stderr's last lines."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sls_deploy.cli", *map(str, args)], capture_output=True, text=True,
                       env=child_env(), timeout=timeout, cwd=cwd)
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "stdout": p.stdout,
            "stderr_tail": p.stderr.strip().splitlines()[-6:]}


def torchrun(nproc: int, *args, cwd: Path, timeout: float = 600, threads: int | None = None) -> dict:
    t0 = time.perf_counter()
    env = child_env() | ({"OMP_NUM_THREADS": str(threads)} if threads else {})  # torchrun's default is 1
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                        "-m", "sls_deploy.cli", *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=cwd)
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "stderr_tail": p.stderr.strip().splitlines()[-6:]}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


class Ctx:
    """What every section gets: the arguments, the device of the "GPU" legs, the scratch folder, model options."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.dev = "cpu" if args.cpu_dry_run else "cuda"
        self.model_args = (["--recipe", args.recipe.resolve(), "--weights", args.weights.resolve()] if args.recipe
                           else ["--model", "edsr"])

    def recipe(self):
        from sls_deploy.config.recipe import load_recipe, recipe_for_model

        return load_recipe(self.args.recipe if self.args.recipe else recipe_for_model("edsr"))


# --------------------------------------------------------------------------- sections


def section_env(ctx: Ctx) -> dict:
    import onnxruntime as ort

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
           "cpu_count": os.cpu_count(), "device": ctx.dev}
    if ctx.dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   bf16=torch.cuda.is_bf16_supported(), nccl=_nccl_version())
    out["passed"] = True
    return out


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # not built with NCCL
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


class Batches:
    """A fixed set of random batches, drawn in turn (the loop moves each to the model's device)."""

    def __init__(self, n: int, batch: int, patch: int, scale: int, pin: bool):
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.rand(batch, 3, patch, patch, generator=g),
                       torch.rand(batch, 3, patch * scale, patch * scale, generator=g)) for _ in range(n)]
        if pin:
            self.items = [(a.pin_memory(), b.pin_memory()) for a, b in self.items]
        self.i = 0

    def batch(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]

    def state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])


def section_throughput(ctx: Ctx) -> dict:
    from sls_deploy.core.device import check_amp
    from sls_deploy.training.loop import TrainConfig, train

    recipe, a = ctx.recipe(), ctx.args
    device = torch.device(ctx.dev)
    batches = Batches(4, a.batch, a.patch, recipe.scale, pin=device.type == "cuda")
    warmup, rows = (1 if a.cpu_dry_run else 5), []
    for amp in ("off", "bf16", "fp16"):
        for cl in (False, True):
            row = {"amp": "fp32" if amp == "off" else amp, "channels_last": cl, "lr_patch": a.patch, "batch": a.batch}
            try:
                check_amp(amp, device)
            except Exception as e:
                rows.append(row | {"steps_per_s": None, "images_per_s": None, "note": f"not run: {e}"})
                continue
            torch.manual_seed(0)
            model = recipe.build_model().to(device)
            stamps: list[float] = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train(model, batches, TrainConfig(steps=warmup + a.throughput_steps, lr=1e-4, checkpoint_every=0,
                                              amp=amp, channels_last=cl),
                  progress=False, on_step=lambda done, loss: stamps.append(time.perf_counter()))
            rate = a.throughput_steps / (stamps[-1] - stamps[warmup - 1])
            row.update(steps_per_s=round(rate, 2), images_per_s=round(rate * a.batch, 1))
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            rows.append(row)
            del model
    measured = [r for r in rows if r.get("steps_per_s")]
    return {"model": recipe.describe_model(), "loop": "sls_deploy.training.loop.train (L1, Adam)",
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run: not GPU figures)",
            "rows": rows, "basicsr_rows": basicsr_rows(batches, device, warmup, a.throughput_steps, a.batch),
            "passed": bool(measured)}


def basicsr_rows(batches: "Batches", device: torch.device, warmup: int, steps: int, batch: int) -> list[dict]:
    """BasicSR's own training step (``SRModel.optimize_parameters``, EDSR 64x16 x4 as train_scale.py builds it) on
    the same batches, FP32 and bf16 autocast (BasicSR has no AMP of its own), timed as our rows (it reads the loss
    every step too); "not measured (BasicSR not installed)" when basicsr does not import."""
    try:
        import basicsr  # noqa: F401
    except Exception:  # not installed, or an old release that no longer imports with this torch/torchvision
        return [{"loop": "BasicSR", "amp": amp, "steps_per_s": None, "images_per_s": None,
                 "note": "not measured (BasicSR not installed)"} for amp in ("fp32", "bf16")]
    spec = importlib.util.spec_from_file_location("train_scale", Path(__file__).resolve().parent / "train_scale.py")
    train_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_scale)
    rows = []
    for amp in ("fp32", "bf16"):
        step, batches.i = train_scale.basicsr_step(device, amp), 0
        stamps = []
        for _ in range(warmup + steps):
            step(*batches.batch())
            stamps.append(time.perf_counter())
        rate = steps / (stamps[-1] - stamps[warmup - 1])
        rows.append({"loop": "BasicSR", "amp": amp, "steps_per_s": round(rate, 2), "images_per_s": round(rate * batch, 1)})
    return rows


def section_build(ctx: Ctx) -> dict:
    out = ctx.work / "build"
    r = cli("build", *ctx.model_args, "--budget", "0.4", "--device", ctx.dev, "--steps", ctx.args.build_steps,
            "--out", out, "--no-progress", "--json", cwd=ctx.work, timeout=900)
    res = {"command": f"sls-deploy build {' '.join(map(str, ctx.model_args))} --budget 0.4 --device {ctx.dev} "
                      f"--steps {ctx.args.build_steps}", "rc": r["rc"], "seconds": r["seconds"]}
    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        res["stage_seconds"] = {k: v.get("seconds") for k, v in m.get("stages", {}).items()}
        res["compute"] = {k: v.get("compute") for k, v in m.get("stages", {}).items() if v.get("compute")}
    try:
        rep = json.loads(r["stdout"])
        res.update(psnr={k: rep["psnr"][k] for k in ("bicubic", "dense", "pruned")}, macs_ratio=rep["macs"]["ratio"],
                   method=rep["method"], latency={k: rep["latency"].get(k) for k in ("backend", "provider", "device",
                                                                                     "device_name")},
                   precisions={p: v.get(f"psnr_{rep['psnr']['channel']}") for p, v in rep.get("precisions", {}).items()})
    except (ValueError, KeyError, TypeError):
        res["stderr_tail"] = r["stderr_tail"]
    res["passed"] = r["rc"] == 0 and res.get("compute", {}).get("finetune", {}).get("device", "").startswith(ctx.dev)
    return res


def _finetune_leg(base: Path, folder: Path, device: str, interrupt_at: int | None, resume_on: str | None) -> dict:
    """Copy the planned bundle, finetune it on ``device`` (interrupted after ``interrupt_at`` steps, then resumed
    on ``resume_on``); the final weights and the checkpoint's tensor devices."""
    from safetensors.torch import load_file

    from sls_deploy.stages import finetune as ft
    from sls_deploy.stages.build import reopen

    shutil.copytree(base, folder)
    real = ft.train
    info: dict = {"device": device, "interrupt_at": interrupt_at, "resume_on": resume_on}

    def stopping(*a, **kw):
        def on_step(done, loss):
            if done == interrupt_at:
                raise KeyboardInterrupt

        return real(*a, **kw, on_step=on_step)

    quiet = lambda msg: None  # noqa: E731
    if interrupt_at:
        ft.train = stopping
        try:
            ft.run_finetune(reopen(folder, quiet, False, compute={"device": device}), resume=None)
            raise RuntimeError("the interrupted finetune ran to the end")
        except KeyboardInterrupt:
            pass
        finally:
            ft.train = real
        ckpt = folder / "work" / "finetune.ckpt"
        state = torch.load(ckpt, weights_only=True)  # no map_location: a CUDA tensor would come back on CUDA
        devices = set()

        def walk(v):
            if isinstance(v, torch.Tensor):
                devices.add(v.device.type)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)

        walk(state)
        info.update(checkpoint_step=int(state["step"]), checkpoint_devices=sorted(devices))
        device = resume_on
    ft.run_finetune(reopen(folder, quiet, False, compute={"device": device}), resume=True if interrupt_at else None)
    info["weights"] = load_file(str(folder / "model.safetensors"))
    return info


def section_resume(ctx: Ctx) -> dict:
    from sls_deploy.config.settings import Settings
    from sls_deploy.core.device import Compute
    from sls_deploy.stages.build import search_or_release, start

    recipe, n = ctx.recipe(), ctx.args.resume_steps
    weights = str(ctx.args.weights) if ctx.args.weights else None
    s = Settings.resolve(recipe, budget=0.6, method="oneshot", n=2, target="none", steps=n, weights=weights,
                         precisions=("fp32",))
    base = ctx.work / "resume-plan"
    search_or_release(start(recipe, s, base, lambda m: None, False, Compute()))
    gpu, half = ctx.dev, n // 2
    legs = {"gpu": (gpu, None, None), "cpu": ("cpu", None, None), "gpu_then_cpu": (gpu, half, "cpu"),
            "cpu_then_gpu": ("cpu", half, gpu), "gpu_then_gpu": (gpu, half, gpu)}
    got = {name: _finetune_leg(base, ctx.work / f"resume-{name}", *leg) for name, leg in legs.items()}
    w = {k: v.pop("weights") for k, v in got.items()}
    diffs = {"gpu_vs_cpu_uninterrupted": max_abs_diff(w["gpu"], w["cpu"]),
             "gpu_then_cpu_vs_gpu": max_abs_diff(w["gpu_then_cpu"], w["gpu"]),
             "gpu_then_cpu_vs_cpu": max_abs_diff(w["gpu_then_cpu"], w["cpu"]),
             "cpu_then_gpu_vs_cpu": max_abs_diff(w["cpu_then_gpu"], w["cpu"]),
             "cpu_then_gpu_vs_gpu": max_abs_diff(w["cpu_then_gpu"], w["gpu"]),
             "gpu_then_gpu_vs_gpu": max_abs_diff(w["gpu_then_gpu"], w["gpu"])}
    scale = max(diffs["gpu_vs_cpu_uninterrupted"], 1e-6)
    cpu_only = all(v["checkpoint_devices"] == ["cpu"] for v in got.values() if v.get("checkpoint_devices"))
    mixed_ok = all(min(diffs[f"{a}_vs_gpu"], diffs[f"{a}_vs_cpu"]) <= 4 * scale
                   for a in ("gpu_then_cpu", "cpu_then_gpu"))
    return {"steps": n, "interrupted_at": half, "legs": got, "max_abs_weight_diff": diffs,
            "gpu_then_gpu_bit_identical": diffs["gpu_then_gpu_vs_gpu"] == 0.0,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "tolerance": "a mixed run is within 4x the GPU-vs-CPU difference of the uninterrupted runs",
            "checkpoints_cpu_only": cpu_only, "passed": cpu_only and mixed_ok}


def section_torchrun(ctx: Ctx) -> dict:
    steps = ctx.args.torchrun_steps
    runs = {}
    plans = {}
    configs = [("1 process, " + ctx.dev, 1, ctx.dev)]
    gpus = torch.cuda.device_count() if ctx.dev == "cuda" else 0
    if gpus >= 2:
        configs.append(("2 processes, 2 GPUs (NCCL)", 2, "cuda"))
    configs.append(("2 processes, cpu (gloo" + (" in a cpu:gloo,cuda:nccl group)" if ctx.dev == "cuda" else ")"),
                    2, "cpu"))
    for label, nproc, dev in configs:
        out = ctx.work / f"torchrun-{nproc}-{dev}"
        n = min(steps, CPU_TORCHRUN_STEPS) if (dev == "cpu" and ctx.dev == "cuda") else steps
        threads = max(1, (os.cpu_count() or 2) // nproc) if dev == "cpu" else None
        s = torchrun(nproc, "search", *ctx.model_args, "--budget", "0.5", "--method", "sls", "--target", "none",
                     "--steps", n, "--device", dev, "--out", out, "--no-progress", cwd=ctx.work, threads=threads)
        f = torchrun(nproc, "finetune", out, "--steps", n + 5, "--device", dev, "--no-progress", cwd=ctx.work,
                     threads=threads) \
            if s["rc"] == 0 else {"rc": None, "note": "not run: the search failed"}
        entry = {"steps": n, "search": s, "finetune": f}
        if (out / "plan.json").is_file():
            plan = json.loads((out / "plan.json").read_text())
            plans[label] = {l["name"]: l["n"] for l in plan["layers"]}
            entry["world_size"] = plan.get("search", {}).get("world_size")
            m = json.loads((out / "manifest.json").read_text())
            entry["compute"] = m["stages"].get("finetune", {}).get("compute")
        runs[label] = entry
    if gpus < 2:
        runs["2 processes, 2 GPUs (NCCL)"] = {"note": f"not run: {gpus} GPU(s) here"}
    passed = all(e["search"]["rc"] == 0 and e["finetune"]["rc"] == 0 for e in runs.values() if "search" in e)
    return {"steps": steps, "runs": runs, "plans": plans, "passed": passed}


def section_oom(ctx: Ctx) -> dict:
    from sls_deploy.core.errors import DeviceMemoryError
    from sls_deploy.training.loop import TrainConfig, train

    recipe = ctx.recipe()
    device = torch.device(ctx.dev)
    free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
    # EDSR-baseline x4 at batch 1024, LR 160x160: 6.7 GB per 64-channel feature map, two kept per residual
    # block for the backward pass: ~215 GB for the 16 blocks, well beyond 141 GB (and every map under 2^31
    # elements, so the failure is the allocation, not 32-bit indexing)
    batch, patch = ctx.args.oom_batch, ctx.args.oom_patch
    hr = patch * recipe.scale
    items = Batches(2, 2, 24, recipe.scale, pin=False)  # two ordinary steps (a checkpoint after each), then the big one
    items.items.append((torch.full((batch, 3, patch, patch), 0.5), torch.full((batch, 3, hr, hr), 0.5)))
    model = recipe.build_model().to(device)
    ckpt = ctx.work / "oom.ckpt"
    try:
        train(model, items, TrainConfig(steps=3, checkpoint_every=1), checkpoint=ckpt, progress=False, desc="finetune")
        return {"passed": False, "note": f"no out-of-memory error at batch {batch} x {patch} ({total / 2**30:.0f} GiB)"}
    except DeviceMemoryError as e:
        msg = str(e)
    finally:
        del model
        torch.cuda.empty_cache()
    kept = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None
    return {"message": msg, "gpu_free_gib_before": round(free / 2**30, 1), "checkpoint_step_kept": kept,
            "passed": ("\n" not in msg and "finetune.batch_size" in msg and f"batch {batch} x LR patch" in msg
                       and "the last checkpoint (step 2" in msg and kept == 2)}


RUNNERS = {"env": section_env, "throughput": section_throughput, "build": section_build, "resume": section_resume,
           "torchrun": section_torchrun, "oom": section_oom}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        why = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
        print(f"gpu_check: error: no CUDA here ({why}, torch {torch.__version__}): this check runs on a CUDA GPU "
              "(install a CUDA build of torch; --cpu-dry-run tests the script on a CPU)", file=sys.stderr)
        return 2
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work)).resolve()  # kept when --work is given
    ctx = Ctx(args, work)
    result = {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv,
              "dry_run": args.cpu_dry_run, "budget_s": args.budget_s, "sections": {}}
    t_start = time.perf_counter()
    out_file = args.out / RESULT
    try:
        for name in SECTIONS:
            spent = time.perf_counter() - t_start
            if name in args.skip:
                result["sections"][name] = {"skipped": "--skip"}
            elif name == "oom" and ctx.dev != "cuda":
                result["sections"][name] = {"skipped": "CUDA only (it fills the GPU's memory)"}
            elif spent + ESTIMATE_S[name] > args.budget_s:
                result["sections"][name] = {"skipped": f"time budget: {spent:.0f} s spent of {args.budget_s:.0f} s"}
            else:
                print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                try:
                    res = RUNNERS[name](ctx)
                except Exception as e:  # a failed section is a result, and the next sections still run
                    res = {"passed": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                           "traceback_tail": traceback.format_exc().strip().splitlines()[-4:]}
                res["seconds"] = round(time.perf_counter() - t0, 1)
                result["sections"][name] = res
                print(f"gpu_check: {name} {'passed' if res.get('passed') else 'FAILED'} in {res['seconds']} s",
                      file=sys.stderr, flush=True)
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            write_json(out_file, result)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ran = {k: v for k, v in result["sections"].items() if "skipped" not in v}
    failed = [k for k, v in ran.items() if not v.get("passed")]
    result["status"] = ("failed: " + ", ".join(failed) if failed else f"passed ({len(ran)} sections)" if ran
                        else "failed: no section ran (time budget or --skip)")
    write_json(out_file, result)
    print(summary(result))
    return 1 if failed or not ran else 0


def summary(result: dict) -> str:
    """A few lines for the console (the JSON holds everything)."""
    s = result["sections"]
    lines = [f"gpu_check: {result['status']} in {result.get('seconds')} s -> {RESULT}"]
    env = s.get("env", {})
    if env.get("gpu"):
        lines.append(f"  {env['gpu']} ({env.get('memory_gib')} GiB), torch {env['torch']}, CUDA {env['cuda']}")
    for r in s.get("throughput", {}).get("rows", []):
        lines.append(f"  throughput {r['amp']}{' channels_last' if r['channels_last'] else ''}: "
                     f"{r.get('steps_per_s')} steps/s, {r.get('images_per_s')} images/s {r.get('note', '')}".rstrip())
    for r in s.get("throughput", {}).get("basicsr_rows", []):
        lines.append(f"  throughput BasicSR {r['amp']}: {r.get('steps_per_s')} steps/s, {r.get('images_per_s')} "
                     f"images/s {r.get('note', '')}".rstrip())
    b = s.get("build", {})
    if "rc" in b:
        lines.append(f"  build rc {b['rc']} in {b.get('seconds')} s, PSNR {b.get('psnr')}")
    rs = s.get("resume", {})
    if "max_abs_weight_diff" in rs:
        lines.append(f"  resume: {json.dumps(rs['max_abs_weight_diff'])}")
    for k, v in s.items():
        if "skipped" in v or v.get("error"):
            lines.append(f"  {k}: {v.get('skipped') or v.get('error')}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
