"""A bundle opened for use: every file a consumer reads is checked before it is read.

``open_for_use(path, use)`` takes a bundle folder, an unpacked pack (a folder with pack.json) or a packed tar
(.tar.gz, .tgz or .tar, unpacked beside it first, see ``packing.unpack``). It checks recipe.yaml and every file
in ``use`` against the sha256 the bundle's manifest (a pack: its pack.json) recorded, and every ONNX graph among
them with onnx.checker (full check) and for weights kept outside the graph file. Anything else is one
BundleError line naming the file. ``upscale``, ``route``, ``engine``, ``pack`` and ``validate`` read bundles
through here; ``VerifiedBundle.verify`` checks more files once the consumer knows which it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sls_deploy.core.bundle import GRAPH_FILES, PLAN, RECIPE, WEIGHTS, Bundle
from sls_deploy.core.errors import BundleError
from sls_deploy.core.packing import is_packed, unpack, verify_packed


@dataclass(frozen=True)
class VerifiedBundle:
    root: Path
    packed: bool  # a pack's folder (checked against pack.json), not the folder a build wrote

    def path(self, name: str) -> Path:
        return self.root / name

    def verify(self, names: Iterable[str]) -> None:
        """Each named file is present, matches its recorded sha256 and, for a graph, passes the graph checks."""
        names = list(names)
        if self.packed:
            verify_packed(self.root, names)
        else:
            Bundle(self.root).verify(names)
        for name in names:
            if name.endswith(".onnx"):
                check_graph_file(self.root / name)


def open_for_use(path: str | Path, use: Iterable[str] = ()) -> VerifiedBundle:
    """``path`` (folder, unpacked pack or packed tar) with recipe.yaml and ``use`` checked; see the module doc."""
    path = Path(path)
    opened = VerifiedBundle(unpack(path) if path.is_file() else path, packed=is_packed(path))
    opened.verify([RECIPE, *use])
    return opened


def inference_files(backend: str, precision: str) -> list[str]:
    """The bundle files a backend reads to run the model: ``ort`` the graph of ``precision``, ``torch`` the plan
    and the finetuned weights, ``trt`` none (its engine is built on the device, after the manifest)."""
    if backend == "ort":
        return [GRAPH_FILES[precision]] if precision in GRAPH_FILES else []
    return [PLAN, WEIGHTS] if backend == "torch" else []


def check_graph_file(path: Path) -> None:
    """onnx.checker's full check, and no tensor kept outside the graph file: a bundle's graphs hold their
    weights, so external data (which the manifest does not cover, or which points out of the bundle) is refused
    before ONNX Runtime or TensorRT would read it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from sls_deploy.core.onnx_files import check_graph, load_onnx

    if path.stat().st_size == 0:
        load_onnx(path)  # `inspect`'s reading: "... is empty (0 bytes), not an ONNX model"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - corrupt: load_onnx says so in one line
        load_onnx(path)
        raise BundleError(f"cannot read {path} as ONNX (corrupt?)") from None
    for t in model.graph.initializer:
        if uses_external_data(t):
            where = next((e.value for e in t.external_data if e.key == "location"), "?")
            raise BundleError(f"{path}: tensor '{t.name[:60]}' keeps its data outside the graph file "
                              f"('{where[:60]}'); a bundle's graphs hold their weights (refused, nothing was read)")
    check_graph(path)  # onnx.checker, full check
