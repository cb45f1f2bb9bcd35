"""A small encoder-decoder image deblurring network (scale 1), and its adapter.

Layout (C = num_feat, every block a residual ``conv1 -> ReLU -> conv2`` of inner width ``widths[group]``):

    conv_first (3 -> C) -> enc0 (blocks, C)                                  full resolution
    down1 (3x3 stride 2, C -> 2C) -> enc1 (blocks, 2C)                       1/2
    down2 (3x3 stride 2, 2C -> 4C) -> middle (blocks, 4C)                    1/4
    up2 (1x1, 4C -> 4*2C) + PixelShuffle(2), + enc1 -> dec1 (blocks, 2C)     1/2
    up1 (1x1, 2C -> 4*C) + PixelShuffle(2), + enc0 -> dec0 (blocks, C)       full
    conv_last (C -> 3), + input (global residual)

The two stride-2 levels need H and W divisible by 4: the forward pass reflect-pads the input to the next multiple
of 4 and crops the output back, so any size from 4 up works (also in the ONNX graph, whose H/W are dynamic).
The input degradation (``Blur``: Gaussian or linear motion blur, reflect border) is declared by the adapter
from the recipe's ``model.blur`` section; the baseline is the blurred input itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.core.errors import CheckpointError, DataError, RecipeError
from sls_deploy.data.degradations import BLUR_KINDS, Degradation, blur_from_options
from sls_deploy.models.blocks import ResidualBlockNoBN
from sls_deploy.models.base import (ChannelGroup, check_sizes, ExportSpec, LayerDecl, ModelAdapter, ModelConfig,
                                    convs_with_dense_ends, image_export_spec, parse_widths, seeded_rand)

MULTIPLE = 4  # two stride-2 levels
LEVELS = ("enc0", "enc1", "middle", "dec1", "dec0")
LEVEL_MULT = {"enc0": 1, "enc1": 2, "middle": 4, "dec1": 2, "dec0": 1}
BLUR_DEFAULTS: dict[str, Any] = {"kind": list(BLUR_KINDS), "sigma": [0.8, 2.0], "motion_len": [5, 11],
                                 "noise": 0.0, "seed": 0}


def block_group(level: str, i: int) -> str:
    """Name of the channel group (= its producer) of block i's inner channels at ``level``."""
    return f"{level}.{i}.conv1"


