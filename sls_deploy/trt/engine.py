"""The TensorRT engine stage, on NVIDIA Polygraphy's loaders.

Engines are specific to a GPU and a TensorRT version, so `engine` runs on the machine that will serve them.
Precision comes from the graph chosen (model.onnx / model.fp16.onnx / model.int8.onnx): TensorRT 11 parses it
as a strongly typed network; on TensorRT 10 the FP16/INT8 builder flags are also set so the graph's reduced
precision layers are allowed. Sparse weights are enabled with the global SPARSE_WEIGHTS flag: a layer is
eligible only when its weights follow 2:4, which the plan decided.

Without TensorRT only ``--dry-run`` works: it writes engine/build.json with the settings and the equivalent
``trtexec`` / ``polygraphy convert`` command lines. Nothing here pretends an engine was built.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sls_deploy.core import atomic
from sls_deploy.core.bundle import GRAPH_FILES
from sls_deploy.core.errors import BackendMissingError, UsageError

ENGINE_DIR = "engine"
TRT_HINT = ("TensorRT was not found (import tensorrt failed): on x86 install it with "
            "pip install 'sls-deploy[tensorrt]' (NVIDIA's wheels), on Jetson it comes with JetPack")


def require_tensorrt():
    """The tensorrt module, or a one-line BackendMissingError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendMissingError(TRT_HINT) from None
    return tensorrt


def tensorrt_major() -> int | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return int(str(tensorrt.__version__).split(".")[0])


@dataclass(frozen=True)
class EngineSettings:
    precision: str
    graph: str  # file name inside the bundle
    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    sparse_weights: bool
    workspace_mb: int
    timing_cache: str = f"{ENGINE_DIR}/timing.cache"
    engine_file: str = f"{ENGINE_DIR}/model.plan"
    profiling_verbosity: str = "detailed"

    def out_name(self, name: str) -> str:
        """engine/<name>, with ".dense" before the suffix for the --sparsity disable baseline build."""
        stem, dot, ext = name.partition(".")
        return f"{stem}.dense.{ext}" if not self.sparse_weights else name

    def precision_flags(self, trt_major: int | None) -> dict[str, bool]:
        """TensorRT 10: FP16/INT8 flags allow the graph's reduced precision. TensorRT 11: strongly typed, none."""
        if trt_major is not None and trt_major >= 11:
            return {}
        return {"fp16": self.precision in ("fp16", "int8"), "int8": self.precision == "int8"}

    def strongly_typed(self, trt_major: int | None) -> bool:
        return trt_major is not None and trt_major >= 11


def engine_settings(recipe, precision: str, sparsity: str, workspace_mb: int | None = None) -> EngineSettings:
    if precision not in GRAPH_FILES:
        raise UsageError(f"unknown precision '{precision}' (known: {', '.join(GRAPH_FILES)})")
    if sparsity not in ("enable", "disable"):
        raise UsageError(f"--sparsity must be enable or disable, not '{sparsity}'")
    p = recipe.engine
    spec = recipe.adapter.export_spec(recipe.model)
    # a --sparsity disable engine is the dense baseline `validate --backend trt` times the sparse one against
    return EngineSettings(precision=precision, graph=GRAPH_FILES[precision], input_name=spec.input_names[0],
                          min_shape=p.min_shape, opt_shape=p.opt_shape, max_shape=p.max_shape,
                          sparse_weights=sparsity == "enable", workspace_mb=workspace_mb or p.workspace_mb,
                          engine_file=f"{ENGINE_DIR}/{'model.plan' if sparsity == 'enable' else 'model.dense.plan'}")


