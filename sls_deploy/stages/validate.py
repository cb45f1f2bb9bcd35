"""The validate stage: does this bundle ship? One entry for every strategy; the modality decides what is checked
(image: every deployment shape and precision against the PyTorch reference; clip / step: every eval window and a
whole clip, the step graph driven with its state fed back). ``check_report`` raises naming the first failure.

The drivers live here in stages/ (they use the bundle, the models and the export stage); the modality object
names its driver by key (``Modality.validation``) and ``VALIDATORS`` maps that key to it."""

from __future__ import annotations

from sls_deploy.core.errors import ValidationError
from sls_deploy.modalities import registry as modalities
from sls_deploy.stages.skeleton import Run
from sls_deploy.stages.validate_common import ValidateOptions
from sls_deploy.stages.validate_gate import gate_failure
from sls_deploy.stages.validate_image import validate_images
from sls_deploy.stages.validate_video import check_video_report, validate_clips

VALIDATORS = {"image": validate_images, "video": validate_clips}  # Modality.validation -> its driver


def run_validate(run: Run, vopts: ValidateOptions | None = None) -> dict:
    vopts = vopts or ValidateOptions()
    vopts.check()
    return VALIDATORS[modalities.lookup(run.settings.modality).validation](run, vopts)


def check_report(rep: dict) -> None:
    """Raise ValidationError naming the first failed check (and how many others failed); the quality gate
    (``validate_gate``) after the checks against the PyTorch reference."""
    if rep.get("kind") == "video":
        check_video_report(rep)
    else:
        _check_image_report(rep)
    failure = gate_failure(rep.get("quality_gate"))
    if failure:
        raise ValidationError(failure)


def _check_image_report(rep: dict) -> None:
    failed = [s for s in rep.get("shapes", []) if not s["passed"]]
    if failed:
        s = failed[0]
        more = f" (and {len(failed) - 1} more; see report.json)" if len(failed) > 1 else ""
        raise ValidationError(f"{s['backend']} at {s['label']} {s['lr_hw'][0]}x{s['lr_hw'][1]}: "
                              f"{'; '.join(s['failures'])}{more}")
    o = rep["onnx_vs_torch"]
    if not o["passed"]:
        raise ValidationError(f"ONNX Runtime differs from PyTorch by {o['max_abs']:.2e} (> tolerance "
                              f"{o['tolerance']:.0e}); see report.json")
