"""`validate --backend trt`: the bundle's TensorRT engine on the eval images, against the FP32 graph.

Needs TensorRT (and a GPU). The reference is the FP32 ONNX graph in ONNX Runtime, so a packed bundle, which
carries no PyTorch weights, can be validated on the device. Fails when the engine's eval PSNR is more than the
recipe's ``validate.max_psnr_drop_db[precision]`` below the FP32 graph's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import atomic
from .data import load_pair, resolve_images
from .data.images import quantize, to_image
from .data.metrics import psnr
from .engine import ENGINE_DIR
from .packing import VAL_DIR
from .validate import ort_infer


def validate_engine(root: Path, recipe, precision: str, eval_data: Path | None) -> dict:
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine_file = root / ENGINE_DIR / "model.plan"
    if not engine_file.is_file():
        from .errors import BundleError

        raise BundleError(f"{root} has no {ENGINE_DIR}/model.plan (run `sls-deploy engine {root}` first)")
    files = resolve_images(eval_data or (root / VAL_DIR if (root / VAL_DIR).is_dir() else recipe.data_eval))
    scale, y = recipe.scale, recipe.metric_channel == "y"
    ref_psnr, trt_psnr, max_abs = [], [], 0.0
    with ort_infer(root / "model.onnx") as ref, TrtRunner(EngineFromBytes(BytesFromPath(str(engine_file)))) as trt:
        for f in files:
            hr, lr = load_pair(f, scale)
            want = np.clip(ref(lr), 0, 1)
            got = np.clip(np.asarray(trt.infer({"lr": lr.numpy()})["sr"], np.float32), 0, 1)
            max_abs = max(max_abs, float(np.abs(got - want).max()))
            gt = quantize(to_image(hr))
            ref_psnr.append(psnr(quantize(to_image(want)), gt, scale, y))
            trt_psnr.append(psnr(quantize(to_image(got)), gt, scale, y))
    drop = float(np.mean(ref_psnr) - np.mean(trt_psnr))
    limit = recipe.validate.max_drop(precision)
    res = {"backend": "tensorrt", "precision": precision, "eval_images": [f.name for f in files],
           "psnr_fp32_graph": float(np.mean(ref_psnr)), "psnr_engine": float(np.mean(trt_psnr)),
           "psnr_drop_db": drop, "max_psnr_drop_db": limit, "max_abs_vs_fp32_graph": max_abs,
           "passed": drop <= limit}
    res["verdict"] = (f"engine PSNR drop {drop:.3f} dB {'within' if res['passed'] else 'exceeds'} the {precision} "
                      f"limit {limit} dB")
    atomic.write_json(root / ENGINE_DIR / "validate.json", res)
    return res
