"""Model adapters, looked up by the recipe's ``model.arch``."""

from __future__ import annotations

from sls_deploy.core.errors import RecipeError
from sls_deploy.models.base import (DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS, ChannelGroup, ExportSpec, LayerDecl,
                                    ModelAdapter, ModelConfig)
from sls_deploy.models.basicvsr import BasicVSRAdapter, StreamVSRAdapter
from sls_deploy.models.deblur import DeblurAdapter
from sls_deploy.models.edsr import EDSRAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {"edsr": EDSRAdapter, "basicvsr": BasicVSRAdapter,
                                            "streamvsr": StreamVSRAdapter, "deblur": DeblurAdapter}


def get_adapter(arch: str) -> ModelAdapter:
    try:
        return _ADAPTERS[arch]()
    except KeyError:
        raise RecipeError(f"unknown model architecture '{arch}' (known: {', '.join(sorted(_ADAPTERS))})") from None


def known_archs() -> list[str]:
    return sorted(_ADAPTERS)


__all__ = ["DEFAULT_EXPORTER", "DEFAULT_OPSET", "EXPORTERS", "ChannelGroup", "ExportSpec", "LayerDecl", "ModelAdapter",
           "ModelConfig", "get_adapter", "known_archs"]
