#!/usr/bin/env python3
"""Regenerate calib/: low-resolution calibration inputs cut from scikit-image's bundled photographs.

Each image is an HR crop (the box below, x0, y0, size) bicubic-downscaled x4 the same way training LR is
made, so it looks like what the model sees at inference. Only images of the *train* list are used, never eval.
Run: python calib/make_calib.py
"""

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sls_deploy.data.images import bicubic_down, read_rgb, to_image, to_tensor  # noqa: E402
from sls_deploy.data.sources import SKIMAGE_TRAIN, skimage_data_dir  # noqa: E402

CROPS = [  # (file, x0, y0, HR size)
    ("coffee.png", 100, 0, 384),
    ("rocket.jpg", 0, 0, 384),
    ("ihc.png", 64, 64, 384),
    ("hubble_deep_field.jpg", 300, 200, 384),
    ("motorcycle_left.png", 200, 60, 384),
    ("retina.jpg", 500, 500, 384),
    ("brick.png", 0, 0, 384),
    ("grass.png", 64, 64, 384),
]
SCALE = 4

if __name__ == "__main__":
    out = Path(__file__).resolve().parent
    lines = ["# Calibration images", "",
             "Low-resolution inputs (96x96) for INT8 calibration, made by `calib/make_calib.py`:",
             "an HR crop of a photograph bundled with scikit-image (`skimage/data/`), downscaled x4 with",
             "anti-aliased bicubic (the training degradation). All come from the train list; none from eval.", "",
             "| file | source (skimage/data) | HR crop box (x0, y0, size) |", "|---|---|---|"]
    for name, x0, y0, size in CROPS:
        assert name in SKIMAGE_TRAIN, name
        hr = read_rgb(skimage_data_dir() / name)[y0:y0 + size, x0:x0 + size]
        assert hr.shape[:2] == (size, size), (name, hr.shape)
        lr = to_image(bicubic_down(to_tensor(hr), SCALE))
        target = out / f"{Path(name).stem}_lr96.png"
        iio.imwrite(target, np.round(lr * 255).astype(np.uint8))
        lines.append(f"| {target.name} | {name} | ({x0}, {y0}, {size}) |")
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(CROPS)} images to {out}")
