"""The recipe's ``sls`` section: the SLS search's settings (pruning/nm/sls.py runs the search)."""

from __future__ import annotations

import math
from dataclasses import dataclass

VALID_M = (4, 8, 16, 32)  # N:M group sizes (pruning/nm/patterns.py checks the same)


@dataclass(frozen=True)
class SLSSettings:
    m: int = 4
    lam: float = 1e-10  # lambda; the paper's value for SR
    alpha: float = 1.1  # coeff growth when the compression factor stalls
    threshold: float = 0.1  # T: minimum change of the compression factor per check
    check_every: int = 20  # steps between coeff checks (paper: 2 epochs)
    refresh_every: int = 50  # steps between unit re-rankings (paper: 1000 iterations = 1 epoch)
    score_lr: float = 1e-2  # scores learn on their own schedule (the paper trains far longer)
    score_clamp: float = 1.03  # upper clamp of the scores (the public code's value)
    loss_scale: float = 255.0  # task loss in 0-255 units, as the paper's code
    cost_patch: int = 192  # HR size of the patch costs are counted on (the paper's training patch), so that
    #                        lambda means what it means in the paper whatever patch size we train on

    def validate(self) -> "SLSSettings":
        if self.m not in VALID_M:
            raise ValueError(f"M must be one of {VALID_M}, not {self.m}")
        for name in ("lam", "alpha", "threshold", "score_lr", "score_clamp", "loss_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SLS {name} must be a finite non-negative number, not {v!r}")
        if self.alpha < 1:
            raise ValueError(f"SLS alpha must be >= 1 (coeff grows), not {self.alpha}")
        if self.check_every < 1 or self.refresh_every < 1 or self.cost_patch < 1:
            raise ValueError("SLS check_every and refresh_every must be >= 1")
        if self.score_clamp < 0.5:
            raise ValueError("SLS score_clamp must be >= 0.5 or no gate can ever open")
        return self
