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
        # Runs of ours trained with other settings are rows of their own.
        trained = ", ".join(f"{key.rpartition('.')[2]}={value}" for key, value in cell.get("train_overrides") or [])
        for label, row in cell["rows"].items():
            label = f"{label} ({trained})" if trained else label  # noqa: PLW2901 - the row's full name
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


PIXEL_AUROC_SLACK = 0.002
"""How far below upstream's mean pixel AUROC ours may be and still meet the target."""


def _mean(stats: RowStats | None, name: str) -> float:
    values = [v for v in (stats.values.get(name, []) if stats else []) if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def targets(tables: dict[str, dict[tuple[str, str], RowStats]]) -> list[tuple[str, int, int, int, int, float]]:
    """Per variant of ours: in how many (dataset, model) pairs its means meet each target against upstream.

    Returns:
        ``(label, pairs, image AUROC >= upstream, pixel AUROC >= upstream - 0.002, AUPRO >= upstream,
        mean image AUROC over the pairs)`` sorted by targets met, then mean image AUROC.
    """
    counts: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    for rows in tables.values():
        for (model, label), stats in rows.items():
            upstream = rows.get((model, "upstream"))
            if not label.startswith("ours") or upstream is None or not stats.seeds:
                continue
            entry = counts[label]
            entry[0] += 1
            entry[1] += _mean(stats, "image_AUROC") >= _mean(upstream, "image_AUROC")
            entry[2] += _mean(stats, "pixel_AUROC") >= _mean(upstream, "pixel_AUROC") - PIXEL_AUROC_SLACK
            entry[3] += _mean(stats, "pixel_AUPRO") >= _mean(upstream, "pixel_AUPRO")
            entry[4] += _mean(stats, "image_AUROC")
    result = [(label, int(a), int(b), int(c), int(d), e / a) for label, (a, b, c, d, e) in counts.items()]
    return sorted(result, key=lambda row: (-(row[2] + row[3] + row[4]), -row[5], row[0]))


def render(tables: dict[str, dict[tuple[str, str], RowStats]], cells: list[dict[str, Any]]) -> str:
    """Markdown: the targets met by each variant of ours, one table per dataset, failed cells with reasons."""
    note = "Mean ± sample std over seeds; `-`: no successful seed reported the metric."
    lines = ["# Accuracy benchmark", "", note, "", "## Targets met against upstream (means over seeds)", ""]
    lines.append("| ours variant | pairs | image AUROC ≥ | pixel AUROC ≥ -0.002 | AUPRO ≥ | mean image AUROC |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    lines += [f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {row[5]:.3f} |" for row in targets(tables)]
    lines.append("")
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
