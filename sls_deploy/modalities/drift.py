"""Drift along the recurrence: how the pruned model's per-frame quality gap to the dense model evolves over a
whole long clip (the recurrent state carried through every frame).

``drift`` scores both models frame by frame against the ground truth over the whole clip and fits a least-squares
line to gap_t = PSNR_dense(t) - PSNR_pruned(t): a positive slope means the pruned model falls further behind as
its hidden state propagates (pruning error amplified along the recurrence, what SSL's Temporal Finetuning is
meant to counter). The slope is reported in dB per 100 frames.
"""

from __future__ import annotations

import numpy as np

from sls_deploy.modalities.clip import ClipInferFn, evaluate_clips


def gap_slope(gap: list[float]) -> float:
    """Least-squares slope of the gap over the frame index, in dB per 100 frames (0 for fewer than 2 frames)."""
    if len(gap) < 2:
        return 0.0
    t = np.arange(len(gap), dtype=np.float64)
    return float(np.polyfit(t, np.asarray(gap, dtype=np.float64), 1)[0] * 100.0)


def drift(dense: ClipInferFn, pruned: ClipInferFn, clip, scale: int, channel: str = "y") -> dict:
    """Per-frame PSNR of both models over the whole ``clip`` and the slope of their gap."""
    qd = evaluate_clips(dense, [clip], None, scale, channel, with_ssim=False)
    qp = evaluate_clips(pruned, [clip], None, scale, channel, with_ssim=False)
    d, p = qd.per_frame_mean, qp.per_frame_mean
    gap = [a - b for a, b in zip(d, p)]
    half = len(gap) // 2
    return {"clip": clip.name, "frames": len(gap), "psnr_dense": d, "psnr_pruned": p, "gap": gap,
            "gap_first_half": float(np.mean(gap[:half])) if half else None,
            "gap_second_half": float(np.mean(gap[half:])) if gap else None,
            "slope_db_per_100_frames": gap_slope(gap)}
