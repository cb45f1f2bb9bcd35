"""EDSR (Lim et al., 2017) with BasicSR's module names, and its adapter.

Layout: conv_first -> body.{i}.{conv1,conv2} (residual blocks, no BN) -> conv_after_body (+ skip)
-> upsample (conv + PixelShuffle per factor) -> conv_last. Inputs and outputs are RGB in [0, 1];
the mean shift and the 255 range of the original are folded into the forward pass as BasicSR does (it acts on
the 3 image channels only, so channel pruning never touches it).

Channel groups (``options["widths"]`` = {group: kept units}, see ``EDSR.dense_widths``):

- ``stream``: the residual stream, written by conv_first, every body.{i}.conv2 and conv_after_body (their
  outputs are summed: all keep the same channel indices) and read by every body.{i}.conv1, conv_after_body and
  upsample.0;
- ``body.{i}.conv1``: block i's inner channels (conv1 -> conv2);
- ``upsample.{2j}``: upsampler stage j's post-shuffle channels (unit r*r: 4 per x2 stage, 9 for x3), read by
  the next stage's conv or, for the last stage, conv_last.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import nn

from sls_deploy.core.errors import CheckpointError, RecipeError
from sls_deploy.models.base import (ChannelGroup, check_sizes, ExportSpec, LayerDecl, ModelAdapter, ModelConfig,
                                    convs_with_dense_ends, image_export_spec, parse_widths, seeded_rand)

DEFAULT_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class ResidualBlockNoBN(nn.Module):
    def __init__(self, num_feat: int, res_scale: float, mid: int | None = None):
        super().__init__()
        mid = num_feat if mid is None else mid
        self.conv1 = nn.Conv2d(num_feat, mid, 3, 1, 1)
        self.conv2 = nn.Conv2d(mid, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x))) * self.res_scale


def _upsample_factors(scale: int) -> list[int]:
    """PixelShuffle factor of each upsampler stage."""
    if scale >= 1 and scale & (scale - 1) == 0:  # power of two: x2 steps
        return [2] * int(math.log2(scale))
    if scale == 3:
        return [3]
    raise RecipeError(f"EDSR supports scale 2, 3 or 4 (and other powers of two), not {scale}")


def _upsample_layers(scale: int, num_feat: int, outs: list[int] | None = None) -> list[nn.Module]:
    """conv + PixelShuffle per stage; stage j gives ``outs[j]`` post-shuffle channels (default num_feat)."""
    layers: list[nn.Module] = []
    c = num_feat
    for j, r in enumerate(_upsample_factors(scale)):
        out = num_feat if outs is None else outs[j]
        layers += [nn.Conv2d(c, r * r * out, 3, 1, 1), nn.PixelShuffle(r)]
        c = out
    return layers


class EDSR(nn.Module):
    def __init__(self, scale: int = 4, num_feat: int = 64, num_block: int = 16, res_scale: float = 1.0,
                 img_range: float = 255.0, rgb_mean: tuple[float, float, float] = DEFAULT_RGB_MEAN,
                 widths: Mapping[str, int] | None = None):
        super().__init__()
        self.scale = scale
        self.img_range = img_range
        self.num_block = num_block
        self.register_buffer("mean", torch.tensor(rgb_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.widths = self.dense_widths(scale, num_feat, num_block)
        unknown = sorted(set(widths or {}) - set(self.widths))
        if unknown:
            raise RecipeError(f"EDSR has no channel group '{unknown[0]}' (known: {', '.join(self.widths)})")
        self.widths.update(widths or {})
        w = self.widths
        stream = w["stream"]
        self.conv_first = nn.Conv2d(3, stream, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(stream, res_scale, w[f"body.{i}.conv1"])
                                    for i in range(num_block)])
        self.conv_after_body = nn.Conv2d(stream, stream, 3, 1, 1)
        ups = [w[f"upsample.{2 * j}"] for j in range(len(_upsample_factors(scale)))]
        self.upsample = nn.Sequential(*_upsample_layers(scale, stream, ups))
        self.conv_last = nn.Conv2d(ups[-1], 3, 3, 1, 1)

    @staticmethod
    def dense_widths(scale: int, num_feat: int, num_block: int) -> dict[str, int]:
        """{group name: units} of the unpruned model, in forward order."""
        return {"stream": num_feat, **{f"body.{i}.conv1": num_feat for i in range(num_block)},
                **{f"upsample.{2 * j}": num_feat for j in range(len(_upsample_factors(scale)))}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        res = self.conv_after_body(self.body(x)) + x
        x = self.conv_last(self.upsample(res))
        return x / self.img_range + self.mean


# Official EDSR-PyTorch (sanghyun-son) names -> BasicSR names. body.{n_resblocks} is the conv after the body.
_OFFICIAL_PATTERNS = [
    (re.compile(r"^head\.0\.(weight|bias)$"), r"conv_first.\1"),
    (re.compile(r"^body\.(\d+)\.body\.0\.(weight|bias)$"), r"body.\1.conv1.\2"),
    (re.compile(r"^body\.(\d+)\.body\.2\.(weight|bias)$"), r"body.\1.conv2.\2"),
    (re.compile(r"^tail\.0\.(\d+)\.(weight|bias)$"), r"upsample.\1.\2"),
    (re.compile(r"^tail\.1\.(weight|bias)$"), r"conv_last.\1"),
]


def _official_shift(sd: Mapping[str, torch.Tensor], key: str, sign: float) -> tuple[float, ...]:
    """The RGB shift of an official MeanShift 1x1 conv (weight = I, bias = sign * rgb_range * mean): rgb_range
    times the mean, the range being whatever ``--rgb_range`` the checkpoint was trained with (255 or 1)."""
    w, b = sd[f"{key}.weight"].float(), sd[f"{key}.bias"].float()
    if w.shape != (3, 3, 1, 1) or not torch.allclose(w.view(3, 3), torch.eye(3), atol=1e-4):
        raise CheckpointError(f"{key}.weight is not an identity MeanShift (std != 1 is not supported)")
    return tuple((b * sign).tolist())


class EDSRAdapter(ModelAdapter):
    arch = "edsr"

    def parse_config(self, section: Mapping[str, Any]) -> ModelConfig:
        known = {"arch", "scale", "num_feat", "num_block", "res_scale", "img_range", "rgb_mean", "widths"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise RecipeError(f"model.{unknown[0]} is not an EDSR option (known: {', '.join(sorted(known))})")
        try:
            scale = int(section.get("scale", 4))
            opts = {
                "num_feat": int(section.get("num_feat", 64)),
                "num_block": int(section.get("num_block", 16)),
                "res_scale": float(section.get("res_scale", 1.0)),
                "img_range": float(section.get("img_range", 255.0)),
                "rgb_mean": tuple(float(v) for v in section.get("rgb_mean", DEFAULT_RGB_MEAN)),
            }
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(.inf)
            raise RecipeError(f"model section: {e}") from None
        if scale not in (2, 3, 4, 8):
            raise RecipeError(f"model.scale must be 2, 3, 4 or 8 for EDSR, not {scale}")
        check_sizes(opts)
        if len(opts["rgb_mean"]) != 3:
            raise RecipeError("model.rgb_mean must have 3 values")
        widths = parse_widths(section.get("widths"), EDSR.dense_widths(scale, opts["num_feat"], opts["num_block"]),
                              "edsr")
        if widths:  # only when given: dense configs (and their build keys) stay as they were
            opts["widths"] = widths
        return ModelConfig(arch=self.arch, scale=scale, options=opts)

    def build(self, cfg: ModelConfig) -> nn.Module:
        o = dict(cfg.options)
        widths = o.pop("widths", None) or None
        return EDSR(scale=cfg.scale, widths=widths, **o)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        """Block inner channels, the upsampler's post-shuffle channels (unit r*r) and the residual stream.

        The stream has several producers (conv_first, every block's conv2, conv_after_body: their outputs are
        summed, so all keep the same indices); conv_after_body both reads and writes it.
        """
        blocks = range(len(model.body))
        groups = [ChannelGroup(f"body.{i}.conv1", f"body.{i}.conv1", (f"body.{i}.conv2",)) for i in blocks]
        convs = [(i, m) for i, m in enumerate(model.upsample) if isinstance(m, nn.Conv2d)]
        shuffles = [m for m in model.upsample if isinstance(m, nn.PixelShuffle)]
        for j, (i, _) in enumerate(convs):
            r = shuffles[j].upscale_factor
            nxt = f"upsample.{convs[j + 1][0]}" if j + 1 < len(convs) else "conv_last"
            groups.append(ChannelGroup(f"upsample.{i}", f"upsample.{i}", (nxt,), r * r))
        producers = ("conv_first", *(f"body.{i}.conv2" for i in blocks), "conv_after_body")
        consumers = (*(f"body.{i}.conv1" for i in blocks), "conv_after_body", f"upsample.{convs[0][0]}")
        return [ChannelGroup("stream", "conv_first", consumers, 1, producers)] + groups

    def feature_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Every residual block's output: the stream after that block."""
        return tuple(f"body.{i}" for i in range(len(model.body)))

    def layers(self, model: nn.Module) -> list[LayerDecl]:
        return convs_with_dense_ends(model)

    def key_map(self, keys) -> dict[str, str]:
        """Official EDSR-PyTorch names -> ours (identity for BasicSR names). MeanShift keys map to nothing."""
        keys = list(keys)
        if "head.0.weight" not in keys:  # already BasicSR layout
            return {k: k for k in keys}
        body_ids = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^body\.(\d+)\.", k))})
        after_body = str(body_ids[-1]) if body_ids else None
        out: dict[str, str] = {}
        for key in keys:
            if key.startswith(("sub_mean.", "add_mean.")):
                continue
            if after_body is not None and re.match(rf"^body\.{after_body}\.(weight|bias)$", key):
                out[key] = "conv_after_body." + key.rsplit(".", 1)[1]
                continue
            for pattern, repl in _OFFICIAL_PATTERNS:
                if pattern.match(key):
                    out[key] = pattern.sub(repl, key)
                    break
            else:
                out[key] = key  # left as is; the fit check names it if it does not belong
        return out

    def convert_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        out = {new: sd[old] for old, new in self.key_map(sd).items()}
        if "head.0.weight" not in sd:
            return out
        want, rng = cfg.options["rgb_mean"], cfg.options["img_range"]
        for key, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
            if f"{key}.bias" not in sd:
                continue
            shift = _official_shift(sd, key, sign)
            if all(abs(a - rng * b) <= 1e-3 * max(rng, 1.0) for a, b in zip(shift, want)):
                continue  # the recipe's mean and range, confirmed by the checkpoint
            for trained in (255.0, 1.0):
                if trained != rng and all(abs(a - trained * b) <= 1e-3 * trained for a, b in zip(shift, want)):
                    raise CheckpointError(
                        f"{key}.bias: the checkpoint was trained with rgb_range {trained:g} (MeanShift bias = "
                        f"{trained:g} x mean); set model.img_range: {trained:g} in the recipe (it has {rng:g})")
            raise CheckpointError(
                f"{key}.bias: checkpoint RGB shift {tuple(round(v, 4) for v in shift)} is neither 255 nor 1 times "
                f"the recipe's model.rgb_mean {tuple(want)}")
        return out

    def default_fp32_islands(self, model: nn.Module) -> list[str]:
        """First conv, last conv and the final upsampler conv (the SLS paper found it the most sensitive)."""
        ups = [f"upsample.{i}" for i, m in enumerate(model.upsample) if isinstance(m, nn.Conv2d)]
        return ["conv_first", ups[-1], "conv_last"]

    def export_spec(self, cfg: ModelConfig) -> ExportSpec:
        return image_export_spec()

    def example_input(self, cfg: ModelConfig, height: int, width: int, batch: int = 1) -> torch.Tensor:
        return seeded_rand((batch, 3, height, width))
