#!/usr/bin/env python3
"""Our FP16 islands and INT8 Q/DQ against NVIDIA ModelOpt's ONNX tools and ONNX Runtime's quantize_static.

On one bundle (default: the quick-start `build --model edsr --budget 0.4` configuration) every tool makes its
graph from the bundle's FP32 `model.onnx`, with the same calibration images (the package's calib/ set) and the
same FP32 islands (first conv, last upsampler conv, last conv) excluded where the tool can exclude nodes:

- ours: the bundle's model.fp16.onnx and model.int8.onnx (percentile 99.99), INT8 re-made on a copy to time it;
- ModelOpt 0.47 (`python -m modelopt.onnx.autocast`, `python -m modelopt.onnx.quantization --quantize_mode int8
  --calibration_method max|entropy --high_precision_dtype fp32 --calibration_eps cpu`), run from ``--modelopt-path``
  (it is not a dependency: its [onnx] extra wants cupy-cuda12x and onnxruntime-gpu; the CPU path ran without them);
- ONNX Runtime `quantize_static` (QDQ, per-channel symmetric INT8 weights, symmetric INT8 activations, MinMax /
  Entropy / Percentile 99.99).

Per graph: eval PSNR-Y in ONNX Runtime on the recipe's eval images, QuantizeLinear / DequantizeLinear counts and
how many Q/DQ pairs feed an Add (a residual add's input: TensorRT fuses an add into the conv before it only
without one there), seconds to make it, and with ``--nm-bundle`` (a uniform 2:4 bundle) how many of its 2:4 layers
stay 2:4 in each tool's INT8 graph. Results: benchmarks/results/quantizers.json and .md.

    python benchmarks/quantizers.py --bundle runs/edsr-b0.40 [--nm-bundle runs/edsr-oneshot-2to4] \\
        [--modelopt-path /tmp/mopkgs_onnx:/tmp/mopkgs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from sls_deploy.backends.runtime import onnx_inputs  # noqa: E402
from sls_deploy.cli import main as cli_main  # noqa: E402
from sls_deploy.config.recipe import load_recipe  # noqa: E402
from sls_deploy.core.bundle import RECIPE  # noqa: E402
from sls_deploy.data.sources import resolve_images  # noqa: E402
from sls_deploy.modalities.image import evaluate  # noqa: E402
from sls_deploy.onnx.inspect import inspect_model  # noqa: E402
from sls_deploy.data.calibration import BUILTIN_CALIB, read_calibration_images  # noqa: E402

ISLANDS = ("conv_first", "upsample.2", "conv_last")


def island_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and any(f"/{i}/" in n.name + "/" or n.name.endswith(f"/{i}/Conv") for i in ISLANDS)]


def qdq_stats(path: Path) -> dict:
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    add_inputs = sum(1 for n in m.graph.node if n.op_type == "Add" for i in n.input if i in dq_out)
    return {"quantize": ops.count("QuantizeLinear"), "dequantize": ops.count("DequantizeLinear"),
            "cast": ops.count("Cast"), "dq_into_add": add_inputs, "mb": round(path.stat().st_size / 2**20, 2)}


def kept_2to4(path: Path, layers: set[str]) -> str:
    rows = inspect_model(onnx.load(str(path)))
    by_node = {r["node"]: r for r in rows}
    ok = sum(1 for node in layers if by_node.get(node, {}).get("is_2to4"))
    return f"{ok}/{len(layers)}"


def psnr_of(path: Path, files, scale: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name, dtype = next(iter(onnx_inputs(path).items()))

    def infer(lr):
        out = sess.run(None, {name: lr.numpy().astype(dtype)})[0]
        return np.asarray(out, dtype=np.float32)

    return evaluate(infer, files, scale, with_ssim=False).psnr


def ort_quantize(src: Path, dst: Path, method: str, calib: list[np.ndarray], exclude: list[str]) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"lr": c} for c in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[method],
                    nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.99})


def modelopt(args: list[str], path: str) -> None:
    env = {**os.environ, "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        lines = [l for l in (r.stderr or r.stdout).splitlines() if l.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit {r.returncode}")


def make_graphs(bundle: Path, work: Path, mo_path: str | None, calib: list[np.ndarray]) -> dict[str, dict]:
    src = bundle / "model.onnx"
    exclude = island_nodes(onnx.load(str(src)))
    np.save(work / "calib.npy", np.concatenate(calib))
    out: dict[str, dict] = {}

    def add(name, fn, path):
        t0 = time.perf_counter()
        try:
            fn()
            out[name] = {"path": path, "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # a tool that fails here is reported, not hidden
            out[name] = {"error": str(e).splitlines()[0][:200]}
        print(f"{name}: {out[name].get('seconds', out[name].get('error'))}", flush=True)

    def ours_int8():
        copy = work / "ours"
        shutil.copytree(bundle, copy, symlinks=True)
        (copy / "calib_cache.json").unlink(missing_ok=True)
        if cli_main(["export", str(copy), "--precision", "int8"]):
            raise RuntimeError("sls-deploy export failed")

    add("ours fp16 (islands)", lambda: None, bundle / "model.fp16.onnx")
    add("ours int8 (percentile 99.99)", ours_int8, work / "ours" / "model.int8.onnx")
    for method in ("minmax", "entropy", "percentile"):
        dst = work / f"ort_{method}.onnx"
        add(f"ORT quantize_static int8 ({method})", lambda m=method, d=dst: ort_quantize(src, d, m, calib, exclude),
            dst)
    if mo_path:
        dst = work / "mo_fp16.onnx"
        add("ModelOpt AutoCast fp16", lambda: modelopt(["modelopt.onnx.autocast", "--onnx_path", str(src),
                                                        "--output_path", str(dst), "--low_precision_type", "fp16",
                                                        "--nodes_to_exclude", *exclude], mo_path), dst)
        for method in ("max", "entropy"):
            d = work / f"mo_int8_{method}.onnx"
            add(f"ModelOpt int8 ({method})", lambda m=method, d=d: modelopt(
                ["modelopt.onnx.quantization", "--onnx_path", str(src), "--quantize_mode", "int8",
                 "--calibration_method", m, "--calibration_data_path", str(work / "calib.npy"),
                 "--calibration_eps", "cpu", "--high_precision_dtype", "fp32", "--output_path", str(d),
                 "--nodes_to_exclude", *exclude], mo_path), d)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="runs/edsr-b0.40")
    ap.add_argument("--nm-bundle", help="a bundle whose plan has 2:4 layers (2:4 survival per tool)")
    ap.add_argument("--modelopt-path", help="PYTHONPATH holding nvidia-modelopt 0.47 and its ONNX extras")
    args = ap.parse_args()
    bundle = Path(args.bundle)
    recipe = load_recipe(bundle / RECIPE)
    calib, _ = read_calibration_images(BUILTIN_CALIB, recipe.adapter.min_input_size(recipe.model))
    files = resolve_images(recipe.data_eval)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graphs = make_graphs(bundle, work, args.modelopt_path, calib)
        fp32 = psnr_of(bundle / "model.onnx", files, recipe.scale)
        nm = {}
        if args.nm_bundle:
            (work / "nm").mkdir()
            nm_graphs = make_graphs(Path(args.nm_bundle), work / "nm", args.modelopt_path, calib)
            plan = json.loads((Path(args.nm_bundle) / "plan.json").read_text())
            two_four = {l["name"] for l in plan["layers"] if l["n"] == 2 and l["m"] == 4}
            # Conv node names survive quantization; the FP32 graph maps plan layers (weight names) to them
            layers = {r["node"] for r in inspect_model(onnx.load(str(Path(args.nm_bundle) / "model.onnx")))
                      if r["layer"] in two_four}
            nm = {k: (kept_2to4(v["path"], layers) if "path" in v else "-") for k, v in nm_graphs.items()}
        for name, g in graphs.items():
            if "error" in g:
                rows.append({"graph": name, "error": g["error"]})
                continue
            rows.append({"graph": name, "psnr_y": psnr_of(g["path"], files, recipe.scale),
                         "seconds": g["seconds"], **qdq_stats(g["path"]), "kept_2to4": nm.get(name, "not measured")})
            print(rows[-1], flush=True)
    res = {"bundle": str(bundle), "fp32_psnr_y": fp32, "rows": rows, "nm_bundle": args.nm_bundle}
    dest = ROOT / "benchmarks" / "results" / "quantizers.json"
    dest.write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"Bundle {bundle.name} ({recipe.name}); FP32 graph PSNR-Y {fp32:.3f} dB on the recipe's eval images; "
             "every graph run in ONNX Runtime CPU.", "",
             "| graph | PSNR-Y dB (vs FP32) | Q / DQ nodes | DQ into an Add | Cast nodes | MB | seconds to make | "
             "2:4 layers kept |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['graph']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['graph']} | {r['psnr_y']:.3f} ({r['psnr_y'] - fp32:+.3f}) | {r['quantize']} / "
                     f"{r['dequantize']} | {r['dq_into_add']} | {r['cast']} | {r['mb']} | {r['seconds']} | "
                     f"{r['kept_2to4']} |")
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
