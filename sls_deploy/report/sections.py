"""The building blocks of a report: sections (title, text, table, picture) and number formatting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def fmt(v: Any, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def fmt_e(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1e}"


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: str | None = None  # file name of a picture in the bundle
    alt: str = ""
