#!/usr/bin/env python3
"""Training data at scale: peak memory, seconds to the first step and steps/s, old pipeline vs new, on a
DIV2K-sized set; and (with CUDA) EDSR-baseline x4 throughput at BasicSR's settings, ours beside BasicSR's.

**The set.** ``--images`` (800, DIV2K's training count) PNGs of 2040x1356 (DIV2K's common size) written once
into ``--data-dir`` (reused when present): image i is the shipped scikit-image training photo i mod 16, turned
by one of the 8 flips/rotations, mirror-tiled to 2040x1356 and rolled by a seeded offset, so no two images are
the same. About 2 GB of PNGs for 800 (zlib level 3, as BasicSR writes sub-images).

**CPU rows.** Each row runs ``sls-deploy train --recipe <edsr.yaml> --data <set> --steps --steps`` in a
subprocess (the recipe's train section: batch 16, LR patch 16) and reads the step times from the training loop
(the benchmark wraps its ``train`` to print a timestamp per step; nothing else changes). Memory: the training
process's peak RSS (``getrusage``), the worker processes' largest peak RSS, and the whole process tree's
peak PSS (proportional set size, shared pages counted once) sampled every 0.2 s; the tree's summed RSS
counts the pages forked workers share with the training process once per process and is given too.
Seconds to the first step: from starting the command to the end of step 1 (Python and torch imports
included). Steps/s: over the steps after the first ``--warmup``.

- old: the code of commit 1ebba2a (every image decoded to float32 LR/HR tensors before step 1), run from a
  ``git worktree`` of it; it needs ~36 MB per image (~28 GB for 800, more than this machine has), so it runs
  on the first ``--old-images`` images only; its peak RSS per image is fitted and extrapolated to 800, and its
  decoding before step 1 is extrapolated from the per-image cost of ``load_pair`` measured against the new
  pipeline's header read, interleaved on 20 images, medians (both stated as extrapolations).
- new: the lazy pipeline on the whole set: the PNG folder with ``data.workers`` auto (and ``--workers`` counts
  given), and a prepare-data memmap cache of the set (``--memmap``; written once into the data dir).

**GPU rows** (CUDA only, else "not measured (no CUDA)"): EDSR-baseline x4 (64 x 16) at BasicSR's training
settings, LR patch 48, batch 16, Adam 1e-4: ours = the training loop's step (L1, Adam betas 0.9/0.99) on
batches from ``PatchSampler`` (loader workers, pinned), FP32 and AMP (bf16 autocast; fp16 with a gradient
scaler); BasicSR = ``basicsr``'s ``SRModel.optimize_parameters`` on the same network and device, fed the
same batches, FP32 and AMP (bf16 autocast around it: BasicSR 1.4 has no AMP of its own), when ``basicsr`` is
importable. steps/s and images/s = steps/s x 16, medians of 3 timed windows after a warm-up.
``--gpu-device cpu`` runs these rows' code on the CPU (a dry run of the script; its figures are not GPU
figures).

    python benchmarks/train_scale.py --data-dir /tmp/div2k-synth [--images 800] [--steps 30]
        [--old-images 25,50,100] [--workers 1,2] [--memmap] [--skip-old] [--gpu-only]
    (results: benchmarks/results/train_scale.{json,md})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "1ebba2a"
W, H = 2040, 1356
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- the set


def _make_one(job) -> str:
    i, out = job
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from sls_deploy.data.images import read_pixels
    from sls_deploy.data.prepare import to_uint8
    from sls_deploy.data.sources import SKIMAGE_TRAIN, skimage_data_dir

    photo = to_uint8(read_pixels(skimage_data_dir() / SKIMAGE_TRAIN[i % len(SKIMAGE_TRAIN)]))
    rng = np.random.default_rng(i)
    k = int(rng.integers(8))
    if k & 1:
        photo = photo[:, ::-1]
    if k & 2:
        photo = photo[::-1]
    if k & 4:
        photo = photo.transpose(1, 0, 2)
    h, w = photo.shape[:2]
    big = np.pad(photo, ((0, max(0, H - h) + h), (0, max(0, W - w) + w), (0, 0)), mode="symmetric")
    big = np.roll(big, (int(rng.integers(big.shape[0])), int(rng.integers(big.shape[1]))), axis=(0, 1))[:H, :W]
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(np.ascontiguousarray(big)).save(tmp, format="PNG", compress_level=3)
    os.replace(tmp, out)
    return out.name


def make_set(folder: Path, n: int) -> Path:
    """``n`` 2040x1356 PNGs in ``folder/images`` (those already there are kept)."""
    from multiprocessing import Pool

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    todo = [(i, images / f"{i + 1:04d}.png") for i in range(n) if not (images / f"{i + 1:04d}.png").is_file()]
    if todo:
        free = shutil.disk_usage(folder).free
        if free < len(todo) * 4e6 * 1.2:
            sys.exit(f"error: {len(todo)} images need about {len(todo) * 4e6 / 1e9:.1f} GB, {free / 1e9:.1f} GB free "
                     f"at {folder}")
        print(f"writing {len(todo)} images of {W}x{H} into {images} ...", flush=True)
        t0 = time.perf_counter()
        with Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
            for j, _ in enumerate(pool.imap_unordered(_make_one, todo), 1):
                if j % 50 == 0 or j == len(todo):
                    print(f"  {j}/{len(todo)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return images


def subset(folder: Path, images: Path, n: int) -> Path:
    """A folder of links to the first ``n`` images."""
    sub = folder / "subsets" / f"first{n:04d}"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = sub / f"{i + 1:04d}.png"
        if not link.exists():
            link.symlink_to(images / f"{i + 1:04d}.png")
    return sub


# --------------------------------------------------------------------------- measuring a training command


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        pids += _children(pids[i])
        i += 1
    return pids


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the process tree under ``pid``: peak summed RSS and summed PSS (MB)."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak_rss = self.peak_pss = 0.0
        self.peak_procs = 1

    def run(self):
        while not self.stop.is_set():
            pids = _tree(self.pid)
            rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids) / 1024
            pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.every)


CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import sls_deploy.training.base as base
import sls_deploy.data.patches as patches
real, real_batch, marks = base.train, patches.PatchSampler.batch, {}
def batch(self):
    out = real_batch(self)
    if "batch1" not in marks:
        marks["batch1"] = time.time()
        print(json.dumps(marks), flush=True)
    return out
patches.PatchSampler.batch = batch
def timed(*a, **kw):
    print(json.dumps({"train_entered": time.time()}), flush=True)
    def on_step(done, loss):
        print(json.dumps({"step": done, "t": time.time()}), flush=True)
    kw["on_step"] = on_step
    real(*a, **kw)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"maxrss_mb": me.ru_maxrss / 1024, "children_maxrss_mb": kids.ru_maxrss / 1024}), flush=True)
    os._exit(0)  # skip the evaluation that follows training
base.train = timed
from sls_deploy.cli import main
sys.exit(main(sys.argv[2:]))
'''


def run_train(code_root: Path, data: Path, steps: int, warmup: int, workers, work: Path, label: str) -> dict:
    """One ``sls-deploy train`` of the EDSR recipe on ``data`` with the code at ``code_root``."""
    import yaml

    recipe = yaml.safe_load((ROOT / "sls_deploy" / "recipes" / "edsr.yaml").read_text())
    if workers is not None:
        recipe["data"]["workers"] = workers
    rpath = work / f"{label}.yaml"
    rpath.write_text(yaml.safe_dump(recipe))
    out = work / f"{label}.safetensors"
    cmd = [sys.executable, "-c", CHILD, str(code_root), "train", "--recipe", str(rpath), "--data", str(data),
           "--steps", str(steps), "--out", str(out), "--force", "--restart", "--no-progress"]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)
    mem = TreeMemory(p.pid)
    mem.start()
    times, final, marks = [], {}, {}
    for line in p.stdout:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "step" in rec:
            times.append(rec["t"])
        elif "train_entered" in rec or "batch1" in rec:
            marks.update(rec)
        else:
            final = rec
    err = p.stderr.read()
    p.wait()
    mem.stop.set()
    mem.join()
    if not times:
        raise SystemExit(f"{label}: no step ran (exit {p.returncode}): {err.strip().splitlines()[-1:]}")
    timed = times[warmup:]
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    row = {"label": label, "images": len(list(data.iterdir())) if data.is_dir() else None,
           "workers": workers if workers is not None else "(old: none)", "first_step_s": round(times[0] - t0, 1),
           "setup_s": round(marks.get("train_entered", float("nan")) - t0, 1),
           "first_batch_s": round(marks.get("batch1", float("nan")) - marks.get("train_entered", float("nan")), 1),
           "step1_compute_s": round(times[0] - marks.get("batch1", float("nan")), 1),
           "steps_per_s": round(rate, 3), "steps": len(times),
           "peak_rss_training_mb": round(final.get("maxrss_mb", float("nan"))),
           "peak_rss_worker_mb": round(final.get("children_maxrss_mb", 0)),
           "peak_pss_tree_mb": round(mem.peak_pss), "peak_rss_tree_sum_mb": round(mem.peak_rss),
           "processes": mem.peak_procs}
    print(json.dumps(row), flush=True)
    return row


def old_worktree(work: Path) -> Path:
    path = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path), OLD_COMMIT], check=True)
    return path


def per_image_costs(images: Path, n: int = 20) -> dict:
    """Seconds per image before step 1, interleaved on the same images, medians: the old pipeline's
    ``load_pair`` (decode, float32, whole-image bicubic LR) against the new one's header read."""
    sys.path.insert(0, str(ROOT))
    from sls_deploy.data.images import check_image
    from sls_deploy.data.images import load_pair

    files = sorted(images.iterdir())[:n]
    old, new = [], []
    for f in files:
        t = time.perf_counter()
        load_pair(f, 4)
        old.append(time.perf_counter() - t)
        t = time.perf_counter()
        check_image(f)
        new.append(time.perf_counter() - t)
    return {"images": len(files), "old_load_pair_s": round(statistics.median(old), 3),
            "new_header_s": round(statistics.median(new), 5)}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line: (slope, intercept)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return slope, my - slope * mx


