"""What a training controller without parameters or state of its own inherits (``training.loop.Controller``)."""

from __future__ import annotations


class StatelessController:
    """No parameter groups, nothing to do after a step, nothing to checkpoint."""

    def param_groups(self) -> list[dict]:
        return []

    def after_step(self, model, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
