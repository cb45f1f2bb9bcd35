"""Typed errors. Every failure a user can cause is one of these and is shown as one line.

``exit_code`` follows the CLI convention: 2 for usage errors (bad option values), 1 for everything else.
"""


class SlsError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""

    exit_code = 1

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


class UsageError(SlsError):
    """An option value that can never work (budget 1.5, unknown model, M = 5)."""

    exit_code = 2


class RecipeError(SlsError):
    """A recipe file is missing, is not YAML, or lacks/misnames a field."""


class CheckpointError(SlsError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the recipe's model."""


class DataError(SlsError):
    """An image is missing, unreadable, or too small; a data folder is empty."""


class PlanError(SlsError):
    """No sparsity plan can meet the request (budget below the smallest reachable one, ...)."""


class BudgetError(UsageError, PlanError):
    """The budget cannot be met by the chosen method on this model: a plan error caused by a value the user chose,
    so it exits 2 like other bad option values, with the smallest reachable budget in the message."""


class BundleError(SlsError):
    """A bundle folder is missing files, holds another model, or its files changed since they were written."""


class ExportError(SlsError):
    """The ONNX graph could not be written or fails its checks."""


class ValidationError(SlsError):
    """A backend's outputs do not match the reference within the stated tolerance."""


class BackendMissingError(SlsError):
    """An optional backend (TensorRT, ...) is not installed."""
