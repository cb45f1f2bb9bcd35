"""The ``step`` modality: one step of a recurrent model (StreamVSR), trained and evaluated on clips like ``clip``;
its graph is one step whose state inputs are fed back from its outputs (ExportSpec.recurrent)."""

from __future__ import annotations

from sls_deploy.modalities.base import Feeds
from sls_deploy.modalities.clip import ClipModality


class StepModality(ClipModality):
    name = "step"

    def calibration_feeds(self, recipe, calib: str, data: str, input_name: str) -> tuple[Feeds, dict[str, str]]:
        """The clip windows under ``__clip__``: the export stage drives them through the FP32 step graph
        (``stages.calibration.step_feeds``), so the hidden-state input is calibrated on real states, not zeros."""
        clips = self.calibration_windows(recipe, data)
        return [{"__clip__": c} for c in clips], self.window_hashes(clips)
