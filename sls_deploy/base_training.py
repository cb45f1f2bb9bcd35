"""Training the dense base model of a recipe (`sls-deploy train`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import save_weights
from .data import PatchSampler, resolve_images
from .evaluate import bicubic_infer, evaluate, torch_infer
from .recipe import Recipe
from .train import TrainConfig, TrainResult, train


def train_base(recipe: Recipe, out: Path, *, steps: int | None = None, data: str | None = None,
               resume: bool = True, half: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Train the recipe's model from scratch and write its weights to ``out`` (safetensors)."""
    sec = recipe.train
    cfg = TrainConfig(steps=sec.steps if steps is None else steps, lr=sec.lr, warmup=sec.warmup,
                      checkpoint_every=sec.checkpoint_every, seed=seed)
    sampler = PatchSampler(resolve_images(data or recipe.data_train), recipe.scale, sec.lr_patch,
                           sec.batch_size, seed=seed)
    torch.manual_seed(seed)
    model = recipe.build_model()
    ckpt = out.with_name(out.name + ".ckpt")
    result: TrainResult = train(model, sampler, cfg, checkpoint=ckpt, resume=resume,
                                run_key=f"train:{recipe.digest()}:{seed}", desc="train", progress=progress)
    save_weights(model, out, {"recipe": recipe.name, "steps": str(result.steps_done)}, half=half)
    if ckpt.exists():
        ckpt.unlink()
    eval_files = resolve_images(recipe.data_eval)
    model_q = evaluate(torch_infer(model), eval_files, recipe.scale, recipe.metric_channel, with_ssim=False)
    bic_q = evaluate(bicubic_infer(recipe.scale), eval_files, recipe.scale, recipe.metric_channel, with_ssim=False)
    return {"weights": str(out), "steps": result.steps_done, "seconds": round(result.seconds, 1),
            "final_loss": result.final_loss, "channel": recipe.metric_channel,
            "psnr_model": model_q.psnr, "psnr_bicubic": bic_q.psnr, "margin_db": model_q.psnr - bic_q.psnr,
            "per_image": {k: {"model": v["psnr"], "bicubic": bic_q.per_image[k]["psnr"]}
                          for k, v in model_q.per_image.items()}}
