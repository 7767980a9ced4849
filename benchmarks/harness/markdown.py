"""What the reports share: number formats, Markdown table rows, and the ``results.md`` + ``results.json`` pair."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.harness.files import write_json

GIB = 1024**3


def format_seconds(value: float | None, missing: str = "-") -> str:
    """``12.3 s``, or ``missing``."""
    return missing if value is None else f"{value:.1f} s"


def format_gib(value: float | None, missing: str = "-") -> str:
    """Bytes as ``1.23 GiB``, or ``missing``."""
    return missing if value is None else f"{value / GIB:.2f} GiB"


def format_metric(value: float | None) -> str:
    """``0.1234``, or ``-``."""
    return "-" if value is None else f"{value:.4f}"


def row(cells: Iterable[object]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def write_results(directory: Path, markdown: str, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    markdown_path = directory / "results.md"
    markdown_path.write_text(markdown, encoding="utf-8")
    return markdown_path, write_json(directory / "results.json", payload)
