"""Tables of the accuracy benchmark: mean ± std over seeds per dataset, model and side/variant.

Reads the cell files ``<out>/cells/<dataset>/<model>/seed<k>/<side>.json`` that
:mod:`benchmarks.accuracy` writes. Each holds ``rows``: one entry per reported line (``upstream``,
``single``, or ``ours <variant>``) with ``ok``, ``error`` and ``metrics``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = (
    ("image_AUROC", "image AUROC"),
    ("pixel_AUROC", "pixel AUROC"),
    ("pixel_AUPRO", "pixel AUPRO"),
    ("pixel_F1Score", "pixel F1"),
)


@dataclass
class RowStats:
    """Values of one table row (dataset, model, side/variant) over its seeds.

    Attributes:
        values: Metric name to the values of the seeds that succeeded.
        seeds: Seeds that succeeded.
        failures: ``(seed, reason)`` of the seeds that failed.
    """

    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seeds: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every cell file under ``out/cells``, sorted by path (unreadable files are skipped with a note)."""
    return [_load(path) for path in sorted((out / "cells").glob("*/*/seed*/*.json"))]


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return {"unreadable": f"{path}: {error}"}


def aggregate(cells: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], RowStats]]:
    """Dataset -> (model, row label) -> the row's values over seeds, in the order cells come."""
    tables: dict[str, dict[tuple[str, str], RowStats]] = defaultdict(dict)
    for cell in cells:
        if "unreadable" in cell:
            continue
        for label, row in cell["rows"].items():
            stats = tables[cell["dataset"]].setdefault((cell["model"], label), RowStats())
            if row.get("ok"):
                stats.seeds.append(cell["seed"])
                for name, value in row["metrics"].items():
                    stats.values[name].append(float(value))
            else:
                stats.failures.append((cell["seed"], row.get("error") or "failed without a reason"))
    return tables


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation; 0 for one value), or ``-`` when there are none."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return "-"
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.fmean(finite):.3f} ± {spread:.3f}"


def render(tables: dict[str, dict[tuple[str, str], RowStats]], cells: list[dict[str, Any]]) -> str:
    """Markdown: one table per dataset, then its failed cells with their reasons."""
    note = "Mean ± sample std over seeds; `-`: no successful seed reported the metric."
    lines = ["# Accuracy benchmark", "", note, ""]
    for dataset, rows in tables.items():
        lines += [f"## {dataset}", ""]
        lines.append("| model | side | " + " | ".join(title for _, title in COLUMNS) + " | seeds |")
        lines.append("| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |")
        for (model, label), stats in sorted(rows.items()):
            cells_text = [mean_std(stats.values.get(name, [])) for name, _ in COLUMNS]
            seeds = f"{len(stats.seeds)}/{len(stats.seeds) + len(stats.failures)}"
            lines.append(f"| {model} | {label} | " + " | ".join(cells_text) + f" | {seeds} |")
        failed = [
            f"- {model} / {label} / seed {seed}: {reason}"
            for (model, label), stats in sorted(rows.items())
            for seed, reason in stats.failures
        ]
        if failed:
            lines += ["", "Failed:", "", *failed]
        lines.append("")
    unreadable = [cell["unreadable"] for cell in cells if "unreadable" in cell]
    if unreadable:
        lines += ["## Unreadable cell files", "", *(f"- {entry}" for entry in unreadable), ""]
    return "\n".join(lines)


def write_tables(out: Path) -> Path:
    """Rebuild ``out/accuracy.md`` from the cell files; return its path."""
    cells = load_cells(out)
    path = out / "accuracy.md"
    path.write_text(render(aggregate(cells), cells), encoding="utf-8")
    return path
