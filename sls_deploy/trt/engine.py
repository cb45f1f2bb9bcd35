"""The TensorRT engine stage, on NVIDIA Polygraphy's loaders.

Engines are specific to a GPU and a TensorRT version, so `engine` runs on the machine that will serve them.
Precision comes from the graph chosen (model.onnx / model.fp16.onnx / model.int8.onnx): TensorRT 11 parses it
as a strongly typed network; on TensorRT 10 the FP16/INT8 builder flags are also set so the graph's reduced
precision layers are allowed. Sparse weights are enabled with the global SPARSE_WEIGHTS flag: a layer is
eligible only when its weights follow 2:4, which the plan decided.

The optimization profile covers every graph input (``profile_shapes``): the recipe's ``engine:`` section gives
batch and LR height/width at min/opt/max, the adapter's example input the rest of each input's shape, so an
image graph (lr), a clip graph (lr: N,T,3,H,W) and a step graph (prev_lr, lr, hidden, sharing H/W) all get one.

Without TensorRT only ``--dry-run`` works: it writes engine/build.json with the settings and the equivalent
``trtexec`` / ``polygraphy convert`` command lines. Nothing here pretends an engine was built.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from sls_deploy.core import atomic
from sls_deploy.core.bundle import GRAPH_FILES
from sls_deploy.backends.tensorrt import require_tensorrt, tensorrt_major
from sls_deploy.core.errors import RecipeError, UsageError

ENGINE_DIR = "engine"
Shape = tuple[int, ...]
LEVELS = ("min", "opt", "max")


@dataclass(frozen=True)
class EngineSettings:
    precision: str
    graph: str  # file name inside the bundle
    # one optimization profile: {graph input: (min, opt, max) shape}, every input of the graph, in its order
    profile: Mapping[str, tuple[Shape, Shape, Shape]]
    sparse_weights: bool
    workspace_mb: int
    timing_cache: str = f"{ENGINE_DIR}/timing.cache"
    engine_file: str = f"{ENGINE_DIR}/model.plan"
    profiling_verbosity: str = "detailed"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.profile)

    def shapes(self, level: str) -> dict[str, Shape]:
        """{input: shape} at "min", "opt" or "max"."""
        i = LEVELS.index(level)
        return {name: shapes[i] for name, shapes in self.profile.items()}

    def to_json(self) -> dict[str, Any]:
        """The settings for engine/build.json: the profile as {input: {"min": [..], "opt": [..], "max": [..]}}."""
        out = {k: v for k, v in asdict(self).items() if k != "profile"}
        out["profile"] = {name: {lv: list(shape) for lv, shape in zip(LEVELS, shapes)}
                          for name, shapes in self.profile.items()}
        return out

    def out_name(self, name: str) -> str:
        """engine/<name>, with ".dense" before the suffix for the --sparsity disable baseline build."""
        stem, dot, ext = name.partition(".")
        return f"{stem}.dense.{ext}" if self.engine_file.endswith(".dense.plan") else name

    def precision_flags(self, trt_major: int | None) -> dict[str, bool]:
        """TensorRT 10: FP16/INT8 flags allow the graph's reduced precision. TensorRT 11: strongly typed, none."""
        if trt_major is not None and trt_major >= 11:
            return {}
        return {"fp16": self.precision in ("fp16", "int8"), "int8": self.precision == "int8"}

    def strongly_typed(self, trt_major: int | None) -> bool:
        return trt_major is not None and trt_major >= 11


