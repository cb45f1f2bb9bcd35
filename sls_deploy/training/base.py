"""Training the dense base model of a recipe (`sls-deploy train`)."""

from __future__ import annotations

from pathlib import Path

import torch

from sls_deploy.core import distributed as dist
from sls_deploy.core.checkpoints import save_weights
from sls_deploy.core.device import Compute
from sls_deploy.data.degradations import Degradation
from sls_deploy.modalities import registry as modalities
from sls_deploy.modalities.image import torch_infer
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
    modality = modalities.lookup(recipe.modality)
    degradation = degradation or recipe.adapter.degradation(recipe.model)  # image inputs (clips are bicubic)
    stream = seed + 1000 * dist.rank()  # under torchrun every rank draws its own batches (as search and finetune)
    sampler = modality.sampler(recipe, data or recipe.data_train, stream, section=sec, degradation=degradation)
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
    evals = modality.resolve_data(recipe.data_eval)
    label, baseline = modality.baseline(recipe, degradation)
    model_q = modality.evaluate(torch_infer(model), evals, recipe, with_ssim=False, degradation=degradation)
    base_q = modality.evaluate(baseline, evals, recipe, with_ssim=False, degradation=degradation)
    per_model, per_base = model_q.per_item_psnr(), base_q.per_item_psnr()
    return {"weights": str(out), "steps": result.steps_done, "seconds": round(result.seconds, 1),
            "final_loss": result.final_loss, "channel": recipe.metric_channel, "baseline": label,
            "psnr_model": model_q.psnr, "psnr_baseline": base_q.psnr, "psnr_bicubic": base_q.psnr,
            "margin_db": model_q.psnr - base_q.psnr,
            "per_image": {k: {"model": v, "baseline": per_base[k], "bicubic": per_base[k]}
                          for k, v in per_model.items()}}
