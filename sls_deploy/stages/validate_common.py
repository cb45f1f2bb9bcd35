"""What both validate implementations (image and video modalities) share: options, progress, plan rows."""

from __future__ import annotations

from dataclasses import dataclass

from sls_deploy.core.bundle import ONNX, Bundle
from sls_deploy.core.errors import BundleError, UsageError
from sls_deploy.core.vocabulary import ORT, TORCH
from sls_deploy.pruning.registry import strategy_of

BACKENDS = (TORCH, ORT)  # "trt" runs on the device: validate_engine.py
REPORT_HTML = "report.html"
LAYERS_JSON = "engine/layers.json"


@dataclass
class ValidateOptions:
    backend: str = ORT
    latency: bool = True
    latency_runs: int | None = None  # None: the recipe's
    latency_warmup: int | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads; None: every core

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} here (trt: see `validate --help`)")
        if self.latency_runs is not None and self.latency_runs < 1:
            raise UsageError(f"--latency-runs must be >= 1, not {self.latency_runs}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, not {self.threads}")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="validate", unit="step", leave=False)


def plan_rows(plan) -> list[dict]:
    """The report's per-layer rows of either plan: N:M (N, M, 2:4, precision) or channels (groups)."""
    return strategy_of(plan).plan_rows(plan)


def graph_files_of(manifest: dict) -> dict[str, str]:
    export_info = manifest.get("stages", {}).get("export", {}).get("result", {})
    return {p: g["file"] for p, g in export_info.get("graphs", {"fp32": {"file": ONNX}}).items()}


def current_graph_files(bundle: Bundle, manifest: dict, need_graphs: bool = True) -> dict[str, str]:
    """{precision: graph file} of a bundle whose finetune and export are current. A stage that never ran, or that
    a later stage made stale by writing new weights (``finetune`` after export), is refused in one line naming the
    commands to run; ``need_graphs`` False (``--backend torch``: the PyTorch model alone) needs no graphs."""
    for stage in ("finetune", "export") if need_graphs else ("finetune",):
        why = bundle.stage_missing(stage)
        if why is None:
            continue
        todo = " and ".join(f"`sls-deploy {s} {bundle.root}`" for s in ("finetune", "export")
                            if s == "export" and need_graphs or s == stage)
        state = "has not run yet" if why == "never ran" else f"is no longer current ({why} and wrote new files)"
        raise BundleError(f"bundle {bundle.root}: {stage} {state}; run {todo} (or the build again) before validate")
    return graph_files_of(manifest) if bundle.stage_missing("export") is None else {}
