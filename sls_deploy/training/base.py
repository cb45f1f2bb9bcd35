"""Training the dense base model of a recipe (`sls-deploy train`)."""

from __future__ import annotations

from pathlib import Path

import torch

from sls_deploy.core import distributed as dist
from sls_deploy.core.checkpoints import save_weights
from sls_deploy.core.device import Compute, model_device
from sls_deploy.data import PatchSampler, resolve_images
from sls_deploy.data.catalog import training_images
from sls_deploy.data.degradations import Degradation
from sls_deploy.modalities.image import baseline_infer, evaluate, torch_infer
from sls_deploy.config.recipe import Recipe
from sls_deploy.training.loop import TrainConfig, TrainResult, train


def train_base(recipe: Recipe, out: Path, *, steps: int | None = None, data: str | None = None,
               resume: bool = True, half: bool = False, seed: int = 0, progress: bool = True,
               degradation: Degradation | None = None, compute: Compute | None = None) -> dict:
    """Train the recipe's model from scratch and write its weights to ``out`` (safetensors).

    Image models train on patches of images, their inputs made by ``degradation`` (default: the adapter's,
    e.g. bicubic downscaling or blur); video models on clips of frames (L1 over every frame, bicubic inputs).
    The result compares the trained model with the degradation's baseline on the eval list: ``baseline`` is its
    label ("bicubic", "blurred input"), ``psnr_baseline`` its PSNR (``psnr_bicubic`` is the same number, the
    key older callers read). ``compute``: where it trains (None: the CPU); the checkpoint resumes anywhere.
    """
    sec = recipe.train
    compute = compute or Compute()
    cfg = TrainConfig(steps=sec.steps if steps is None else steps, lr=sec.lr, warmup=sec.warmup,
                      checkpoint_every=sec.checkpoint_every, seed=seed, amp=compute.amp,
                      channels_last=compute.channels_last, section="train")
    video = recipe.modality != "image"
    stream = seed + 1000 * dist.rank()  # under torchrun every rank draws its own batches (as search and finetune)
    if video:
        from sls_deploy.data.video import ClipSampler, resolve_clips

        sampler = ClipSampler(resolve_clips(data or recipe.data_train), recipe.scale, sec.lr_patch,
                              recipe.model.options["clip_len"], sec.batch_size, seed=stream,
                              workers=recipe.data_workers)
    else:
        degradation = degradation or recipe.adapter.degradation(recipe.model)
        sampler = PatchSampler(training_images(data or recipe.data_train), recipe.scale, sec.lr_patch,
                               sec.batch_size, seed=stream, degradation=degradation, workers=recipe.data_workers)
    torch.manual_seed(seed)
    model = recipe.build_model().to(compute.device)  # built (and initialised) on the CPU: the same on any device
    ckpt = out.with_name(out.name + ".ckpt")
    result: TrainResult = train(model, sampler, cfg, checkpoint=ckpt, resume=resume,
                                run_key=f"train:{recipe.digest()}:{seed}", desc="train", progress=progress)
    if not dist.is_main():  # rank 0 alone writes the weights and evaluates them
        return {}
    save_weights(model, out, {"recipe": recipe.name, "steps": str(result.steps_done)}, half=half)
    if ckpt.exists():
        ckpt.unlink()
    if video:
        return {"weights": str(out), "steps": result.steps_done, "seconds": round(result.seconds, 1),
                "final_loss": result.final_loss, **_video_margin(recipe, model)}
    eval_files = resolve_images(recipe.data_eval)
    model_q = evaluate(torch_infer(model), eval_files, recipe.scale, recipe.metric_channel, with_ssim=False,
                       degradation=degradation)
    base_q = evaluate(baseline_infer(degradation), eval_files, recipe.scale, recipe.metric_channel,
                      with_ssim=False, degradation=degradation)
    return {"weights": str(out), "steps": result.steps_done, "seconds": round(result.seconds, 1),
            "final_loss": result.final_loss, "channel": recipe.metric_channel, "baseline": degradation.name,
            "psnr_model": model_q.psnr, "psnr_baseline": base_q.psnr, "psnr_bicubic": base_q.psnr,
            "margin_db": model_q.psnr - base_q.psnr,
            "per_image": {k: {"model": v["psnr"], "baseline": base_q.per_image[k]["psnr"],
                              "bicubic": base_q.per_image[k]["psnr"]}
                          for k, v in model_q.per_image.items()}}


def _video_margin(recipe: Recipe, model: torch.nn.Module) -> dict:
    """Per-frame PSNR of the trained model vs bicubic on the recipe's eval clips."""
    from sls_deploy.data.video import resolve_clips
    from sls_deploy.modalities.clip import bicubic_clip_infer, evaluate_clips

    clips, T, ch = resolve_clips(recipe.data_eval), recipe.model.options["clip_len"], recipe.metric_channel
    model.eval()

    device = model_device(model)

    def infer(lr):
        with torch.no_grad():
            return model(lr.to(device)).cpu()

    q = evaluate_clips(infer, clips, T, recipe.scale, ch, with_ssim=False)
    b = evaluate_clips(bicubic_clip_infer(recipe.scale), clips, T, recipe.scale, ch, with_ssim=False)
    per = {k: (float(sum(v["psnr"]) / len(v["psnr"])), float(sum(b.per_clip[k]["psnr"]) / len(b.per_clip[k]["psnr"])))
           for k, v in q.per_clip.items()}
    return {"channel": ch, "baseline": "bicubic", "psnr_model": q.psnr, "psnr_baseline": b.psnr,
            "psnr_bicubic": b.psnr, "margin_db": q.psnr - b.psnr,
            "per_image": {k: {"model": m, "baseline": bb, "bicubic": bb} for k, (m, bb) in per.items()}}
