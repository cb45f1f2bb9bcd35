"""The Modality contract: how data meets the model, one object per modality (image, clip, step).

A modality owns everything about its data at or below the modality layer:

- ``resolve_data``: the files (images) or clip sources a data spec names;
- ``sampler``: training batches (LR/HR patches or clips);
- ``loss``: the training loss (None: plain L1);
- ``evaluate`` / ``baseline``: PSNR/SSIM of an inference function, and the trivial restoration it must beat;
- ``calibration_feeds``: the INT8 calibration feeds of its graph;
- ``packed_eval_data``: the eval data ``pack`` puts into a bundle's tar;
- ``unit``: what one sample is ("image" or "frame"), the unit MACs are reported per;
- ``validation``: the key of its validate driver.

The validate drivers themselves (``stages/validate_image.py``, ``stages/validate_video.py``) stay in ``stages/``:
they read bundles, load models, export the dense graph and write reports through stage-level code, and the
modalities sit below the stages (the stages import them, never the reverse). So a modality names its driver by a
key, and ``stages/validate.py`` holds the one table from that key to the driver: no type switch, and no import
running back up from modalities/ to stages/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch

InferFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Feeds = list[dict[str, np.ndarray]]


class Modality(ABC):
    name: str  # the recipe's ``modality`` value (config.recipe.MODALITIES)
    unit: str  # what one sample is: "image" or "frame"
    validation: str  # the validate driver's key in stages/validate.py: "image" or "video"

    @abstractmethod
    def resolve_data(self, spec: str) -> list:
        """The files (images) or clip sources a data spec names; a missing folder is a one-line DataError."""

    @abstractmethod
    def sampler(self, recipe, spec: str, seed: int, section=None, degradation=None):
        """Training batches from ``spec``, sized by ``section`` (default: the recipe's finetune section), read
        lazily by ``recipe.data_workers`` loader processes; ``degradation`` makes image inputs (default: the
        adapter's)."""

    @abstractmethod
    def loss(self, temporal_weight: float) -> LossFn | None:
        """The training loss; None is plain L1 (the training loop's default)."""

    @abstractmethod
    def evaluate(self, infer: InferFn, data: list, recipe, *, with_ssim: bool = True, degradation=None) -> Any:
        """PSNR/SSIM of ``infer`` on ``data`` (from ``resolve_data``) at the recipe's scale and metric channel;
        the result's ``psnr`` is the mean, ``per_item_psnr()`` the mean per image or clip."""

    @abstractmethod
    def baseline(self, recipe, degradation=None) -> tuple[str, InferFn]:
        """The trivial restoration a model must beat and its label in reports ("bicubic", "blurred input")."""

    @abstractmethod
    def calibration_feeds(self, recipe, calib: str, data: str, input_name: str) -> tuple[Feeds, dict[str, str]]:
        """INT8 calibration feeds ({graph input: array}) and the hashes that key the calibration cache; ``calib``
        is the calibration folder ("builtin": the package's calib/ set), ``data`` the training data spec."""

    @abstractmethod
    def packed_eval_data(self, spec: str) -> list:
        """The eval files ``pack`` adds to a bundle's tar (none for clips: they can be large)."""