def profile_shapes(adapter, cfg, spec, section) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input: (min, opt, max) shape} for every input of the adapter's graph, with nothing model-specific here.

    The recipe's ``engine:`` section gives batch and LR height/width at min/opt/max; the adapter's
    ``example_input(cfg, h, w, batch)`` at each of the three gives the full shape of every input (``spec.
    input_names`` in order): channels, a clip graph's T, a step graph's state width. A dimension that varies
    between min and max must be one of the input's ``spec.dynamic_axes``: the exported graph fixes the others
    (a profile over them would only fail inside TensorRT's parser).
    """
    per_level: dict[str, dict[str, Shape]] = {}
    for level, (n, h, w) in section.levels().items():
        example = adapter.example_input(cfg, h, w, n)
        args = example if isinstance(example, (tuple, list)) else (example,)
        if len(args) != len(spec.input_names):
            raise UsageError(f"the graph has inputs {', '.join(spec.input_names)} but the model's example input "
                             f"has {len(args)} tensor(s)")
        per_level[level] = {name: tuple(int(d) for d in a.shape) for name, a in zip(spec.input_names, args)}
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name in spec.input_names:
        lo, opt, hi = (per_level[lv][name] for lv in LEVELS)
        dynamic = spec.dynamic_axes.get(name, {})
        for axis, (a, b) in enumerate(zip(lo, hi)):
            if a != b and axis not in dynamic:
                raise RecipeError(f"engine: dimension {axis} of graph input '{name}' is fixed in the exported graph "
                                  f"(only {_axes(dynamic)} vary), but engine.min/max make it {a}..{b}")
        out[name] = (lo, opt, hi)
    return out


def _axes(dynamic: Mapping[int, str]) -> str:
    return ", ".join(f"{axis} ({label})" for axis, label in sorted(dynamic.items())) or "none"


def engine_settings(recipe, precision: str, sparsity: str, workspace_mb: int | None = None) -> EngineSettings:
    if precision not in GRAPH_FILES:
        raise UsageError(f"unknown precision '{precision}' (known: {', '.join(GRAPH_FILES)})")
    if sparsity not in ("enable", "disable"):
        raise UsageError(f"--sparsity must be enable or disable, not '{sparsity}'")
    p = recipe.engine
    spec = recipe.adapter.export_spec(recipe.model)
    # a --sparsity disable engine is the dense baseline `validate --backend trt` times the sparse one against
    return EngineSettings(precision=precision, graph=GRAPH_FILES[precision],
                          profile=profile_shapes(recipe.adapter, recipe.model, spec, p),
                          sparse_weights=sparsity == "enable", workspace_mb=workspace_mb or p.workspace_mb,
                          engine_file=f"{ENGINE_DIR}/{'model.plan' if sparsity == 'enable' else 'model.dense.plan'}")


def graph_settings(graph: str, profile: Mapping[str, tuple[Shape, Shape, Shape]], workspace_mb: int,
                   precision: str = "fp32") -> EngineSettings:
    """Settings for a graph that is not one of a bundle's model graphs (a family's router): its own profile,
    dense weights; ``graph`` relative to the folder the engine is built in."""
    return EngineSettings(precision=precision, graph=graph, profile=dict(profile), sparse_weights=False,
                          workspace_mb=workspace_mb)


def polygraphy_loaders(s: EngineSettings, bundle_root: Path, trt_major: int | None):
    """The Polygraphy objects of the build (constructible without TensorRT; calling them needs it)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (lo, opt, hi) in s.profile.items():  # every graph input in the one profile
        profile.add(name, min=lo, opt=opt, max=hi)
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


def _trtexec_shapes(s: EngineSettings, level: str) -> str:
    """trtexec's "name:1x3x32x32,other:1x32x32x32" (every input, comma-separated)."""
    return ",".join(f"{name}:{_dims(shape)}" for name, shape in s.shapes(level).items())


def _polygraphy_shapes(s: EngineSettings, level: str) -> list[str]:
    """polygraphy's "name:[1,3,32,32] other:[1,32,32,32]" (every input after one --trt-*-shapes)."""
    return [f"{name}:[{_dims(shape, ',')}]" for name, shape in s.shapes(level).items()]


def trtexec_command(s: EngineSettings, trt_major: int | None) -> list[str]:
    cmd = ["trtexec", f"--onnx={s.graph}", f"--saveEngine={s.engine_file}",
           f"--minShapes={_trtexec_shapes(s, 'min')}", f"--optShapes={_trtexec_shapes(s, 'opt')}",
           f"--maxShapes={_trtexec_shapes(s, 'max')}", f"--memPoolSize=workspace:{s.workspace_mb}M",
           f"--timingCacheFile={s.timing_cache}", "--profilingVerbosity=detailed",
           f"--exportLayerInfo={ENGINE_DIR}/{s.out_name('inspector.json')}",
           f"--sparsity={'enable' if s.sparse_weights else 'disable'}"]
    if s.strongly_typed(trt_major):
        cmd.append("--stronglyTyped")
    cmd += [f"--{k}" for k, v in s.precision_flags(trt_major).items() if v]
    return cmd + ["--verbose"]


def polygraphy_command(s: EngineSettings, trt_major: int | None) -> list[str]:
    cmd = ["polygraphy", "convert", s.graph, "--convert-to", "trt", "-o", s.engine_file,
           "--trt-min-shapes", *_polygraphy_shapes(s, "min"),
           "--trt-opt-shapes", *_polygraphy_shapes(s, "opt"),
           "--trt-max-shapes", *_polygraphy_shapes(s, "max"),
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
    return {"settings": s.to_json(), "tensorrt_major": trt_major, "path": path,
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
