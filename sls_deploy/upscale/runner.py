"""A finished bundle opened for inference: ``infer(lr) -> sr`` on ONNX Runtime, PyTorch or a TensorRT engine.

The runner comes from the runtime layer (backends/runtime.py ``open_runner``; the PyTorch weights from
backends/loading.py).

``ort`` (default) runs the bundle's graph of the chosen precision through Polygraphy's ``OnnxrtRunner`` (on the
CUDA execution provider when the device is a GPU and onnxruntime-gpu is installed, else on the CPU);
``trt`` runs ``engine/model.plan`` through Polygraphy's ``TrtRunner`` (TensorRT required, the engine built by
`sls-deploy engine`); ``torch`` runs the finetuned weights in PyTorch on the device (FP32 only, image models). Image models run
tile by tile; video models (a clip graph of T frames, or a step graph with its state) run whole frames through
``backends.drive.FrameStream``, frame by frame.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sls_deploy.core.bundle import RECIPE, WEIGHTS, Bundle
from sls_deploy.core.errors import BundleError, UsageError
from sls_deploy.core.vocabulary import BACKENDS, TORCH


@dataclass(frozen=True)
class Opened:
    recipe: object
    scale: int
    min_size: int
    input_name: str
    output_name: str
    modality: str  # image | clip | step
    spec: object


class Session:
    """An opened bundle: ``image(x)`` for image models, ``stream()`` (a FrameStream) for video models."""

    def __init__(self, opened: Opened, infer=None, runner=None):
        self.opened, self._infer, self.runner = opened, infer, runner

    def image(self, x: np.ndarray) -> np.ndarray:
        return self._infer(x)

    def stream(self):
        from sls_deploy.backends.drive import FrameStream

        if self.runner is None:
            raise UsageError("--backend torch runs image models only; upscale a video model with --backend ort")
        return FrameStream(self.runner, self.opened.spec)


def open_bundle(root: Path) -> Opened:
    """The bundle's recipe and graph names, checked to be an image model's finished bundle."""
    from sls_deploy.backends.loading import graph_spec
    from sls_deploy.config.recipe import load_recipe

    Bundle(root).require()
    if not (root / RECIPE).is_file():
        raise BundleError(f"{root} has no {RECIPE}: not a finished bundle")
    recipe = load_recipe(root / RECIPE)
    spec = graph_spec(recipe)
    return Opened(recipe, recipe.scale, recipe.adapter.min_input_size(recipe.model), spec.input_names[0],
                  spec.output_names[0], recipe.modality, spec)


@contextlib.contextmanager
def open_infer(root: Path, opened: Opened, backend: str, precision: str, device=None) -> Iterator:
    """Yield a Session: ``image((1, 3, h, w) float32) -> (1, 3, h*s, w*s)``, or ``stream()`` for video models."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if backend == TORCH:
        if precision != "fp32":
            raise UsageError("--backend torch runs the FP32 weights only; use --backend ort for the "
                             f"{precision} graph")
        yield Session(opened, infer=_torch_infer(root, opened, device) if opened.modality == "image" else None)
        return
    from sls_deploy.backends.runtime import open_runner

    runner, dtype = open_runner(root, backend, precision, opened.input_name, device)
    with runner:
        def infer(x: np.ndarray) -> np.ndarray:
            out = runner.infer({opened.input_name: x.astype(dtype, copy=False)})[opened.output_name]
            return np.array(out, dtype=np.float32)  # a copy: runners may reuse their output buffers

        yield Session(opened, infer=infer if opened.modality == "image" else None, runner=runner)


def _torch_infer(root: Path, opened: Opened, device=None):
    import torch

    from sls_deploy.backends.loading import bundle_module

    if not (root / WEIGHTS).is_file():
        raise BundleError(f"{root} has no {WEIGHTS} (finetune it first)")
    module = bundle_module(root, opened.recipe).to(device or "cpu")

    @torch.no_grad()
    def infer(x: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(x).to(device or "cpu")).cpu().numpy()

    return infer
