"""Typed errors. Every failure a user can cause is one of these and is shown as one line.

``exit_code`` follows the CLI convention: 2 for usage errors (bad option values), 1 for everything else.
Messages quote at most a short prefix of a bad value (``short_repr``); a whole message is capped as well, so a
value that reaches one through another library's text (``float()``'s error quotes its whole input) stays short.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_MESSAGE = 1000  # characters of one error line (paths and known-value lists fit; a pasted megabyte does not)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 4, 4, 3, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 40, 40, 40


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to a short prefix, for error messages: bounded work whatever the value's size (a YAML
    alias bomb expands to 9^9 items; its full repr took minutes and 448 MB)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs become one space), at most MAX_MESSAGE characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


class SlsError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""

    exit_code = 1

    def __str__(self) -> str:  # one line, always, and never a whole pasted value
        return one_line(super().__str__())


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


class DiskFullError(SlsError):
    """A write failed because the file system is full (or the user's quota is spent); nothing was left behind."""


class BackendMissingError(SlsError):
    """An optional backend (TensorRT, ...) is not installed."""
