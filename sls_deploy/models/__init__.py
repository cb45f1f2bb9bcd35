"""Model adapters, looked up by the recipe's ``model.arch``."""

from __future__ import annotations

from ..errors import UsageError
from .base import ChannelGroup, ExportSpec, LayerDecl, ModelAdapter, ModelConfig
from .basicvsr import BasicVSRAdapter, StreamVSRAdapter
from .edsr import EDSRAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {"edsr": EDSRAdapter, "basicvsr": BasicVSRAdapter,
                                            "streamvsr": StreamVSRAdapter}


def get_adapter(arch: str) -> ModelAdapter:
    try:
        return _ADAPTERS[arch]()
    except KeyError:
        raise UsageError(f"unknown model architecture '{arch}' (known: {', '.join(sorted(_ADAPTERS))})") from None


def known_archs() -> list[str]:
    return sorted(_ADAPTERS)


__all__ = ["ChannelGroup", "ExportSpec", "LayerDecl", "ModelAdapter", "ModelConfig", "get_adapter", "known_archs"]
