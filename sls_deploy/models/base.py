"""The adapter interface: everything the pipeline needs to know about one architecture.

Generic stages (sparsity, training, export, validation) only talk to an adapter; they never import a
concrete model. An adapter declares explicitly which layers may be pruned and which stay dense, and
maps foreign checkpoint layouts onto its own module names.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from sls_deploy.core.errors import RecipeError

from sls_deploy.data.degradations import BicubicDown, Degradation


# torch.onnx's exporters: "dynamo" (torch.export-based, dynamo=True; opset >= 18) is the default, "torchscript"
# (dynamo=False) stays an option: PyTorch deprecated it in 2.9.
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportSpec:
    """Declarative description of a model's ONNX interface (in the spirit of Optimum's OnnxConfig)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    opset: int = DEFAULT_OPSET
    exporter: str = DEFAULT_EXPORTER  # one of EXPORTERS
    # Step graphs of streaming models: {input name: the name whose value it takes at the next step}, e.g.
    # {"hidden": "hidden_out", "prev_lr": "lr"} (an output, or an input of the previous step). Empty for
    # graphs that are run once per input.
    recurrent: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerDecl:
    """One weight layer as the adapter declares it."""

    name: str
    op: str  # "conv" or "linear"
    prunable: bool
    reason: str = ""  # why a layer stays dense


@dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together, declared by the adapter (never inferred by a tracer).

    Unit k is output channels [k*unit, (k+1)*unit) of ``producer`` (weight rows and bias) and input channel k
    of every conv in ``consumers``. unit = r*r for a conv that feeds PixelShuffle(r) (group k becomes
    post-shuffle channel k), else 1.

    A group may have several producers (``producers``): convs whose outputs are added into one shared stream
    (a residual trunk), so output unit k of every producer is the same channel k of the stream. All producers
    and all consumers then keep the SAME unit indices. A stream layer may be both a producer and a consumer
    of its group (EDSR's conv_after_body reads and writes the stream). ``producers`` defaults to
    ``(producer,)``; when it is given, ``producer`` must be its first entry (or empty, then it is filled in).

    A group with ``index`` is a subset of a full-width tensor that stays full width (SSL's Residual Sparsity
    Connection): with no producer, its consumers read (gather) the kept channels of that tensor; with a producer
    and no consumers, the producer's kept output channels are added back into it (scatter). ``index`` names the
    model's buffer holding those channel indices (absent in a model where the group is whole).
    """

    name: str
    producer: str
    consumers: tuple[str, ...]
    unit: int = 1
    producers: tuple[str, ...] = ()
    index: str = ""  # a subset of a wider tensor: the model's buffer naming which channels (see below)

    def __post_init__(self) -> None:
        prods = tuple(self.producers)
        if not prods and not self.producer and self.index:
            if not self.consumers:
                raise ValueError(f"channel group '{self.name}' has neither producer nor consumers")
            return  # a gather group: consumers read the kept channels of a full-width tensor
        if not prods:
            if not self.producer:
                raise ValueError(f"channel group '{self.name}' has no producer")
            prods = (self.producer,)
        elif not self.producer:
            object.__setattr__(self, "producer", prods[0])
        elif self.producer != prods[0]:
            raise ValueError(f"channel group '{self.name}': producer '{self.producer}' is not the first of its "
                             f"producers {prods}")
        if len(set(prods)) != len(prods):
            raise ValueError(f"channel group '{self.name}' lists a producer twice")
        object.__setattr__(self, "producers", prods)
        object.__setattr__(self, "consumers", tuple(self.consumers))

    @property
    def multi(self) -> bool:
        """True for a stream group (several producers)."""
        return len(self.producers) > 1


@dataclass
class ModelConfig:
    """The model section of a recipe, already validated by the adapter."""

    arch: str
    scale: int
    options: dict[str, Any] = field(default_factory=dict)


class ModelAdapter(abc.ABC):
    """One architecture: build it, declare its layers, load checkpoints onto it."""

    arch: str = ""

    @abc.abstractmethod
    def parse_config(self, section: Mapping[str, Any]) -> ModelConfig:
        """Validate the recipe's ``model`` section; raise RecipeError on bad fields."""

    @abc.abstractmethod
    def build(self, cfg: ModelConfig) -> nn.Module:
        """A fresh, randomly initialised model."""

    @abc.abstractmethod
    def layers(self, model: nn.Module) -> list[LayerDecl]:
        """Every conv/linear layer with its prunable flag, in forward order."""

    def key_map(self, keys) -> dict[str, str]:
        """Foreign parameter names -> this adapter's names (keys mapped to nothing are dropped)."""
        return {k: k for k in keys}

    @abc.abstractmethod
    def convert_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Map a foreign checkpoint layout (BasicSR, official repos, ...) onto this adapter's names."""

    @abc.abstractmethod
    def export_spec(self, cfg: ModelConfig) -> ExportSpec:
        """Names and dynamic axes of the ONNX graph."""

    @abc.abstractmethod
    def example_input(self, cfg: ModelConfig, height: int, width: int,
                      batch: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """An input of the given low-resolution size (values in [0, 1]): the arguments of ``export_module``'s
        forward (one tensor, or a tuple for a graph with several inputs)."""

    def min_input_size(self, cfg: ModelConfig) -> int:
        """The smallest LR height/width the model accepts (and that calibration images must have)."""
        return 8

    def degradation(self, cfg: ModelConfig) -> Degradation:
        """How the model's inputs are made from ground-truth images (training patches, evaluation pairs) and the
        baseline reports compare against. Default: bicubic downscaling by ``cfg.scale`` (super-resolution)."""
        return BicubicDown(cfg.scale)

    def default_fp32_islands(self, model: nn.Module) -> list[str]:
        """Layers an FP16/INT8 graph keeps at FP32 unless the recipe says otherwise."""
        return []

    def fp32_island_ops(self) -> tuple[str, ...]:
        """ONNX op types an FP16/INT8 graph keeps at FP32, whatever layer they belong to (for GridSample also
        the arithmetic computing its sampling grid: see ``sls_deploy.onnx.precision.graph.op_island_nodes``).
        Default: none."""
        return ()

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        """Channel groups a structured pruner may shrink; their kept widths come back as ``options["widths"]``
        ({group name: kept units}), which ``build`` honours. Default: none (no structured pruning)."""
        return []

    def export_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward is exactly the ONNX graph (same parameter names as ``model``)."""
        return model

    def state_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Modules whose output, at each call, is the recurrent hidden state of one time step (what temporal
        finetuning distils from the dense model). Default: none (not a recurrent model)."""
        return ()

    def feature_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Modules whose outputs keep the dense model's shape while the residual stream is kept full width (what
        feature distillation compares with the dense model). Default: none."""
        return ()

    def modalities(self) -> tuple[str, ...]:
        """How data can meet this model, the default first: "image" (N,C,H,W in, one frame out), "clip"
        (N,T,C,H,W: a window of frames per graph run) or "step" (one step of a recurrent model: the graph's
        state inputs are fed back from its outputs, see ExportSpec.recurrent). A recipe may pick another one
        this list names (top-level ``modality:``)."""
        return ("image",)


SIZE_LIMITS = {"num_feat": 4096, "num_block": 1024, "clip_len": 1024}  # far above any real model, far below a
# value whose per-block bookkeeping alone would exhaust memory


def check_sizes(opts: Mapping[str, Any]) -> None:
    """Architecture sizes in ``opts`` between 1 and SIZE_LIMITS (one-line RecipeError otherwise)."""
    for k, hi in SIZE_LIMITS.items():
        if k in opts and not 1 <= opts[k] <= hi:
            raise RecipeError(f"model.{k} must be between 1 and {hi}, not {opts[k]}")


def parse_widths(widths: Any, dense: Mapping[str, int], arch: str) -> dict[str, int]:
    """The recipe's ``model.widths`` ({channel group: kept units}) checked against the dense widths; {} if none."""
    if widths is None:
        return {}
    if not isinstance(widths, Mapping):
        raise RecipeError("model.widths must be a mapping {channel group: kept units}")
    out = {}
    for name, value in widths.items():
        if name not in dense:
            raise RecipeError(f"model.widths: '{name}' is not a channel group of {arch} (known: {', '.join(dense)})")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= dense[name]:
            raise RecipeError(f"model.widths.{name} must be an integer in 1..{dense[name]}, not {value!r}")
        out[str(name)] = value
    return out


def convs_with_dense_ends(model: nn.Module) -> list[LayerDecl]:
    """Every Conv2d, prunable except ``conv_first`` (3 -> C) and ``conv_last`` (C -> 3), which stay dense."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d):
            continue
        if name == "conv_first":
            out.append(LayerDecl(name, "conv", False, "first conv (3 -> C) stays dense"))
        elif name == "conv_last":
            out.append(LayerDecl(name, "conv", False, "last conv (C -> 3) stays dense"))
        else:
            out.append(LayerDecl(name, "conv", True))
    return out


def image_export_spec() -> ExportSpec:
    """One image in (``lr``), one out (``sr``), dynamic batch, height and width: an image model's graph."""
    return ExportSpec(input_names=("lr",), output_names=("sr",),
                      dynamic_axes={"lr": {0: "batch", 2: "height", 3: "width"},
                                    "sr": {0: "batch", 2: "out_height", 3: "out_width"}})


def seeded_rand(shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed pseudo-random input in [0, 1) (the same for every call, so example inputs are reproducible)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))
