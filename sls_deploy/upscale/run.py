"""`sls-deploy upscale`: every input through the bundle, tile by tile, with a progress bar; one output per input.

Every input and every output path is checked before the first output is written (``media.collect``,
``outputs.plan``); each output path is checked again just before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.core.errors import DataError, UsageError
from sls_deploy.core.opening import inference_files, open_for_use
from sls_deploy.data.images import dims
from sls_deploy.upscale.media import Job, VideoWriter, collect, read_image, video_frames, video_info, write_png
from sls_deploy.upscale.outputs import Outputs, plan
from sls_deploy.upscale.runner import open_bundle, open_infer
from sls_deploy.upscale.tiling import check_tiling, tile_count, upscale_tiled

REPLACING = {"own": "its own earlier output, unchanged", "force": "--force"}


def upscale(bundle: Path, inputs: list[str], out_dir: Path, *, backend: str = "ort", precision: str = "fp32",
            tile: int = 256, overlap: int = 16, progress: bool = True, force: bool = False,
            log: Callable[[str], None] = print) -> list[dict]:
    """Upscale every input into ``out_dir``; returns one record per output (path, sizes, frames, seconds).
    ``force``: replace existing files in ``out_dir`` that upscale did not write (never an input, never a file in
    a bundle, never anything but a regular file)."""
    open_for_use(bundle, inference_files(backend, precision))  # recipe and graph/weights match the manifest
    opened = open_bundle(bundle)
    check_tiling(tile, overlap, opened.min_size)
    jobs = collect(inputs, out_dir, opened.min_size)  # every input checked before anything runs
    if opened.modality != "image":
        images = [j.source for j in jobs if j.kind == "image"]
        if images:
            raise UsageError(f"{images[0]}: {opened.recipe.describe_model()} is a video model; give it videos")
        if backend == "torch":
            raise UsageError("--backend torch runs image models only; upscale a video model with --backend ort")
    folder, verdicts = plan([j.output for j in jobs], [j.source for j in jobs], out_dir, force)
    with open_infer(bundle, opened, backend, precision) as session:
        folder.create()
        try:
            return _run_jobs(jobs, verdicts, session, opened, tile, overlap, progress, folder, log)
        except BaseException:
            folder.remove_if_unused()  # a run that wrote nothing leaves no empty folder behind
            raise


def _run_jobs(jobs: list[Job], verdicts: dict[Path, str], session, opened, tile: int, overlap: int,
              progress: bool, folder: Outputs, log: Callable[[str], None]) -> list[dict]:
    import time

    records = []
    for job in jobs:
        t0 = time.perf_counter()
        if job.note:
            log(f"{job.source}: {job.note}")
        if job.kind == "image":
            rec = _image(job, session.image, opened, tile, overlap, progress, folder)
        elif opened.modality == "image":
            rec = _video(job, session.image, opened, tile, overlap, progress, folder)
        else:
            rec = _video_model(job, session.stream(), opened, progress, folder)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        if job.note:
            rec["note"] = job.note
        verdict = verdicts[job.output]
        log(f"{job.source} -> {job.output} ({rec['output_size'][0]}x{rec['output_size'][1]}"
            + (f", {rec['frames']} frames at {rec['fps']:g} fps" if job.kind == "video" else "")
            + (f", replaced: {REPLACING[verdict]}" if verdict in REPLACING else "")
            + f", {rec['seconds']:.1f} s)")
        records.append(rec)
    return records


def _written(job: Job, folder: Outputs, write: Callable[[], str]) -> None:
    """Check ``job.output`` again (nothing took its place since the plan), write it, and record it as ours."""
    folder.check(job.output)
    try:
        digest = write()
    except OSError as e:
        raise DataError(f"cannot write {job.output}: {e.strerror or e}") from None
    folder.record(job.output, digest)


def _write_video(job: Job, fps: float, folder: Outputs, fill: Callable[[VideoWriter], None]) -> int:
    """Write ``job.output`` (``fill`` appends every frame) under ``atomic_path``'s temporary name, check it again
    just before it takes its name, and record it as ours; returns the frame count. An unfinished video, or one
    cut short by a full disk, leaves no file ("no space left on ...")."""
    folder.check(job.output)
    try:
        with atomic.atomic_path(job.output) as tmp:
            with VideoWriter(tmp, fps) as writer:
                fill(writer)
            folder.check(job.output)  # nothing took its place meanwhile
            digest = atomic.sha256_file(tmp)
    except OSError as e:
        raise DataError(f"cannot write {job.output}: {e.strerror or e}") from None
    folder.record(job.output, digest)
    return writer.frames


def _video_model(job: Job, stream, opened, progress: bool, folder: Outputs) -> dict:
    """A video model: whole frames through the graph (state carried, or T-frame windows), frame by frame."""
    info = video_info(job.source)
    s = opened.scale
    w, h = info.size

    def fill(writer: VideoWriter) -> None:
        from tqdm import tqdm

        def write(frames) -> None:
            for f in frames:
                writer.append(np.round(np.clip(f[0].transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8))

        with tqdm(total=info.frames, desc=job.source.name, unit="frame", disable=not progress, leave=False) as bar:
            for frame in video_frames(job.source):
                if min(frame.shape[:2]) < opened.min_size:
                    raise DataError(f"{job.source}: a frame {dims(frame.shape[1], frame.shape[0])} is smaller than "
                                    f"the model's minimum input of {opened.min_size} px per side")
                write(stream.push(np.ascontiguousarray(frame.transpose(2, 0, 1)[None])))
                bar.update(1)
            write(stream.finish())

    frames = _write_video(job, info.fps, folder, fill)
    return {"input": str(job.source), "output": str(job.output), "input_size": [w, h],
            "output_size": [w * s, h * s], "frames": frames, "fps": info.fps}


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, leave=False)


def _image(job: Job, infer, opened, tile: int, overlap: int, progress: bool, folder: Outputs) -> dict:
    img = read_image(job.source)
    h, w = img.shape[:2]
    s = opened.scale
    out = np.empty((h * s, w * s, 3), dtype=np.uint8)
    with _bar(progress, tile_count(h, w, tile), job.source.name) as bar:
        upscale_tiled(img, infer, s, tile, overlap, out, opened.min_size, on_tile=bar.update)
    _written(job, folder, lambda: write_png(job.output, out))
    return {"input": str(job.source), "output": str(job.output), "input_size": [w, h], "output_size": [w * s, h * s]}


def _video(job: Job, infer, opened, tile: int, overlap: int, progress: bool, folder: Outputs) -> dict:
    info = video_info(job.source)
    s = opened.scale
    w, h = info.size

    def fill(writer: VideoWriter) -> None:
        with _bar(progress, tile_count(h, w, tile) * (info.frames or 0) or None, job.source.name) as bar:
            for frame in video_frames(job.source):
                fh, fw = frame.shape[:2]
                out = np.empty((fh * s, fw * s, 3), dtype=np.uint8)
                upscale_tiled(frame, infer, s, tile, overlap, out, opened.min_size, on_tile=bar.update)
                writer.append(out)

    frames = _write_video(job, info.fps, folder, fill)
    return {"input": str(job.source), "output": str(job.output), "input_size": [w, h],
            "output_size": [w * s, h * s], "frames": frames, "fps": info.fps}