def polygraphy_loaders(s: EngineSettings, bundle_root: Path, trt_major: int | None):
    """The Polygraphy objects of the build (constructible without TensorRT; calling them needs it)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile().add(s.input_name, min=s.min_shape, opt=s.opt_shape, max=s.max_shape)
    cache = bundle_root / s.timing_cache
    config = CreateConfig(**s.precision_flags(trt_major), sparse_weights=s.sparse_weights, profiles=[profile],
                          memory_pool_limits=_workspace(s.workspace_mb),
                          load_timing_cache=str(cache) if cache.is_file() else None,
                          profiling_verbosity=_verbosity(s.profiling_verbosity))
    network = NetworkFromOnnxPath(str(bundle_root / s.graph), strongly_typed=s.strongly_typed(trt_major) or None)
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(cache))
    return network, config, engine


def _workspace(mb: int):
    try:
        import tensorrt as trt
    except ImportError:  # the key is only resolvable with TensorRT; the dry run records the number
        return None
    return {trt.MemoryPoolType.WORKSPACE: mb * 2**20}


def _verbosity(name: str):
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return {"detailed": trt.ProfilingVerbosity.DETAILED, "layer_names_only": trt.ProfilingVerbosity.LAYER_NAMES_ONLY,
            "none": trt.ProfilingVerbosity.NONE}[name]


def _dims(shape: tuple[int, ...], sep: str = "x") -> str:
    return sep.join(str(v) for v in shape)


def trtexec_command(s: EngineSettings, trt_major: int | None) -> list[str]:
    cmd = ["trtexec", f"--onnx={s.graph}", f"--saveEngine={s.engine_file}",
           f"--minShapes={s.input_name}:{_dims(s.min_shape)}", f"--optShapes={s.input_name}:{_dims(s.opt_shape)}",
           f"--maxShapes={s.input_name}:{_dims(s.max_shape)}", f"--memPoolSize=workspace:{s.workspace_mb}M",
           f"--timingCacheFile={s.timing_cache}", "--profilingVerbosity=detailed",
           f"--exportLayerInfo={ENGINE_DIR}/{s.out_name('inspector.json')}", f"--sparsity={'enable' if s.sparse_weights else 'disable'}"]
    if s.strongly_typed(trt_major):
        cmd.append("--stronglyTyped")
    cmd += [f"--{k}" for k, v in s.precision_flags(trt_major).items() if v]
    return cmd + ["--verbose"]


def polygraphy_command(s: EngineSettings, trt_major: int | None) -> list[str]:
    cmd = ["polygraphy", "convert", s.graph, "--convert-to", "trt", "-o", s.engine_file,
           "--trt-min-shapes", f"{s.input_name}:[{_dims(s.min_shape, ',')}]",
           "--trt-opt-shapes", f"{s.input_name}:[{_dims(s.opt_shape, ',')}]",
           "--trt-max-shapes", f"{s.input_name}:[{_dims(s.max_shape, ',')}]",
           "--pool-limit", f"workspace:{s.workspace_mb}M", "--load-timing-cache", s.timing_cache,
           "--save-timing-cache", s.timing_cache, "--profiling-verbosity", "detailed"]
    if s.sparse_weights:
        cmd.append("--sparse-weights")
    if s.strongly_typed(trt_major):
        cmd.append("--strongly-typed")
    return cmd + [f"--{k}" for k, v in s.precision_flags(trt_major).items() if v]


def build_plan(s: EngineSettings, trt_major: int | None) -> dict[str, Any]:
    """What `engine` does (or would do): the settings and the equivalent command lines, for engine/build.json."""
    path = ("TensorRT >= 11: strongly typed network, precision from the graph" if s.strongly_typed(trt_major) else
            "TensorRT 10: builder precision flags set from the graph's precision" if trt_major == 10 else
            "TensorRT not found here: shown for TensorRT 10 (flags); with 11 use --stronglyTyped and no flags")
    return {"settings": asdict(s), "tensorrt_major": trt_major, "path": path,
            "trtexec": shlex.join(trtexec_command(s, trt_major)),
            "polygraphy": shlex.join(polygraphy_command(s, trt_major))}


def dry_run(bundle_root: Path, s: EngineSettings) -> dict[str, Any]:
    info = build_plan(s, tensorrt_major())
    info["dry_run"] = True
    atomic.write_json(bundle_root / ENGINE_DIR / s.out_name("build.json"), info)
    return info


def build_engine(bundle_root: Path, s: EngineSettings, plan_layers: list[dict]) -> dict[str, Any]:
    """Build and save the engine with Polygraphy; write the build log, inspector JSON and engine/layers.json."""
    trt = require_tensorrt()  # before anything is written
    from polygraphy.backend.trt import SaveEngine
    from polygraphy.logger import G_LOGGER

    from sls_deploy.trt.layers import layer_report, onnx_layer_nodes

    major = tensorrt_major()
    out = bundle_root / ENGINE_DIR
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / s.out_name("build.log")
    G_LOGGER.severity = G_LOGGER.VERBOSE  # TensorRT's "(Sparsity) ..." lines are informational/verbose
    G_LOGGER.log_file = str(log_path)
    t0 = time.perf_counter()
    _, _, engine_loader = polygraphy_loaders(s, bundle_root, major)
    with atomic.atomic_path(bundle_root / s.engine_file) as tmp:
        engine = SaveEngine(engine_loader, str(tmp))()
    inspector = engine.create_engine_inspector()
    info_json = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    atomic.write_text(out / s.out_name("inspector.json"), info_json)
    layers = layer_report(plan_layers, onnx_layer_nodes(bundle_root / s.graph), json.loads(info_json),
                          log_path.read_text(errors="replace"))
    atomic.write_json(out / s.out_name("layers.json"), layers)
    info = build_plan(s, major) | {"dry_run": False, "seconds": round(time.perf_counter() - t0, 1),
                                   "tensorrt_version": str(trt.__version__)}
    atomic.write_json(out / s.out_name("build.json"), info)
    return info
