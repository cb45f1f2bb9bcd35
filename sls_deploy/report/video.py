"""The sections of a video (structured pruning) report, rendered by report.py's Markdown/HTML renderers."""

from __future__ import annotations

from sls_deploy.report.sections import (Section, channel_group_section, fmt as _f, quality_gate_section,
                                         quality_gate_summary)
from sls_deploy.report.plots import DRIFT_PLOT, FRAMES_PLOT, WIDTHS_PLOT


def verdict(rep: dict) -> str:
    failed = [k for k, ok in rep.get("checks", {}).items() if not ok]
    return f"FAIL: {', '.join(failed)}" if failed else f"pass ({len(rep.get('checks', {}))} checks)"


def summary_rows(rep: dict) -> list[tuple[str, str]]:
    p, mac, o, s = rep["psnr"], rep["macs"], rep["onnx_vs_torch"], rep["ssim"]
    ch = p["channel"].upper()
    rows = [
        ("verdict", verdict(rep)),
        ("quality gate", quality_gate_summary(rep.get("quality_gate"))),
        ("model", f"{rep['model']} ({rep['arch']}, {rep['graph']} graph; {rep['method']}, "
                  + (f"N:M with M={rep['m']})" if rep.get("m") else f"channels rounded to {rep['round_to']})")),
        ("budget", f"{rep['budget']:g} of dense MACs (whole model)"),
        ("MACs dense / pruned", f"{_f(mac['dense'])} / {_f(mac['pruned'])} G per frame at "
                                f"{mac['reference_output'][0]}x{mac['reference_output'][1]} out"),
        ("MACs ratio", _f(mac["ratio"], 3)),
        (f"PSNR-{ch} bicubic / dense", f"{_f(p['bicubic'])} / {_f(p['dense'])} dB"),
        (f"PSNR-{ch} pruned (PyTorch)", f"{_f(p['pruned'])} dB ({p['pruned'] - p['dense']:+.2f} vs dense)"),
        (f"PSNR-{ch} pruned (ONNX Runtime)", f"{_f(p['pruned_onnx'])} dB"),
        ("SSIM bicubic / dense / pruned", f"{_f(s['bicubic'], 4)} / {_f(s['dense'], 4)} / {_f(s['pruned'], 4)}"),
        (f"{o['backend']} vs PyTorch", f"max |diff| {o['max_abs']:.1e} over {len(o['per_clip'])} clip(s) x "
                                       f"{o['frames']} frames" + (f" and all {o['whole_clip']['frames']} frames of "
                                       f"{o['whole_clip']['clip']}" if o.get("whole_clip") else "") +
                                       f" (tolerance {o['tolerance']:.0e}: {'pass' if o['passed'] else 'FAIL'})"),
    ]
    d = rep.get("drift")
    if d:
        rows.append((f"drift over {d['frames']} frames of {d['clip']}",
                     f"gap dense - pruned {d['gap_first_half']:+.3f} dB (first half) -> {d['gap_second_half']:+.3f} dB "
                     f"(second half), slope {d['slope_db_per_100_frames']:+.3f} dB / 100 frames"))
    lat = rep.get("latency") or {}
    for z in lat.get("sizes", []):
        rows.append((f"latency ORT {z['lr_hw'][0]}x{z['lr_hw'][1]} per frame (median)",
                     f"dense {z['dense']['median_ms_per_frame']:.1f} ms / pruned "
                     f"{z['pruned']['median_ms_per_frame']:.1f} ms = {z['ratio_pruned_over_dense']:.3f}x"))
    return rows


