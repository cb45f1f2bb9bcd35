#!/usr/bin/env python3
"""Benchmark: dense vs 2:4-sparse FP16 GEMM time of every conv layer of an SR graph, on one CUDA GPU.

Each Conv of an FP32 ONNX graph (or of a synthetic set of widths, --synthetic) becomes its implicit GEMM
A (Cout, kh*kw*Cin) @ B (kh*kw*Cin, N*Hout*Wout), the reduction axis ordered (kh, kw, Cin) so that every group
of 4 consecutive reduction elements is 4 input channels at one tap (TensorRT's 2:4 rule; Cin is zero-padded to
a multiple of 4). Output sizes are those of a model output of --out-size (W x H) at --scale. In FP16 it times
dense torch.mm(A, B) (cuBLAS) against torch.mm(A24, B), A24 = A pruned to 2:4 by magnitude (kept as is when
already 2:4) and compressed by torch.sparse.to_sparse_semi_structured (cuSPARSELt; CUTLASS where cuSPARSELt is
missing), zero-padded to the backend's shape multiples (recorded). B is random: only time is measured, plus
max |sparse - dense| on the same pruned A as a correctness check.

This is a GEMM micro-benchmark, NOT TensorRT: no im2col, bias, activation, layer fusion or tactic choice. It
shows what a 2:4 kernel can gain on each layer shape, not what an engine runs at.

Timing: CUDA events around one CUDA-graph replay of --inner calls, so kernel time without PyTorch's per-call
host work (eager torch.mm on a cuSPARSELt tensor re-plans on the host every call, ~0.5 ms; rows whose capture
fails are timed eagerly, timing_mode "eager"); --runs rounds, dense and sparse interleaved (order flipped each
round); median ms per call. Without CUDA nothing is timed: every timing field says "not measured".
Needs only torch, numpy and onnx (onnxruntime, if present, resolves shapes shape inference cannot).

    python benchmarks/gpu_sparse.py --onnx runs/edsr/model.onnx [--onnx ...] [--synthetic]
        [--out-size 1280x720] [--scale 4] [--runs 50] [--out benchmarks/results/gpu_sparse.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
NM = "not measured"
TIMED = ("dense_ms", "sparse_ms", "ratio", "max_abs_diff", "padded", "timing_mode")


class BadFile(Exception):
    """An ONNX file that cannot be read or used (exit 1)."""


def const_value(name: str, inits: dict, producer: dict, depth: int = 0) -> tuple[np.ndarray, str] | None:
    """(value, initializer name) of a constant tensor, seen through Cast/Identity/DequantizeLinear."""
    if name in inits:
        return numpy_helper.to_array(inits[name]), name
    node = producer.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type == "Constant":
        t = next((a.t for a in node.attribute if a.name == "value"), None)
        return None if t is None else (numpy_helper.to_array(t), node.output[0])
    if node.op_type in ("Cast", "Identity"):
        v = const_value(node.input[0], inits, producer, depth + 1)
        return None if v is None else (v[0].astype(np.float32), v[1])
    if node.op_type == "DequantizeLinear":
        x, s, zp = (const_value(n, inits, producer, depth + 1) if n else None for n in [*node.input, ""][:3])
        if x is None or s is None:
            return None
        (x, key), scale, zp = x, s[0].astype(np.float32), zp[0].astype(np.float32) if zp else np.float32(0)
        if scale.ndim == 1 and x.ndim > 1:  # per-channel: broadcast along the node's axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
            shape = [-1 if i == axis else 1 for i in range(x.ndim)]
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim else zp
        return (x.astype(np.float32) - zp) * scale, key
    return None


def fix_inputs(model: onnx.ModelProto, lr_h: int, lr_w: int) -> dict[str, list[int]]:
    """Make every graph input concrete (in place): batch 1, H/W = LR size (last two axes of a 4-D/5-D input),
    channels and T from the graph (3 and 1 where dynamic). Returns {input name: shape}."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        r = len(dims)
        for i, d in enumerate(dims):
            if d.dim_value <= 0:
                d.dim_value = (lr_h if i == r - 2 else lr_w if i == r - 1 else 3 if i == r - 3 else 1) if r >= 4 else 1
        shapes[inp.name] = [d.dim_value for d in dims]
    return shapes


