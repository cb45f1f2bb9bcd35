"""`sls-deploy upscale`: every input through the bundle, tile by tile, with a progress bar; one output per input."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from sls_deploy.core.errors import UsageError
from sls_deploy.upscale.media import Job, VideoWriter, collect, read_image, video_frames, video_info, write_png
from sls_deploy.upscale.runner import open_bundle, open_infer
from sls_deploy.upscale.tiling import check_tiling, tile_count, upscale_tiled


def upscale(bundle: Path, inputs: list[str], out_dir: Path, *, backend: str = "ort", precision: str = "fp32",
            tile: int = 256, overlap: int = 16, progress: bool = True,
            log: Callable[[str], None] = print, device: str | None = None) -> list[dict]:
    """Upscale every input into ``out_dir``; returns one record per output (path, sizes, frames, seconds).
    ``device``: --device (auto, cpu, cuda, cuda:N; None: the recipe's compute.device), resolved before anything
    is written."""
    import time

    from sls_deploy.core.device import inference_device

    opened = open_bundle(bundle)
    where = inference_device(opened.recipe.compute, device)
    check_tiling(tile, overlap, opened.min_size)
    jobs = collect(inputs, out_dir)  # every input checked before anything runs
    if opened.modality != "image":
        images = [j.source for j in jobs if j.kind == "image"]
        if images:
            raise UsageError(f"{images[0]}: {opened.recipe.describe_model()} is a video model; give it videos")
        if backend == "torch":
            raise UsageError("--backend torch runs image models only; upscale a video model with --backend ort")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open_infer(bundle, opened, backend, precision, where) as session:
        for job in jobs:
            t0 = time.perf_counter()
            if job.kind == "image":
                rec = _image(job, session.image, opened, tile, overlap, progress)
            elif opened.modality == "image":
                rec = _video(job, session.image, opened, tile, overlap, progress)
            else:
                rec = _video_model(job, session.stream(), opened, progress)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            log(f"{job.source} -> {job.output} ({rec['output_size'][0]}x{rec['output_size'][1]}"
                + (f", {rec['frames']} frames at {rec['fps']:g} fps" if job.kind == "video" else "")
                + f", {rec['seconds']:.1f} s)")
            records.append(rec)
    return records


def _video_model(job: Job, stream, opened, progress: bool) -> dict:
    """A video model: whole frames through the graph (state carried, or T-frame windows), frame by frame."""
    info = video_info(job.source)
    s = opened.scale
    w, h = info.size
    writer = VideoWriter(job.output, info.fps)
    ok = False

    def write(frames) -> None:
        for f in frames:
            writer.append(np.round(np.clip(f[0].transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8))

    try:
        from tqdm import tqdm

        with tqdm(total=info.frames, desc=job.source.name, unit="frame", disable=not progress, leave=False) as bar:
            for frame in video_frames(job.source):
                if min(frame.shape[:2]) < opened.min_size:
                    raise UsageError(f"{job.source}: frames of {frame.shape[1]}x{frame.shape[0]} are smaller than "
                                     f"the model's minimum input of {opened.min_size} pixels")
                write(stream.push(np.ascontiguousarray(frame.transpose(2, 0, 1)[None])))
                bar.update(1)
            write(stream.finish())
        ok = True
    finally:
        writer.close(ok)
    return {"input": str(job.source), "output": str(job.output), "input_size": [w, h],
            "output_size": [w * s, h * s], "frames": writer.frames, "fps": info.fps}


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, leave=False)


def _image(job: Job, infer, opened, tile: int, overlap: int, progress: bool) -> dict:
    img = read_image(job.source)
    h, w = img.shape[:2]
    s = opened.scale
    out = np.empty((h * s, w * s, 3), dtype=np.uint8)
    with _bar(progress, tile_count(h, w, tile), job.source.name) as bar:
        upscale_tiled(img, infer, s, tile, overlap, out, opened.min_size, on_tile=bar.update)
    write_png(job.output, out)
    return {"input": str(job.source), "output": str(job.output), "input_size": [w, h], "output_size": [w * s, h * s]}


def _video(job: Job, infer, opened, tile: int, overlap: int, progress: bool) -> dict:
    info = video_info(job.source)
    s = opened.scale
    w, h = info.size
    writer = VideoWriter(job.output, info.fps)
    ok = False
    try:
        per = tile_count(h, w, tile)
        with _bar(progress, per * (info.frames or 0) or None, job.source.name) as bar:
            for frame in video_frames(job.source):
                fh, fw = frame.shape[:2]
                out = np.empty((fh * s, fw * s, 3), dtype=np.uint8)
                upscale_tiled(frame, infer, s, tile, overlap, out, opened.min_size, on_tile=bar.update)
                writer.append(out)
        ok = True
    finally:
        writer.close(ok)
    return {"input": str(job.source), "output": str(job.output), "input_size": [w, h],
            "output_size": [w * s, h * s], "frames": writer.frames, "fps": info.fps}