def sections(rep: dict) -> list[Section]:
    p, mac = rep["psnr"], rep["macs"]
    ch = p["channel"].upper()
    out = [Section("Summary", [
        f"Structured (channel) pruning. Budget {rep['budget']:g} counts the **whole model's** MACs (SpyNet "
        f"included) at the reference output {mac['reference_output'][0]}x{mac['reference_output'][1]}, per frame "
        f"(the {rep['graph']} graph runs {mac['frames_per_graph_run']} frame(s)). PSNR/SSIM on {ch} with crop border "
        f"{p['crop_border']}, the first {p['frames_per_clip']} frames of each eval clip: "
        f"{', '.join(p['eval_clips'])}."], ["metric", "value"], [list(r) for r in summary_rows(rep)])]
    gate = quality_gate_section(rep.get("quality_gate"))
    if gate:
        out.append(gate)
    pf = p["per_frame_mean"]
    out.append(Section(f"Per frame (PSNR-{ch} dB, mean over clips)", [
        "Frame t of the eval window, averaged over the clips: how quality moves along the recurrence."],
        ["frame", "bicubic", "dense", "pruned", "pruned - dense"],
        [[str(t), _f(pf["bicubic"][t]), _f(pf["dense"][t]), _f(pf["pruned"][t]), f"{pf['pruned'][t] - pf['dense'][t]:+.2f}"]
         for t in range(len(pf["pruned"]))], image=FRAMES_PLOT, alt="per-frame PSNR"))
    d = rep.get("drift")
    if d:
        out.append(Section(f"Drift over a whole clip ({d['frames']} frames of {d['clip']})", [
            f"{d['how']}. Gap = dense - pruned PSNR-{ch} per frame; a positive slope means the pruned model falls "
            "further behind as its state propagates."],
            ["measure", "value"],
            [["gap, first half of the clip", f"{d['gap_first_half']:+.3f} dB"],
             ["gap, second half of the clip", f"{d['gap_second_half']:+.3f} dB"],
             ["least-squares slope of the gap", f"{d['slope_db_per_100_frames']:+.3f} dB per 100 frames"]],
            image=DRIFT_PLOT, alt="drift over the whole clip"))
    out.append(Section(f"Per clip (PSNR-{ch} dB, mean over frames)", [], ["clip", "bicubic", "dense", "pruned"],
                       [[c, *(_f(sum(v[k]) / len(v[k])) for k in ("bicubic", "dense", "pruned"))]
                        for c, v in p["per_clip"].items()]))
    o = rep["onnx_vs_torch"]
    out.append(Section("ONNX Runtime vs PyTorch", [
        f"The FP32 {o['graph']} graph in ONNX Runtime against the PyTorch pruned model, {o['driven']}."],
        ["clip", "max abs diff", "result"],
        [[c, f"{d:.1e}", "pass" if d <= o["tolerance"] else "FAIL"] for c, d in o["per_clip"].items()] +
        ([[f"{o['whole_clip']['clip']}, whole clip ({o['whole_clip']['frames']} frames)",
           f"{o['whole_clip']['max_abs']:.1e}", "pass" if o["whole_clip"]["max_abs"] <= o["tolerance"] else "FAIL"]]
         if o.get("whole_clip") else [])))
    lat = rep.get("latency") or {}
    if lat.get("sizes"):
        rows = []
        for z in lat["sizes"]:
            hw = f"{z['lr_hw'][0]}x{z['lr_hw'][1]}"
            for k in ("dense", "pruned"):
                t = z[k]
                rows.append([hw, k, f"{t['median_ms_per_frame']:.1f}", f"{t['p90_ms_per_frame']:.1f}",
                             f"{t['frames_per_s']:.2f}", f"{z['ratio_pruned_over_dense']:.3f}" if k == "pruned" else "1"])
        out.append(Section("Latency, dense vs pruned (ONNX Runtime, CPU, FP32)", [
            f"{lat['threads']} threads; {lat['warmup']} warm-up runs, then {lat['runs']} timed runs of each graph, "
            f"interleaved (same machine load for both); a run is {lat['frames_per_run']} frame(s), times are per "
            "frame. Channel pruning shrinks plain dense convs, so it needs no sparse kernels to pay off."],
            ["LR HxW", "graph", "median ms/frame", "p90 ms/frame", "frames/s", "ratio (median)"], rows))
    if rep["groups"]:
        out.append(channel_group_section(rep, WIDTHS_PLOT))
    if rep.get("precisions"):
        ch = rep["psnr"]["channel"]
        out.append(Section("Precisions", [
            f"Each reduced-precision graph in ONNX Runtime on the eval clips (step graphs driven frame by frame), "
            f"PSNR-{ch} and its drop below the FP32 PyTorch model ({_f(rep['psnr']['pruned'])} dB)."],
            ["graph", f"PSNR-{ch}", "drop (dB)", "limit (dB)", "passed"],
            [[v["file"], _f(v[f"psnr_{ch}"]), f"{v['drop_db']:.4f}", f"{v['limit_db']:g}", "yes" if v["passed"] else "NO"]
             for v in rep["precisions"].values()]))
    rows = [[l["name"], l.get("out_group") or (f"{l['n']}:{l['m']}" if "n" in l else "-"), l.get("in_group") or "-",
             f"{l['macs_dense'] / 1e9:.3f}",
             f"{l['macs_pruned'] / 1e9:.3f}", f"{l['macs_pruned'] / l['macs_dense']:.3f}" if l["macs_dense"] else "-"]
            for l in rep["layers"]]
    rows += [[d["name"], f"dense: {d['reason']}", "-", f"{d['macs'] / 1e9:.3f}", f"{d['macs'] / 1e9:.3f}", "1.000"]
             for d in rep["dense_layers"]]
    out.append(Section("Layers", [f"GMACs per graph run ({mac['frames_per_graph_run']} frame(s))."],
                       ["layer", "output group", "input group", "GMACs dense", "GMACs pruned", "ratio"], rows))
    if rep.get("notes"):
        out.append(Section("Notes", list(rep["notes"])))
    return out