class DeblurNet(nn.Module):
    def __init__(self, num_feat: int = 32, num_block: int = 1, widths: Mapping[str, int] | None = None):
        super().__init__()
        self.num_feat, self.num_block = num_feat, num_block
        self.widths = self.dense_widths(num_feat, num_block)
        unknown = sorted(set(widths or {}) - set(self.widths))
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a channel group of DeblurNet")
        self.widths.update(widths or {})
        c = num_feat
        self.conv_first = nn.Conv2d(3, c, 3, 1, 1)
        self.enc0 = self._blocks("enc0")
        self.down1 = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.enc1 = self._blocks("enc1")
        self.down2 = nn.Conv2d(2 * c, 4 * c, 3, 2, 1)
        self.middle = self._blocks("middle")
        self.up2 = nn.Conv2d(4 * c, 4 * 2 * c, 1, 1, 0)
        self.dec1 = self._blocks("dec1")
        self.up1 = nn.Conv2d(2 * c, 4 * c, 1, 1, 0)
        self.dec0 = self._blocks("dec0")
        self.conv_last = nn.Conv2d(c, 3, 3, 1, 1)
        self.shuffle = nn.PixelShuffle(2)
        with torch.no_grad():  # start near the identity (output = input)
            self.conv_last.weight.mul_(0.1)
            self.conv_last.bias.zero_()

    @classmethod
    def dense_widths(cls, num_feat: int, num_block: int) -> dict[str, int]:
        """{group name: units} of the unpruned model, in forward order."""
        return {block_group(lv, i): LEVEL_MULT[lv] * num_feat for lv in LEVELS for i in range(num_block)}

    def _blocks(self, level: str) -> nn.Sequential:
        feat = LEVEL_MULT[level] * self.num_feat
        return nn.Sequential(*[ResidualBlockNoBN(feat, self.widths[block_group(level, i)]) for i in range(self.num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        ph, pw = (MULTIPLE - h % MULTIPLE) % MULTIPLE, (MULTIPLE - w % MULTIPLE) % MULTIPLE
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect")
        e0 = self.enc0(self.conv_first(xp))
        e1 = self.enc1(self.down1(e0))
        m = self.middle(self.down2(e1))
        d1 = self.dec1(self.shuffle(self.up2(m)) + e1)
        d0 = self.dec0(self.shuffle(self.up1(d1)) + e0)
        out = self.conv_last(d0) + xp
        return out[:, :, :h, :w]


class DeblurAdapter(ModelAdapter):
    arch = "deblur"
    defaults: dict[str, Any] = {"num_feat": 32, "num_block": 1}

    def parse_config(self, section: Mapping[str, Any]) -> ModelConfig:
        known = {"arch", "scale", "num_feat", "num_block", "blur", "widths"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise RecipeError(f"model.{unknown[0]} is not a deblur option (known: {', '.join(sorted(known))})")
        try:
            scale = int(section.get("scale", 1))
            opts: dict[str, Any] = {k: int(section.get(k, v)) for k, v in self.defaults.items()}
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(.inf)
            raise RecipeError(f"model section: {e}") from None
        if scale != 1:
            raise RecipeError(f"model.scale must be 1 for deblur (same size in and out), not {scale}")
        check_sizes(opts)
        opts["blur"] = self._parse_blur(section.get("blur"))
        opts["widths"] = parse_widths(section.get("widths"), DeblurNet.dense_widths(opts["num_feat"], opts["num_block"]),
                                      "deblur")
        return ModelConfig(arch=self.arch, scale=scale, options=opts)

    @staticmethod
    def _parse_blur(blur: Any) -> dict[str, Any]:
        if blur is None:
            blur = {}
        if not isinstance(blur, Mapping):
            raise RecipeError("model.blur must be a mapping (kind, sigma, motion_len, noise, seed)")
        unknown = sorted(set(blur) - set(BLUR_DEFAULTS))
        if unknown:
            raise RecipeError(f"model.blur.{unknown[0]} is not a blur option (known: {', '.join(BLUR_DEFAULTS)})")
        out = {**BLUR_DEFAULTS, **blur}
        kind = out["kind"]
        out["kind"] = [kind] if isinstance(kind, str) else kind
        try:
            deg = blur_from_options(out["kind"], out["sigma"], out["motion_len"], out["noise"], out["seed"])
        except (TypeError, ValueError, DataError) as e:
            raise RecipeError(f"model.blur: {str(e).splitlines()[0]}") from None
        return {"kind": list(deg.kinds), "sigma": list(deg.sigma), "motion_len": list(deg.motion_len),
                "noise": deg.noise, "seed": deg.seed}

    def build(self, cfg: ModelConfig) -> nn.Module:
        o = cfg.options
        return DeblurNet(num_feat=o["num_feat"], num_block=o["num_block"], widths=o.get("widths") or None)

    def degradation(self, cfg: ModelConfig) -> Degradation:
        b = {**BLUR_DEFAULTS, **cfg.options.get("blur", {})}
        return blur_from_options(b["kind"], b["sigma"], b["motion_len"], b["noise"], b["seed"])

    def layers(self, model: nn.Module) -> list[LayerDecl]:
        return convs_with_dense_ends(model)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        """Each residual block's inner channels (conv1 out -> conv2 in), unit 1. The residual streams, which
        the skips, downsampling and PixelShuffle stages join, stay full width."""
        return [ChannelGroup(block_group(lv, i), block_group(lv, i), (f"{lv}.{i}.conv2",))
                for lv in LEVELS for i in range(model.num_block)]

    def convert_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Our own names (a ``params``/``params_ema`` or ``module.`` wrapper is unwrapped); a checkpoint of
        another layout or width is rejected with the first key that does not fit."""
        for key in ("params_ema", "params"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        out = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        want = {k: tuple(v.shape) for k, v in self.build(cfg).state_dict().items()}
        for key, value in out.items():
            if key not in want:
                raise CheckpointError(f"checkpoint does not fit deblur: unexpected key '{key}' "
                                      "(not a DeblurNet checkpoint?)")
            if tuple(value.shape) != want[key]:
                raise CheckpointError(f"checkpoint does not fit deblur: key '{key}' has shape {tuple(value.shape)}, "
                                      f"the recipe's model needs {want[key]} (num_feat/num_block/widths differ?)")
        missing = [k for k in want if k not in out]
        if missing:
            raise CheckpointError(f"checkpoint does not fit deblur: key '{missing[0]}' is missing from the checkpoint")
        return out

    def default_fp32_islands(self, model: nn.Module) -> list[str]:
        """First and last conv: the full-resolution image-space layers (the output is input + conv_last, so
        its error lands on the pixels unattenuated)."""
        return ["conv_first", "conv_last"]

    def min_input_size(self, cfg: ModelConfig) -> int:
        """The reflect padding to a multiple of 4 needs at least 4 pixels."""
        return MULTIPLE

    def export_spec(self, cfg: ModelConfig) -> ExportSpec:
        return image_export_spec()

    def example_input(self, cfg: ModelConfig, height: int, width: int, batch: int = 1) -> torch.Tensor:
        return seeded_rand((batch, 3, height, width))


__all__ = ["DeblurAdapter", "DeblurNet", "block_group"]