# --------------------------------------------------------------------------- GPU rows


def _batches(device, n: int, workers: int, data: Path | None):
    """``n`` batches of EDSR x4 at LR patch 48, batch 16, from PatchSampler, moved to ``device``."""
    import torch

    sys.path.insert(0, str(ROOT))
    from sls_deploy.data import PatchSampler
    from sls_deploy.data.catalog import training_images

    images = [im for im in training_images(str(data) if data else "skimage:train") if min(im.width, im.height) >= 192]
    s = PatchSampler(images, 4, 48, 16, seed=0, workers=workers)
    s.use_device(device)
    out = []
    for _ in range(n):
        lr, hr = s.batch()
        out.append((lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)))
    s.close()
    return out


def _time_steps(step, batches, device, windows: int = 3) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    warm = max(1, len(batches) // 4)
    for b in batches[:warm]:
        step(*b)
    sync()
    rest = batches[warm:]
    per = max(1, len(rest) // windows)
    rates = []
    for w in range(windows):
        chunk = rest[w * per:(w + 1) * per]
        t0 = time.perf_counter()
        for b in chunk:
            step(*b)
        sync()
        rates.append(len(chunk) / (time.perf_counter() - t0))
    return statistics.median(rates)


def _autocast(device, amp: str):
    import contextlib

    import torch

    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def ours_step(device, amp: str):
    """The step of ``training.loop.train`` (L1, Adam 0.9/0.99) on the EDSR-baseline x4 of the recipe."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from sls_deploy.config.recipe import recipe_for_model, load_recipe

    torch.manual_seed(0)
    model = load_recipe(recipe_for_model("edsr")).build_model().to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None

    def step(lr, hr):
        with _autocast(device, amp):
            loss = F.l1_loss(model(lr), hr)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return step


def basicsr_step(device, amp: str):
    """BasicSR's SRModel (EDSR 64x16 x4, L1, Adam 1e-4 0.9/0.99) ``optimize_parameters`` on a fed batch."""
    import torch
    from basicsr.models.sr_model import SRModel

    opt = {"is_train": True, "dist": False, "num_gpu": 1 if torch.device(device).type == "cuda" else 0,
           "rank": 0, "world_size": 1, "scale": 4, "name": "edsr_bench",
           "network_g": {"type": "EDSR", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_block": 16,
                         "upscale": 4, "res_scale": 1, "img_range": 255.0, "rgb_mean": [0.4488, 0.4371, 0.4040]},
           "path": {"pretrain_network_g": None, "strict_load_g": True, "resume_state": None,
                    "models": tempfile.mkdtemp(), "training_states": tempfile.mkdtemp()},
           "train": {"ema_decay": 0, "optim_g": {"type": "Adam", "lr": 1e-4, "weight_decay": 0, "betas": [0.9, 0.99]},
                     "scheduler": {"type": "MultiStepLR", "milestones": [200000], "gamma": 0.5},
                     "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"}},
           "logger": {"print_freq": 10 ** 9, "save_checkpoint_freq": 10 ** 9, "use_tb_logger": False}}
    torch.manual_seed(0)
    model = SRModel(opt)
    it = {"n": 0}

    def step(lr, hr):
        it["n"] += 1
        model.feed_data({"lq": lr, "gt": hr})
        with _autocast(device, amp):
            model.optimize_parameters(it["n"])

    return step


def gpu_rows(device: str | None, steps: int, workers: int, data: Path | None) -> dict:
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return {"status": "not measured (no CUDA)"}
        device = "cuda"
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    batches = _batches(dev, steps, workers, data)
    rows = []
    amps = ["fp32", "bf16"] + (["fp16"] if dev.type == "cuda" else [])
    for amp in amps:
        rate = _time_steps(ours_step(dev, amp), batches, dev)
        rows.append({"loop": "sls-deploy", "amp": amp, "steps_per_s": round(rate, 2), "images_per_s": round(rate * 16, 1)})
        print(json.dumps(rows[-1]), flush=True)
    try:
        import basicsr  # noqa: F401
        have_basicsr = True
    except ImportError:
        have_basicsr = False
    for amp in ("fp32", "bf16"):
        if not have_basicsr:
            rows.append({"loop": "BasicSR", "amp": amp, "steps_per_s": None, "images_per_s": None,
                         "note": "not measured (basicsr not importable)"})
            continue
        rate = _time_steps(basicsr_step(dev, amp), batches, dev)
        rows.append({"loop": "BasicSR", "amp": amp, "steps_per_s": round(rate, 2), "images_per_s": round(rate * 16, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"status": "measured" if dev.type == "cuda" else f"dry run on {dev} (not GPU figures)",
            "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "settings": "EDSR-baseline x4 (64x16), LR patch 48, batch 16, Adam 1e-4; same batches for every row; "
                        "data loading outside the timed steps",
            "rows": rows}


# --------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    lines = ["# Training data at scale (benchmarks/train_scale.py)", "",
             f"Set: {res['images']} PNGs of {W}x{H} (DIV2K-sized, tiled from the shipped photos). Machine: "
             f"{res['machine']}. `sls-deploy train --model edsr` settings: batch {res['batch']}, LR patch "
             f"{res['lr_patch']} (the recipe's train section), {res['steps']} steps per row; steps/s after "
             f"{res['warmup']} warm-up steps. Load average when it started: {res.get('load_average_at_start')} "
             "(the machine is shared).", "",
             "| pipeline | images | workers | first step (s) | of it: start, batch 1, step 1 (s) | steps/s | "
             "training process peak RSS (MB) | worker peak RSS (MB) | tree peak PSS (MB) | tree summed RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cpu_rows"]:
        split = f"{r.get('setup_s', '-')}, {r.get('first_batch_s', '-')}, {r.get('step1_compute_s', '-')}"
        lines.append(f"| {r['label']} | {r['images']} | {r['workers']} | {r['first_step_s']} | {split} | "
                     f"{r['steps_per_s']} | "
                     f"{r['peak_rss_training_mb']} | {r['peak_rss_worker_mb']} | {r['peak_pss_tree_mb']} | "
                     f"{r['peak_rss_tree_sum_mb']} |")
    ex, pi = res.get("old_extrapolation"), res.get("per_image")
    if ex:
        lines += ["", f"Old pipeline, peak RSS fitted over {ex['measured_on']} images (a line through the measured "
                      f"rows): {ex['rss_mb_per_image']:.1f} MB per image; **extrapolated** to {res['images']} "
                      f"images: about {ex['rss_gb_at_n']:.1f} GB (not run: more memory than this machine has)."]
    if pi:
        lines += ["", f"Before step 1, per image (medians over {pi['images']} images, old and new interleaved): "
                      f"old {pi['old_load_pair_s']} s (decode, float32, bicubic LR), new {pi['new_header_s']} s "
                      f"(header). For {res['images']} images: old {pi['old_load_pair_s'] * res['images'] / 60:.1f} "
                      f"min of decoding (**extrapolated**), new {pi['new_header_s'] * res['images']:.2f} s."]
    g = res.get("gpu", {})
    lines += ["", "## GPU: EDSR-baseline x4 at BasicSR's settings", ""]
    if not g.get("rows"):
        lines.append(g.get("status", "not measured"))
    else:
        lines += [f"{g['status']}: {g['device']}, torch {g['torch']}, CUDA {g['cuda']}. {g['settings']}.", "",
                  "| loop | precision | steps/s | images/s |", "|---|---|---|---|"]
        for r in g["rows"]:
            lines.append(f"| {r['loop']} | {r['amp']} | {r['steps_per_s'] if r['steps_per_s'] is not None else r.get('note')} | "
                         f"{r['images_per_s'] if r['images_per_s'] is not None else ''} |")
    lines += ["", "First step = start (Python, torch, recipe, model, the data set scanned: the old pipeline decodes "
                  "everything here) + batch 1 (until the first batch is in hand) + step 1 (its forward/backward). "
                  "steps/s is the training loop's rate once running: compute-bound unless the workers cannot keep "
                  "up (full-size PNG decoding on 2 cores)."]
    lines += ["", "Memory: the training process's peak RSS is exact (getrusage); worker peak RSS is the largest "
                  "worker's; tree PSS (shared pages counted once) and summed RSS (shared pages counted per process) "
                  "are sampled every 0.2 s. Timings on a shared 2-core machine: noisy, single runs.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path, help="Cache folder for the generated set.")
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--old-images", default="25,50,100", help="Old pipeline on the first N images (comma list).")
    ap.add_argument("--workers", default="", help="Extra rows with these data.workers counts (comma list).")
    ap.add_argument("--memmap", action="store_true", help="Also a row on a prepare-data memmap cache of the set.")
    ap.add_argument("--skip-old", action="store_true", help="Keep the old rows of the last results file.")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--gpu-device", default=None, help="Device of the GPU rows (default: cuda when available; "
                    "'cpu' is a dry run of their code).")
    ap.add_argument("--gpu-steps", type=int, default=80)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_scale")
    args = ap.parse_args()

    res: dict = {"images": args.images, "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
                 "load_average_at_start": round(os.getloadavg()[0], 1),
                 "batch": 16, "lr_patch": 16, "steps": args.steps, "warmup": args.warmup, "cpu_rows": []}
    prev = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}
    if args.skip_old and not args.gpu_only and prev.get("images") == args.images:  # keep the last old rows
        res["cpu_rows"] = [r for r in prev.get("cpu_rows", []) if r["label"].startswith("old")]
        if prev.get("old_extrapolation"):
            res["old_extrapolation"] = {k: v for k, v in prev["old_extrapolation"].items()
                                        if k in ("measured_on", "rss_mb_per_image", "rss_gb_at_n", "extrapolated")}
    images = make_set(args.data_dir, args.images)
    work = Path(tempfile.mkdtemp(prefix="train-scale-"))
    try:
        if not args.gpu_only:
            if not args.skip_old:
                old = old_worktree(work)
                for n in [int(x) for x in args.old_images.split(",") if x]:
                    res["cpu_rows"].append(run_train(old, subset(args.data_dir, images, n), args.steps, args.warmup,
                                                     None, work, f"old {OLD_COMMIT} (decode all first)"))
                olds = [r for r in res["cpu_rows"] if r["label"].startswith("old")]
                if len(olds) >= 2:
                    rs, ri = fit([r["images"] for r in olds], [r["peak_rss_training_mb"] for r in olds])
                    res["old_extrapolation"] = {
                        "measured_on": ", ".join(str(r["images"]) for r in olds), "rss_mb_per_image": rs,
                        "rss_gb_at_n": (rs * args.images + ri) / 1024, "extrapolated": True}
            res["per_image"] = per_image_costs(images)
            print(json.dumps(res["per_image"]), flush=True)
            data = images if args.images == len(list(images.iterdir())) else subset(args.data_dir, images, args.images)
            for w in ["auto"] + [int(x) for x in args.workers.split(",") if x]:
                res["cpu_rows"].append(run_train(ROOT, data, args.steps, args.warmup, w, work, "new (PNG folder)"))
            if args.memmap:
                cache = args.data_dir / f"memmap{args.images:04d}"
                prepare_s = None
                if not cache.is_dir():
                    t = time.perf_counter()
                    subprocess.run([sys.executable, str(ROOT / "cli.py"), "prepare-data", str(data), str(cache),
                                    "--crop", "0", "--format", "memmap", "--no-progress"], check=True)
                    prepare_s = time.perf_counter() - t
                res["cpu_rows"].append(run_train(ROOT, cache, args.steps, args.warmup, "auto", work,
                                                 "new (prepare-data memmap cache)"))
                res["cpu_rows"][-1]["images"] = args.images
                res["cpu_rows"][-1]["prepare_data_s"] = round(prepare_s, 1) if prepare_s else "(reused)"
        res["gpu"] = gpu_rows(args.gpu_device, args.gpu_steps, 2, None)
    finally:
        if (work / "old").exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "old")], check=False)
        shutil.rmtree(work, ignore_errors=True)
    if args.gpu_only and prev:  # keep the CPU rows of the last full run
        prev["gpu"] = res["gpu"]
        res = prev
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
