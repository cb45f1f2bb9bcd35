"""`validate --backend trt`: the bundle's TensorRT engine against the FP32 graph, at every deployment shape.

Needs TensorRT (and a GPU). The reference is the FP32 ONNX graph in ONNX Runtime, so a packed bundle, which
carries no PyTorch weights, can be validated on the device. The same shape checks as the ONNX Runtime backend
run (profile min/opt/max, odd size, extra sizes): a row fails when the engine's PSNR is more than the recipe's
``validate.max_psnr_drop_db[precision]`` below the FP32 graph's. The engine is then timed at the latency
sizes, and side by side with ``engine/model.dense.plan`` when that exists (an engine built from the same graph
with ``--sparsity disable``), which gives the sparse/dense ratio.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.data import resolve_images
from sls_deploy.trt.engine import ENGINE_DIR
from sls_deploy.core.packing import VAL_DIR
from sls_deploy.backends.runners import Limits, check_shapes, ort_infer

DENSE_ENGINE = "model.dense.plan"


@contextlib.contextmanager
def trt_infer(engine_file: Path) -> Iterator[Callable]:
    """An ``infer(lr_tensor) -> np.ndarray`` backed by Polygraphy's TrtRunner."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_file)))) as runner:
        yield lambda lr: np.asarray(runner.infer({"lr": lr.detach().cpu().numpy()})["sr"], np.float32)


def validate_engine(root: Path, recipe, precision: str, eval_data: Path | None, runs: int | None = None,
                    open_engine=trt_infer) -> dict:
    from sls_deploy.core.errors import BundleError
    from sls_deploy.backends.latency import time_side_by_side
    from sls_deploy.stages.validate import shape_sizes

    engine_file = root / ENGINE_DIR / "model.plan"
    if not engine_file.is_file():
        raise BundleError(f"{root} has no {ENGINE_DIR}/model.plan (run `sls-deploy engine {root}` first)")
    files = resolve_images(eval_data or (root / VAL_DIR if (root / VAL_DIR).is_dir() else recipe.data_eval))
    val = recipe.validate
    limit = val.max_drop(precision)
    name = f"tensorrt {precision}"
    dense_file = root / ENGINE_DIR / DENSE_ENGINE
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(ort_infer(root / "model.onnx"))
        trt = stack.enter_context(open_engine(engine_file))
        rows = check_shapes(ref, {name: (precision, trt)}, files, recipe.scale, shape_sizes(recipe),
                            recipe.metric_channel, {precision: Limits(limit)})
        calls = {"sparse": trt}
        if dense_file.is_file():
            calls["dense"] = stack.enter_context(open_engine(dense_file))
        latency = []
        for h, w in val.latency_sizes or [recipe.engine.profile_sizes()["opt"]]:
            x = recipe.adapter.example_input(recipe.model, h, w)
            t = time_side_by_side({k: (lambda f=f: f(x)) for k, f in calls.items()}, val.latency_warmup,
                                  runs or val.latency_runs)
            entry = {"lr_hw": [h, w], **{k: v.to_json() for k, v in t.items()}}
            if "dense" in t:
                entry["ratio_sparse_over_dense"] = t["sparse"].median_ms / t["dense"].median_ms
            latency.append(entry)
    failed = [r for r in rows if not r.passed]
    res = {"backend": "tensorrt", "precision": precision, "eval_images": [f.name for f in files],
           "max_psnr_drop_db": limit, "shapes": [r.to_json() for r in rows], "latency": latency,
           "dense_engine": dense_file.is_file(), "passed": not failed}
    res["verdict"] = (f"{name} at {failed[0].label} {failed[0].size[0]}x{failed[0].size[1]}: "
                      f"{'; '.join(failed[0].failures)}" if failed else
                      f"{name}: {len(rows)} shape checks within the {precision} limit {limit} dB")
    atomic.write_json(root / ENGINE_DIR / "validate.json", res)
    return res