def _ort_shapes(model: onnx.ModelProto, names: list[str], input_shapes: dict) -> dict[str, list[int]]:
    """Shapes of ``names`` by running the graph once on CPU with onnxruntime ({} when it is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: np.random.rand(*input_shapes[i.name]).astype(np.float16 if "16" in i.type else np.float32)
                 for i in sess.get_inputs()}
        return {n: list(o.shape) for n, o in zip(names, sess.run(names, feeds))}
    except Exception as e:  # noqa: BLE001 - optional fallback
        print(f"warning: onnxruntime shape fallback failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return {}


def make_row(graph: str, layer: str, w: np.ndarray, out_shape: list[int], key: str) -> dict:
    cout, cin, kh, kw = (int(v) for v in w.shape)
    n = int(out_shape[0]) * int(out_shape[2]) * int(out_shape[3])
    return {"graph": graph, "layer": layer, "cin": cin, "cout": cout, "k": [kh, kw],
            "out_hw": [int(out_shape[2]), int(out_shape[3])], "batch": int(out_shape[0]),
            "gemm_mnk": [cout, kh * kw * cin, n], "weight": w, "key": key}


def extract_layers(path: str | Path, out_w: int, out_h: int, scale: int) -> tuple[list[dict], list[dict]]:
    """Every plain Conv with a constant weight, with its output size for a model output of out_w x out_h;
    and the convs that had to be skipped ({graph, layer, reason})."""
    p = Path(path)
    if not p.is_file():
        raise BadFile(f"cannot read ONNX file {p}: no such file")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001 - any parse error is a bad file
        raise BadFile(f"cannot read ONNX file {p}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    input_shapes = fix_inputs(model, out_h // scale, out_w // scale)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    convs = [(n, const_value(n.input[1], inits, producer)) for n in g.node if n.op_type == "Conv"]
    convs = [(n, c) for n, c in convs if c is not None and c[0].ndim == 4]
    if not convs:
        raise BadFile(f"{p}: no Conv with a constant 4-D weight")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001
        print(f"warning: {p}: shape inference failed ({str(e).splitlines()[0]})", file=sys.stderr)
        inferred = model
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    missing = [n.output[0] for n, _ in convs if min(shapes.get(n.output[0]) or [0]) <= 0]
    if missing:
        shapes.update(_ort_shapes(model, missing, input_shapes))
    out0 = shapes.get(g.output[0].name) or [0]
    if min(out0) > 0 and out0[-2:] != [out_h, out_w]:
        print(f"warning: {p}: output is {out0[-1]}x{out0[-2]} at LR {out_w // scale}x{out_h // scale}, "
              f"not {out_w}x{out_h}: is --scale {scale} right?", file=sys.stderr)
    rows, skipped = [], []
    for node, (w, key) in convs:
        layer = key[: -len(".weight")] if key.endswith(".weight") else (node.name or key)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shp = shapes.get(node.output[0]) or []
        if group != 1:
            skipped.append({"graph": str(p), "layer": layer, "reason": f"grouped conv (group={group})"})
        elif len(shp) != 4 or min(shp) <= 0:
            skipped.append({"graph": str(p), "layer": layer, "reason": "output shape unknown"})
        else:
            rows.append(make_row(str(p), layer, w, shp, key))
    return rows, skipped


def synthetic_layers(out_w: int, out_h: int, scale: int) -> list[dict]:
    """3x3 convs Cin=Cout in 32..512 and a 1x1 256->256, at the LR size of an out_w x out_h output."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for cin, cout, k in [(c, c, 3) for c in (32, 64, 128, 256, 512)] + [(256, 256, 1)]:
        w = (torch.randn(cout, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5).numpy()
        name = f"conv{k}x{k}_{cin}to{cout}"
        out.append(make_row("synthetic", name, w, [1, cout, out_h // scale, out_w // scale], name))
    return out


def gemm_weight(w: np.ndarray) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> A (Cout, kh*kw*Cin4) fp32: Cin zero-padded to a multiple of 4, reduction (kh, kw, Cin)."""
    t = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    t = F.pad(t, (0, 0, 0, 0, 0, (-t.shape[1]) % 4))
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1).contiguous()


def prune_2to4(a: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |a| of every 4 consecutive elements of each row (a.shape[1] % 4 == 0)."""
    g = a.reshape(a.shape[0], -1, 4)
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * mask).reshape(a.shape)


def is_2to4(a: torch.Tensor) -> bool:
    return bool(((a.reshape(a.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def sparse_backend() -> tuple[str, tuple[int, int, int]]:
    """cuSPARSELt if it works, else CUTLASS: (name, (M, K, N) multiples to pad to). Raises if neither works."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    cs = getattr(torch.backends, "cusparselt", None)
    err: Exception | None = None
    for cslt in ([True, False] if cs is not None and cs.is_available() else [False]):
        SparseSemiStructuredTensor._FORCE_CUTLASS = not cslt
        try:
            s = to_sparse_semi_structured(prune_2to4(torch.randn(128, 128)).half().cuda())
            torch.mm(s, torch.randn(128, 128, dtype=torch.half, device="cuda"))
            torch.cuda.synchronize()
            c = getattr(type(s), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(torch.float16)
            mult = (64, 128, 64) if c is None else (
                c.sparse_min_rows, max(c.sparse_min_cols, c.dense_min_rows), c.dense_min_cols)
            return ("cuSPARSELt" if cslt else "CUTLASS"), mult
        except Exception as e:  # noqa: BLE001 - try the next backend
            err = e
    raise RuntimeError(f"2:4 semi-structured mm unavailable: {str(err).splitlines()[0] if err else 'unknown'}")


def bench(row: dict, mult: tuple[int, int, int], runs: int, inner: int, warmup: int) -> dict:
    """Dense vs 2:4 timings of one layer's GEMM (median ms per call), its padding and max |sparse - ref|."""
    from torch.sparse import to_sparse_semi_structured
    (m, k, n), (kh, kw), cin = row["gemm_mnk"], row["k"], row["cin"]
    a = gemm_weight(row["weight"])
    was_2to4 = is_2to4(a)
    a24 = a if was_2to4 else prune_2to4(a)
    kc = a.shape[1]
    mp, kp, np_ = (-(-v // u) * u for v, u in zip((m, kc, n), mult))  # rounded up to the backend's multiples
    w = torch.from_numpy(np.array(row["weight"], dtype=np.float32))
    dense_a = w.permute(0, 2, 3, 1).reshape(m, k).half().cuda()  # the unpruned, unpadded weight
    b = torch.randn(k, n, dtype=torch.half, device="cuda")
    bp = F.pad(b.view(kh * kw, cin, n), (0, 0, 0, kc // (kh * kw) - cin)).reshape(kc, n)
    bp = F.pad(bp, (0, np_ - n, 0, kp - kc)).contiguous()
    ap = F.pad(a24.half(), (0, kp - kc, 0, mp - m)).cuda()
    sp = to_sparse_semi_structured(ap)
    ref = torch.mm(ap, bp)[:m, :n].float()
    diff = (torch.mm(sp, bp)[:m, :n].float() - ref).abs().max().item()
    fns = {"dense": lambda: torch.mm(dense_a, b), "sparse": lambda: torch.mm(sp, bp)}
    run, mode = {name: _graphed(fn, inner, warmup) for name, fn in fns.items()}, "cuda_graph"
    if None in run.values():  # capture failed: eager calls, which include PyTorch's per-call host work
        run, mode = {name: (lambda fn=fn: [fn() for _ in range(inner)]) for name, fn in fns.items()}, "eager"
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(runs):
        events = []
        for name in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end) / inner)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    padded = None if (mp, kp, np_) == (m, k, n) else {"mnk": [mp, kp, np_], "cin_to": kc // (kh * kw)}
    return {"dense_ms": round(d, 5), "sparse_ms": round(s, 5), "ratio": round(s / d, 4),
            "max_abs_diff": diff, "max_abs_ref": ref.abs().max().item(), "padded": padded, "timing_mode": mode,
            "weights_already_2to4": was_2to4}


def _graphed(fn, inner: int, warmup: int):
    """A callable replaying `inner` calls of `fn` as one CUDA graph (kernel time, no per-call host work such as
    cuSPARSELt's plan set-up), or None if capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        return graph.replay
    except Exception:  # noqa: BLE001 - fall back to eager timing
        torch.cuda.synchronize()
        return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/m" if v == NM else str(v)


def print_table(rows: list[dict], totals: dict) -> None:
    cols = (("dense_ms", 9), ("sparse_ms", 9), ("ratio", 7), ("max_abs_diff", 8))
    for g, t in totals.items():
        print(f"\n{g}\n{'layer':36} {'cin':>4} {'cout':>4} {'k':>3} {'out_hw':>9} "
              + " ".join(f"{f.replace('max_abs_', 'max'):>{w}}" for f, w in cols))
        for r in (r for r in rows if r["graph"] == g):
            hw = "x".join(map(str, r["out_hw"]))
            print(f"{r['layer'][-36:]:36} {r['cin']:4} {r['cout']:4} {r['k'][0]:3} {hw:>9} "
                  + " ".join(f"{_fmt(r[f]):>{w}}" for f, w in cols))
        print(f"total: {t['layers_measured']} of {t['layers']} layers measured, dense {_fmt(t['dense_ms'])} ms, "
              f"sparse {_fmt(t['sparse_ms'])} ms, ratio {_fmt(t['ratio'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", action="append", default=[], metavar="PATH", help="FP32 ONNX graph (repeatable)")
    ap.add_argument("--synthetic", action="store_true", help="also time 3x3 convs of width 32..512 and a 1x1 256")
    ap.add_argument("--out-size", default="1280x720", help="model output size W x H (default 1280x720)")
    ap.add_argument("--scale", type=int, default=4, help="model upscale factor (default 4)")
    ap.add_argument("--runs", type=int, default=50, help="timed rounds (default 50)")
    ap.add_argument("--inner", type=int, default=10, help="calls per timed sample (default 10)")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up calls per GEMM (default 10)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_sparse.json",
                    help="result JSON (default benchmarks/results/gpu_sparse.json)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor is in prototype")
    try:
        out_w, out_h = (int(v) for v in args.out_size.lower().split("x"))
    except ValueError:
        ap.error(f"--out-size must look like 1280x720, not {args.out_size!r}")
    if args.scale < 1 or out_w % args.scale or out_h % args.scale:
        ap.error(f"--out-size {out_w}x{out_h} is not a multiple of --scale {args.scale}")
    if min(args.runs, args.inner) < 1 or args.warmup < 0:
        ap.error("--runs and --inner must be >= 1, --warmup >= 0")
    if not args.onnx and not args.synthetic:
        ap.error("give at least one --onnx PATH, or --synthetic")
    rows, skipped = [], []
    try:
        for path in args.onnx:
            r, s = extract_layers(path, out_w, out_h, args.scale)
            rows, skipped = rows + r, skipped + s
    except BadFile as e:
        print(f"gpu_sparse: error: {e}", file=sys.stderr)
        return 1
    if args.synthetic:
        rows += synthetic_layers(out_w, out_h, args.scale)
    reason, backend, device, rc = None, None, None, 0
    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
    else:
        device = torch.cuda.get_device_name()
        try:
            backend, mult = sparse_backend()
        except RuntimeError as e:
            reason, rc = str(e), 1
    label = f"{backend or 'cuSPARSELt'} GEMM on {device or 'no GPU'}, not TensorRT"
    if reason is None:
        cache: dict = {}
        for i, row in enumerate(rows):
            key = (row["key"], *row["gemm_mnk"])  # a weight run several times (unrolled clips) is timed once
            if key not in cache:
                print(f"[{i + 1}/{len(rows)}] {row['layer']} {row['gemm_mnk']}", file=sys.stderr, flush=True)
                try:
                    cache[key] = bench(row, mult, args.runs, args.inner, args.warmup)
                except Exception as e:  # noqa: BLE001 - one failed layer is recorded, not fatal
                    cache[key] = {**{f: NM for f in TIMED}, "reason": (str(e).splitlines() or [repr(e)])[0]}
                    print(f"  not measured: {cache[key]['reason']}", file=sys.stderr)
                torch.cuda.empty_cache()
            row.update(cache[key])
    else:
        print(f"gpu_sparse: timings not measured: {reason}", file=sys.stderr)
        for row in rows:
            row.update({f: NM for f in TIMED})
    totals = {}
    for g in dict.fromkeys(r["graph"] for r in rows):
        rs = [r for r in rows if r["graph"] == g]
        ok = [r for r in rs if isinstance(r["dense_ms"], float)]
        d, s = sum(r["dense_ms"] for r in ok), sum(r["sparse_ms"] for r in ok)
        totals[g] = {"layers": len(rs), "layers_measured": len(ok), "dense_ms": round(d, 4) if ok else NM,
                     "sparse_ms": round(s, 4) if ok else NM, "ratio": round(s / d, 4) if ok else NM, "label": label}
    for row in rows:
        del row["weight"], row["key"]
        row["label"] = label
    result = {"label": label, "device": device or "none", "torch": torch.__version__, "backend": backend or NM,
              "out_size": [out_w, out_h], "scale": args.scale, "runs": args.runs, "inner": args.inner,
              "timing": "CUDA events around one CUDA-graph replay of `inner` calls (eager where a row's timing_mode "
                        "says so); median ms per call; dense/sparse interleaved; ratio = sparse/dense (< 1: faster)",
              **({"reason": reason} if reason else {}), "rows": rows, "totals": totals, "skipped": skipped}
    write_json(args.out, result)
    print_table(rows, totals)
    print(f"{label}{'' if reason is None else '; timings not measured: ' + reason}; wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
