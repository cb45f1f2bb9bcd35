"""INT8 calibration feeds for any modality: {graph input: array} dicts the FP32 graph is run on.

The modality makes them (``Modality.calibration_feeds``: the calibration folder's images, windows of the training
clips, or for a step graph those windows under ``__clip__``); ``step_feeds`` drives a step graph's windows
through its recurrence once the FP32 graph exists, so the hidden-state input is calibrated on real states, not
zeros. Returns the feeds and the hashes that key the calibration cache.
"""

from __future__ import annotations

import numpy as np

from sls_deploy.backends.loading import graph_spec
from sls_deploy.modalities import registry as modalities


def calibration_feeds(recipe, settings) -> tuple[list[dict[str, np.ndarray]], dict[str, str]]:
    return modalities.lookup(settings.modality).calibration_feeds(recipe, settings.calib, settings.data,
                                                                  graph_spec(recipe).input_names[0])


def step_feeds(fp32_model, spec, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """For a recurrent step graph: every step of every calibration clip, with the state the FP32 graph itself
    produced at the step before (ExportSpec.recurrent), as feeds. Other graphs' feeds pass through."""
    if not feeds or "__clip__" not in feeds[0]:
        return feeds
    from sls_deploy.backends.sessions import cpu_session

    sess = cpu_session(fp32_model.SerializeToString())  # on the CPU on purpose: calibration must not depend on the GPU
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    frame_input = next(n for n in spec.input_names if n not in spec.recurrent)  # the frame fed at every step
    out = []
    for f in feeds:
        clip = f["__clip__"]
        state: dict[str, np.ndarray] = {}
        for t in range(clip.shape[1]):
            frame = clip[:, t]
            feed = {frame_input: frame}
            for name, source in spec.recurrent.items():
                if t == 0:  # first step: the frame itself for a frame input, zeros for a state
                    if source in spec.input_names:
                        feed[name] = frame
                    else:
                        c = shapes[name][1]
                        feed[name] = np.zeros((frame.shape[0], c, *frame.shape[2:]), np.float32)
                else:
                    feed[name] = state[source]
            out.append(feed)
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
            state = {**feed, **outs}
    return out
