"""BasicVSR (Chan et al., CVPR 2021) and a streaming forward-only variant, with BasicSR's module names.

BasicVSR: SpyNet flows between adjacent frames; a backward and a forward recurrent branch, each a trunk of
residual blocks fed with ``cat([frame, warped hidden state])``; per frame, ``fusion`` (1x1) of both branches
-> two x2 PixelShuffle stages -> ``conv_hr`` -> ``conv_last`` + bilinear x4 of the frame. Inputs/outputs are
RGB in [0, 1], clips (N, T, 3, H, W) -> (N, T, 3, 4H, 4W).

StreamVSR: the forward branch alone, one frame per step (``step``), so it can run on a live stream.

Everything here exports with the TorchScript ONNX exporter (``dynamo=False``, opset 17) with dynamic H/W:
sizes are taken from tensor shapes and combined with tensor arithmetic, never turned into Python numbers,
so the trace records them as graph ops instead of freezing the example's size.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.core.errors import RecipeError
from sls_deploy.models.blocks import ResidualBlockNoBN
from sls_deploy.models.base import ChannelGroup, check_sizes, ExportSpec, LayerDecl, ModelAdapter, ModelConfig, parse_widths

SPYNET_MEAN = (0.485, 0.456, 0.406)  # ImageNet, as SpyNet was trained
SPYNET_STD = (0.229, 0.224, 0.225)
HR_FEAT = 64  # BasicSR hard-codes 64 channels after the first upsampling stage (upconv2 out / 4, conv_hr)


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``x`` (N, C, H, W) at ``pixel + flow``; ``flow`` is (N, 2, H, W) in pixels, channel 0 = x (width).

    Bilinear, align_corners=True (BasicSR's convention: pixel i sits at -1 + 2i/(size-1)). Unlike BasicSR's
    flow_warp the flow is channels-first, the layout SpyNet produces. Exports as ONNX GridSample (opset 16+).
    """
    xs = torch.arange(x.shape[3], dtype=flow.dtype, device=flow.device)  # a Range op in the graph: dynamic
    ys = torch.arange(x.shape[2], dtype=flow.dtype, device=flow.device)
    # size - 1 read off the coordinate vector itself, clamped to 1 for a size of 1 (as BasicSR's max(w-1, 1))
    gx = (xs.view(1, 1, -1) + flow[:, 0]) * (2.0 / xs[-1:].clamp(min=1.0)) - 1.0
    gy = (ys.view(1, -1, 1) + flow[:, 1]) * (2.0 / ys[-1:].clamp(min=1.0)) - 1.0
    grid = torch.stack((gx, gy), dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


class SpyNetBasicModule(nn.Module):
    """One pyramid level: [ref, warped supp, flow] (8 ch) -> flow residual (2 ch), five 7x7 convs."""

    def __init__(self):
        super().__init__()
        chans = (8, 32, 64, 32, 16, 2)
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 7, 1, 3))
            if i < 4:
                layers.append(nn.ReLU(inplace=False))
        self.basic_module = nn.Sequential(*layers)
        # A fresh SpyNet predicts zero flow (no alignment) instead of random flows; pretrained weights replace this.
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic_module(x)


