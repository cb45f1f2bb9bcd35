"""INT8 calibration feeds for any modality: {graph input: array} dicts the FP32 graph is run on.

- image: the LR images of the calibration folder (the package's calib/ set by default); for a same-size
  degradation (deblurring) those images degraded by the model's degradation, one fixed seed per image;
- clip: windows of ``clip_len`` frames from the training clips, cropped small;
- step: the same frames driven through the step graph's recurrence (``step_feeds``, once the FP32 graph exists),
  so the hidden-state input is calibrated on real states, not zeros.
Returns the feeds and the hashes that key the calibration cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sls_deploy.backends.loading import graph_spec
from sls_deploy.core.bundle import digest
from sls_deploy.modalities import registry as modalities

BUILTIN_CALIB = Path(__file__).resolve().parent.parent / "calib"
VIDEO_WINDOWS = 4  # calibration windows from the training clips
VIDEO_CROP = 64  # LR crop (pixels) of each window


def calibration_feeds(recipe, settings) -> tuple[list[dict[str, np.ndarray]], dict[str, str]]:
    from sls_deploy.onnx.precision.int8 import read_calibration_images

    spec = graph_spec(recipe)
    if settings.modality == "image":
        folder = BUILTIN_CALIB if settings.calib == "builtin" else Path(settings.calib)
        images, hashes = read_calibration_images(folder, recipe.adapter.min_input_size(recipe.model))
        if recipe.scale == 1:  # a same-size degradation (deblurring): the model's inputs are degraded images
            import torch

            deg = recipe.adapter.degradation(recipe.model)
            images = [deg.degrade_tensor(torch.from_numpy(img), rng=i).numpy().astype(np.float32)
                      for i, img in enumerate(images)]
            hashes = {**hashes, "degradation": digest(deg.describe())}
        return [{spec.input_names[0]: img} for img in images], hashes
    clips = _clip_windows(recipe, settings)
    hashes = {f"window{i}": digest(c.tobytes().hex()[:4096] + str(c.shape)) for i, c in enumerate(clips)}
    if settings.modality == "clip":
        return [{spec.input_names[0]: c} for c in clips], hashes
    return [{"__clip__": c} for c in clips], hashes  # a step graph: expanded by step_feeds on the FP32 graph


def _clip_windows(recipe, settings) -> list[np.ndarray]:
    """(1,T,3,h,w) LR windows: the first frames of up to VIDEO_WINDOWS training clips, centre-cropped."""
    from sls_deploy.data.video import load_clip_pair

    T = int(recipe.model.options.get("clip_len", 5))
    out = []
    for source in modalities.resolve_data(settings.modality, settings.data)[:VIDEO_WINDOWS]:
        _, lr = load_clip_pair(source, T, recipe.scale)
        h, w = lr.shape[-2:]
        c = min(VIDEO_CROP, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        out.append(np.ascontiguousarray(lr[..., top:top + c, left:left + c].numpy().astype(np.float32)))
    return out


def step_feeds(fp32_model, spec, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """For a recurrent step graph: every step of every calibration clip, with the state the FP32 graph itself
    produced at the step before (ExportSpec.recurrent), as feeds. Other graphs' feeds pass through."""
    if not feeds or "__clip__" not in feeds[0]:
        return feeds
    from sls_deploy.backends.sessions import cpu_session

    sess = cpu_session(fp32_model.SerializeToString())  # on the CPU on purpose: calibration must not depend on the GPU
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    frame_input = next(n for n in spec.input_names if n not in spec.recurrent)  # the frame fed at every step
    out = []
    for f in feeds:
        clip = f["__clip__"]
        state: dict[str, np.ndarray] = {}
        for t in range(clip.shape[1]):
            frame = clip[:, t]
            feed = {frame_input: frame}
            for name, source in spec.recurrent.items():
                if t == 0:  # first step: the frame itself for a frame input, zeros for a state
                    if source in spec.input_names:
                        feed[name] = frame
                    else:
                        c = shapes[name][1]
                        feed[name] = np.zeros((frame.shape[0], c, *frame.shape[2:]), np.float32)
                else:
                    feed[name] = state[source]
            out.append(feed)
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
            state = {**feed, **outs}
    return out