class SpyNet(nn.Module):
    """SpyNet (Ranjan & Black, 2017) as BasicSR runs it: 6-level pyramid, coarse-to-fine residual flows.

    ``forward(ref, supp)`` returns the flow (N, 2, H, W) in pixels that warps ``supp`` onto ``ref``. The frames
    are resized (bilinear) to the next multiple of 32 and the flow is resized back and rescaled.
    """

    levels = 6

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList([SpyNetBasicModule() for _ in range(self.levels)])
        # persistent, as in BasicSR: its checkpoints hold spynet.mean / spynet.std
        self.register_buffer("mean", torch.tensor(SPYNET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(SPYNET_STD).view(1, 3, 1, 1))

    def process(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """The flow at a size that is a multiple of 32 (every pyramid level exactly halves)."""
        refs = [(ref - self.mean) / self.std]
        supps = [(supp - self.mean) / self.std]
        for _ in range(self.levels - 1):
            refs.insert(0, F.avg_pool2d(refs[0], kernel_size=2, stride=2, count_include_pad=False))
            supps.insert(0, F.avg_pool2d(supps[0], kernel_size=2, stride=2, count_include_pad=False))
        flow = torch.zeros_like(refs[0][:, :2])  # BasicSR upsamples a zero flow here: still zero
        for level in range(self.levels):
            if level > 0:
                flow = F.interpolate(flow, scale_factor=2.0, mode="bilinear", align_corners=True) * 2.0
            warped = flow_warp(supps[level], flow, padding_mode="border")
            flow = self.basic_module[level](torch.cat([refs[level], warped, flow], dim=1)) + flow
        return flow

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        h, w = ref.shape[2], ref.shape[3]
        # (h + 31) // 32 * 32 on traced sizes stays a graph op; math.ceil would freeze the example's size
        h32, w32 = (h + 31) // 32 * 32, (w + 31) // 32 * 32
        ref = F.interpolate(ref, size=(h32, w32), mode="bilinear", align_corners=False)
        supp = F.interpolate(supp, size=(h32, w32), mode="bilinear", align_corners=False)
        flow = F.interpolate(self.process(ref, supp), size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([flow[:, :1] * (w / w32), flow[:, 1:] * (h / h32)], dim=1)


class ConvResidualBlocks(nn.Module):
    """main.0: conv num_in -> num_out, main.1: LeakyReLU(0.1), main.2.{i}: residual blocks of inner width mids[i]."""

    def __init__(self, num_in: int, num_out: int, num_block: int, mids: list[int] | None = None,
                 reads: list[int] | None = None, writes: list[int] | None = None):
        super().__init__()
        mids = [num_out] * num_block if mids is None else list(mids)
        reads = [num_out] * num_block if reads is None else list(reads)
        writes = [num_out] * num_block if writes is None else list(writes)
        if not len(mids) == len(reads) == len(writes) == num_block:
            raise ValueError(f"{len(mids)} block widths for {num_block} blocks")
        self.main = nn.Sequential(
            nn.Conv2d(num_in, num_out, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.Sequential(*[ResidualBlockNoBN(num_out, m, r, w) for m, r, w in zip(mids, reads, writes)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def trunk_group(trunk: str, i: int) -> str:
    """Name of the group (= producer) of block i's inner channels."""
    return f"{trunk}.main.2.{i}.conv1"


def rsc_groups(trunk: str, i: int) -> tuple[str, str]:
    """Names of block i's Residual Sparsity Connection groups: the stream channels conv1 reads and the stream
    channels conv2 writes back."""
    return f"{trunk}.main.2.{i}.read", f"{trunk}.main.2.{i}.write"


class _VSRBase(nn.Module):
    """What BasicVSR and StreamVSR share: SpyNet, trunk construction, the x4 reconstruction head."""

    trunks: tuple[str, ...] = ()
    has_fusion = False

    def __init__(self, num_feat: int, num_block: int, scale: int, spynet: bool,
                 widths: Mapping[str, int] | None):
        super().__init__()
        if scale != 4:
            raise ValueError(f"{type(self).__name__} is x4 only, not x{scale}")
        self.num_feat, self.num_block, self.scale = num_feat, num_block, scale
        self.widths = self.dense_widths(num_feat, num_block)
        unknown = sorted(set(widths or {}) - set(self.widths))
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a channel group of {type(self).__name__}")
        self.widths.update(widths or {})
        self.spynet = SpyNet() if spynet else None

    @classmethod
    def dense_widths(cls, num_feat: int, num_block: int) -> dict[str, int]:
        """{group name: units} of the unpruned model (BasicSR's widths), in forward order."""
        widths = {trunk_group(t, i): num_feat for t in cls.trunks for i in range(num_block)}
        widths.update({g: num_feat for t in cls.trunks for i in range(num_block) for g in rsc_groups(t, i)})
        if cls.has_fusion:
            widths["fusion"] = num_feat
        return {**widths, "upconv1": num_feat, "upconv2": HR_FEAT, "conv_hr": HR_FEAT}

    def _trunk(self, name: str) -> ConvResidualBlocks:
        mids = [self.widths[trunk_group(name, i)] for i in range(self.num_block)]
        reads = [self.widths[rsc_groups(name, i)[0]] for i in range(self.num_block)]
        writes = [self.widths[rsc_groups(name, i)[1]] for i in range(self.num_block)]
        return ConvResidualBlocks(self.num_feat + 3, self.num_feat, self.num_block, mids, reads, writes)

    def _head(self, in_ch: int) -> None:
        """upconv1 -> shuffle -> upconv2 -> shuffle -> conv_hr -> conv_last (registered after the trunks)."""
        u1, u2, hr = self.widths["upconv1"], self.widths["upconv2"], self.widths["conv_hr"]
        self.upconv1 = nn.Conv2d(in_ch, 4 * u1, 3, 1, 1)
        self.upconv2 = nn.Conv2d(u1, 4 * u2, 3, 1, 1)
        self.conv_hr = nn.Conv2d(u2, hr, 3, 1, 1)
        self.conv_last = nn.Conv2d(hr, 3, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.lrelu = nn.LeakyReLU(0.1, inplace=True)

    def reconstruct(self, feat: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.pixel_shuffle(self.upconv1(feat)))
        out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        return out + F.interpolate(lr, scale_factor=4.0, mode="bilinear", align_corners=False)

    def flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor | None:
        """Flow warping ``supp``'s features onto ``ref``; None without SpyNet (no alignment)."""
        return None if self.spynet is None else self.spynet(ref, supp)

    @staticmethod
    def align(hidden: torch.Tensor, flow: torch.Tensor | None) -> torch.Tensor:
        return hidden if flow is None else flow_warp(hidden, flow)


class BasicVSR(_VSRBase):
    """Bidirectional BasicVSR, x4: (N, T, 3, H, W) in [0, 1] -> (N, T, 3, 4H, 4W)."""

    trunks = ("backward_trunk", "forward_trunk")
    has_fusion = True

    def __init__(self, num_feat: int = 64, num_block: int = 15, scale: int = 4, spynet: bool = True,
                 widths: Mapping[str, int] | None = None):
        super().__init__(num_feat, num_block, scale, spynet, widths)
        self.backward_trunk = self._trunk("backward_trunk")
        self.forward_trunk = self._trunk("forward_trunk")
        self.fusion = nn.Conv2d(2 * num_feat, self.widths["fusion"], 1, 1, 0)
        self._head(self.widths["fusion"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.unbind(1)  # T is a Python int (the graph unrolls over it); N, H, W stay traced sizes
        n, t, h, w = x.shape[0], len(frames), x.shape[3], x.shape[4]
        flows_backward = flows_forward = None
        if self.spynet is not None and t > 1:
            x1 = x[:, :-1].reshape(-1, 3, h, w)
            x2 = x[:, 1:].reshape(-1, 3, h, w)
            flows_backward = self.spynet(x1, x2).view(n, t - 1, 2, h, w)  # warps frame i+1 onto frame i
            flows_forward = self.spynet(x2, x1).view(n, t - 1, 2, h, w)  # warps frame i onto frame i+1
        zeros = torch.zeros_like(frames[0][:, :1]).expand(-1, self.num_feat, -1, -1)  # shape-agnostic zero state

        backward: list[torch.Tensor] = [zeros] * t
        feat = zeros
        for i in range(t - 1, -1, -1):
            if i < t - 1:
                feat = self.align(feat, None if flows_backward is None else flows_backward[:, i])
            feat = self.backward_trunk(torch.cat([frames[i], feat], dim=1))
            backward[i] = feat

        out = []
        feat = zeros
        for i in range(t):
            if i > 0:
                feat = self.align(feat, None if flows_forward is None else flows_forward[:, i - 1])
            feat = self.forward_trunk(torch.cat([frames[i], feat], dim=1))
            fused = self.lrelu(self.fusion(torch.cat([backward[i], feat], dim=1)))
            out.append(self.reconstruct(fused, frames[i]))
        return torch.stack(out, dim=1)


class StreamVSR(_VSRBase):
    """Unidirectional (forward-only) BasicVSR for streams, x4: one LR frame in, one SR frame out per step.

    Same module names as BasicVSR's forward half (spynet, forward_trunk, upconv1, upconv2, conv_hr, conv_last),
    but there is no ``fusion``: the hidden state feeds upconv1 directly (there is no backward branch to fuse).
    """

    trunks = ("forward_trunk",)
    has_fusion = False

    def __init__(self, num_feat: int = 64, num_block: int = 15, scale: int = 4, spynet: bool = True,
                 widths: Mapping[str, int] | None = None):
        super().__init__(num_feat, num_block, scale, spynet, widths)
        self.forward_trunk = self._trunk("forward_trunk")
        self._head(num_feat)

    def initial_hidden(self, n: int, h: int, w: int) -> torch.Tensor:
        """The hidden state before the first frame (zeros), on the model's device and dtype."""
        p = self.forward_trunk.main[0].weight
        return torch.zeros(n, self.num_feat, h, w, device=p.device, dtype=p.dtype)

    def step(self, prev_lr: torch.Tensor, lr: torch.Tensor,
             hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: (prev_lr, lr, hidden) (N,3,H,W)/(N,C,H,W) -> (sr (N,3,4H,4W), new hidden (N,C,H,W)).

        At t=0 pass prev_lr=lr and hidden=initial_hidden(...).
        """
        hidden = self.align(hidden, self.flow(lr, prev_lr))
        hidden = self.forward_trunk(torch.cat([lr, hidden], dim=1))
        return self.reconstruct(hidden, lr), hidden

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) -> (N, T, 3, 4H, 4W) by stepping frame by frame (training and evaluation)."""
        hidden = self.initial_hidden(clip.shape[0], clip.shape[3], clip.shape[4])
        out = []
        for i in range(clip.shape[1]):
            sr, hidden = self.step(clip[:, max(i - 1, 0)], clip[:, i], hidden)
            out.append(sr)
        return torch.stack(out, dim=1)


class StreamVSRStep(nn.Module):
    """StreamVSR.step as a forward(prev_lr, lr, hidden), for the step graph.

    Holds the model's own submodules under their own names, so the ONNX initializers keep ``<layer>.weight``.
    """

    def __init__(self, model: StreamVSR):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._step = model.step  # a bound method, not a submodule: parameters are registered once, above

    def forward(self, prev_lr: torch.Tensor, lr: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step(prev_lr, lr, hidden)


class _VSRAdapter(ModelAdapter):
    """Shared adapter code; subclasses set ``model_cls``."""

    model_cls: type[_VSRBase] = BasicVSR
    defaults: ClassVar[dict[str, Any]] = {"num_feat": 64, "num_block": 15, "spynet": True, "clip_len": 5}

    def parse_config(self, section: Mapping[str, Any]) -> ModelConfig:
        known = {"arch", "scale", "widths", *self.defaults}
        unknown = sorted(set(section) - known)
        if unknown:
            raise RecipeError(f"model.{unknown[0]} is not a {self.arch} option (known: {', '.join(sorted(known))})")
        try:
            scale = int(section.get("scale", 4))
            opts: dict[str, Any] = {
                "num_feat": int(section.get("num_feat", self.defaults["num_feat"])),
                "num_block": int(section.get("num_block", self.defaults["num_block"])),
                "clip_len": int(section.get("clip_len", self.defaults["clip_len"])),
            }
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(.inf)
            raise RecipeError(f"model section: {e}") from None
        spynet = section.get("spynet", True)
        if not isinstance(spynet, bool):
            raise RecipeError(f"model.spynet must be true or false, not {spynet!r}")
        opts["spynet"] = spynet
        if scale != 4:
            raise RecipeError(f"model.scale must be 4 for {self.arch}, not {scale}")
        check_sizes(opts)
        opts["widths"] = parse_widths(section.get("widths"),
                                      self.model_cls.dense_widths(opts["num_feat"], opts["num_block"]), self.arch)
        return ModelConfig(arch=self.arch, scale=scale, options=opts)

    def build(self, cfg: ModelConfig) -> nn.Module:
        o = cfg.options
        return self.model_cls(num_feat=o["num_feat"], num_block=o["num_block"], scale=cfg.scale,
                              spynet=o.get("spynet", True), widths=o.get("widths") or None)

    def layers(self, model: nn.Module) -> list[LayerDecl]:
        out = []
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Conv2d):
                continue
            if name.startswith("spynet."):
                out.append(LayerDecl(name, "conv", False, "optical flow (SpyNet) stays dense"))
            elif name.endswith("trunk.main.0"):
                out.append(LayerDecl(name, "conv", False, "first trunk conv (frame + hidden -> C) writes the "
                                     "hidden state, stays dense"))
            elif name == "conv_last":
                out.append(LayerDecl(name, "conv", False, "last conv (C -> 3) stays dense"))
            else:
                out.append(LayerDecl(name, "conv", True))
        return out

    def state_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Each trunk's output is the branch's hidden state at one time step (called once per frame)."""
        return tuple(model.trunks)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        """Block inner channels, the blocks' Residual Sparsity Connections, fusion out, both PixelShuffle stages
        (unit 4), conv_hr out.

        The residual stream (= the hidden state) keeps its full width; with RSC (SSL) each block reads a subset
        of it (group ``...read``: conv1's input channels, gathered by ``read_idx``) and writes a subset back
        (group ``...write``: conv2's output channels, added at ``write_idx``). ``--keep-full '*.read' --keep-full
        '*.write'`` turns RSC off (blocks read and write the whole stream).
        """
        groups = []
        for t in model.trunks:
            for i in range(model.num_block):
                blk = f"{t}.main.2.{i}"
                read, write = rsc_groups(t, i)
                groups += [ChannelGroup(trunk_group(t, i), trunk_group(t, i), (f"{blk}.conv2",)),
                           ChannelGroup(read, "", (f"{blk}.conv1",), index=f"{blk}.read_idx"),
                           ChannelGroup(write, f"{blk}.conv2", (), index=f"{blk}.write_idx")]
        if model.has_fusion:
            groups.append(ChannelGroup("fusion", "fusion", ("upconv1",)))
        return groups + [ChannelGroup("upconv1", "upconv1", ("upconv2",), 4),
                         ChannelGroup("upconv2", "upconv2", ("conv_hr",), 4),
                         ChannelGroup("conv_hr", "conv_hr", ("conv_last",))]

    def convert_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """BasicSR's names are ours. A ``params``/``params_ema`` wrapper is unwrapped (read_state_dict does it
        for files); SpyNet's mean/std are filled in when a checkpoint lacks them. The fit check is load_weights'."""
        for key in ("params_ema", "params"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        out = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if cfg.options.get("spynet", True) and any(k.startswith("spynet.basic_module.") for k in out):
            out.setdefault("spynet.mean", torch.tensor(SPYNET_MEAN).view(1, 3, 1, 1))
            out.setdefault("spynet.std", torch.tensor(SPYNET_STD).view(1, 3, 1, 1))
        return out

    def default_fp32_islands(self, model: nn.Module) -> list[str]:
        """Every SpyNet conv (the flow network: its pixel-valued residual flows accumulate over the pyramid and
        steer the warp of the recurrent state), conv_hr and conv_last (the last, HR-resolution convs, as EDSR's
        final upsampler conv and last conv). With the GridSample island (``fp32_island_ops``) this is the
        conservative choice: measured on the shipped small weights (320x180 LR), FP16 and INT8 stay within
        0.01 dB of FP32 even with SpyNet in FP16/INT8; it is the sampling grid that must stay FP32."""
        spynet = [n for n, m in model.named_modules() if n.startswith("spynet.") and isinstance(m, nn.Conv2d)]
        return spynet + ["conv_hr", "conv_last"]

    def fp32_island_ops(self) -> tuple[str, ...]:
        """GridSample (the flow warps of SpyNet's pyramid and of the hidden state) with its sampling grid and the
        flow arithmetic behind it. grid = (pixel + flow) * 2 / (size - 1) - 1 in FP16 rounds a coordinate of
        256..511 px to 1/4 px and a grid value near +-1 to 1/2048 (0.08 px at 320 px wide, growing with the
        width). Measured on the shipped small BasicVSR at 320x180 LR: an FP16 grid puts the FP16 graph's output
        at 65 dB PSNR from the FP32 output, an FP32 grid at 74 dB. Also ScatterND: the dynamo exporter lowers RSC's
        index add to ScatterND with reduction "add", which ONNX Runtime's CPU provider cannot run in FP16 (the
        TorchScript exporter writes ScatterElements, which it can; an op type absent from a graph keeps nothing)."""
        return ("GridSample", "ScatterND")

    def min_input_size(self, cfg: ModelConfig) -> int:
        """SpyNet resizes to a multiple of 32 itself; below 16 px there is nothing left to align."""
        return 16

    def _rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand(*shape, generator=g)


class BasicVSRAdapter(_VSRAdapter):
    """BasicVSR; the graph is one clip of ``clip_len`` frames (T is fixed at export, H/W are dynamic)."""

    arch = "basicvsr"
    model_cls = BasicVSR

    def export_spec(self, cfg: ModelConfig) -> ExportSpec:
        return ExportSpec(input_names=("lr",), output_names=("sr",),
                          dynamic_axes={"lr": {3: "height", 4: "width"}, "sr": {3: "out_height", 4: "out_width"}})

    def example_input(self, cfg: ModelConfig, height: int, width: int, batch: int = 1) -> torch.Tensor:
        return self._rand((batch, cfg.options.get("clip_len", 5), 3, height, width))

    def modalities(self) -> tuple[str, ...]:
        return ("clip",)


class StreamVSRAdapter(_VSRAdapter):
    """StreamVSR; the graph is one step: (prev_lr, lr, hidden) -> (sr, hidden_out), dynamic H/W."""

    arch = "streamvsr"
    model_cls = StreamVSR

    def export_spec(self, cfg: ModelConfig) -> ExportSpec:
        hw = {2: "height", 3: "width"}
        return ExportSpec(input_names=("prev_lr", "lr", "hidden"), output_names=("sr", "hidden_out"),
                          dynamic_axes={"prev_lr": hw, "lr": hw, "hidden": hw,
                                        "sr": {2: "out_height", 3: "out_width"}, "hidden_out": hw},
                          recurrent={"hidden": "hidden_out", "prev_lr": "lr"})

    def export_module(self, model: nn.Module) -> nn.Module:
        return StreamVSRStep(model)

    def example_input(self, cfg: ModelConfig, height: int, width: int,
                      batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prev_lr, lr, hidden) of a mid-clip step (two different frames, a non-zero hidden state)."""
        frames = self._rand((batch, 2, 3, height, width))
        hidden = self._rand((batch, cfg.options["num_feat"], height, width)) - 0.5
        return frames[:, 0], frames[:, 1], hidden

    def modalities(self) -> tuple[str, ...]:
        return ("step",)
