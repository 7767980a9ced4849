"""What ``compare_upstream`` measures: its geometry, its scenarios (what each side gave) and its targets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

from benchmarks.harness.markdown import format_gib, format_seconds
from benchmarks.harness.results import SideResult

WALL_RATIO_TARGET = 0.25
"""End-to-end wall time of ours at most this fraction of upstream's (scenarios 1 and 2)."""
RSS_RATIO_TARGET = 0.40
"""Peak process-tree RSS of ours at most this fraction of upstream's."""
FLAT_TOLERANCE = 0.10
"""Peak RSS of ours may differ from the x1 run by at most this fraction across test-split copies."""
AUROC_TOLERANCE = 0.005
"""Image and pixel AUROC of ours at least upstream's minus this."""


@dataclass(frozen=True)
class Geometry:
    """Image size, tiling and data amounts of a run mode (``full``/default or ``--quick``)."""

    image_size: int
    tile_size: int
    overlap_stride: int
    reference_size: int
    n_train: int | None
    n_test: int | None

    def grid(self, stride: int) -> str:
        """The tile grid at ``stride``, e.g. ``3x3``."""
        count = (self.image_size - self.tile_size) // stride + 1
        return f"{count}x{count}"


DEFAULT_GEOMETRY = Geometry(
    image_size=512, tile_size=256, overlap_stride=128, reference_size=256, n_train=40, n_test=45
)
QUICK_GEOMETRY = Geometry(
    image_size=256, tile_size=128, overlap_stride=64, reference_size=128, n_train=None, n_test=None
)


def geometry(args: argparse.Namespace) -> Geometry:
    """The run mode's geometry with command-line overrides applied."""
    base = QUICK_GEOMETRY if args.quick else DEFAULT_GEOMETRY
    overrides = {
        name: getattr(args, name)
        for name in ("image_size", "tile_size", "overlap_stride", "reference_size", "n_train", "n_test")
        if getattr(args, name) is not None
    }
    chosen = replace(base, **overrides)
    if args.full:
        chosen = replace(chosen, n_train=None, n_test=None)
    return chosen


@dataclass
class Scenario:
    """One measured configuration and what each side gave.

    Attributes:
        id: ``1``, ``2``, ``3-x<copies>`` or ``4``.
        title: Heading of its table.
        details: Data and geometry, one line.
        results: Side name to its measurements.
        skipped: Side name to the reason it was not run.
        copies: Test-split copies (memory scaling only).
        n_test: Test images of the data it ran on.
    """

    id: str
    title: str
    details: str
    results: dict[str, SideResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copies: int | None = None
    n_test: int | None = None

    def ok(self, side: str) -> SideResult | None:
        """A side's result if it ran successfully."""
        result = self.results.get(side)
        return result if result is not None and result.ok else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "id": self.id,
            "title": self.title,
            "details": self.details,
            "copies": self.copies,
            "n_test": self.n_test,
            "results": {side: result.to_dict() for side, result in self.results.items()},
            "skipped": self.skipped,
        }


def evaluate_targets(scenarios: list[Scenario]) -> list[dict[str, str]]:
    """Check the targets against the measurements.

    Returns:
        One row per target and scenario: ``target``, ``scenario``, ``measured`` and ``status``
        (``met``, ``not met`` or ``not measured`` with the reason).
    """
    rows: list[dict[str, str]] = []
    by_id = {scenario.id: scenario for scenario in scenarios}
    for key in ("1", "2"):
        scenario = by_id.get(key)
        rows.append(
            _ratio_target(scenario, key, "end-to-end wall time ours <= 1/4 of upstream", "wall_s", WALL_RATIO_TARGET)
        )
    rows.extend(
        _ratio_target(scenario, scenario.id, "peak RSS ours <= 40 % of upstream", "peak_tree_rss", RSS_RATIO_TARGET)
        for scenario in scenarios
        if scenario.id in {"1", "2"} or scenario.ok("upstream")
    )
    rows.append(_flatness_target([s for s in scenarios if s.copies is not None]))
    for key in ("1", "2"):
        rows.extend(_auroc_targets(by_id.get(key), key))
    return rows


def _ratio_target(scenario: Scenario | None, key: str, target: str, attribute: str, limit: float) -> dict[str, str]:
    row = {"target": target, "scenario": key}
    ours, theirs = (scenario.ok("ours"), scenario.ok("upstream")) if scenario else (None, None)
    if ours is None or theirs is None:
        return {**row, "measured": "-", "status": f"not measured ({missing_reason(scenario)})"}
    ratio = getattr(ours, attribute) / getattr(theirs, attribute)
    unit = format_seconds if attribute == "wall_s" else format_gib
    measured = (
        f"{unit(getattr(ours, attribute))} vs {unit(getattr(theirs, attribute))} = {ratio:.2f}x (limit {limit:.2f}x)"
    )
    return {**row, "measured": measured, "status": "met" if ratio <= limit else "not met"}


def _flatness_target(scaling: list[Scenario]) -> dict[str, str]:
    row = {"target": f"peak RSS ours flat (+-{FLAT_TOLERANCE:.0%}) across test-split copies", "scenario": "3"}
    measured = sorted((s.copies, s.ok("ours")) for s in scaling if s.ok("ours") is not None and s.copies is not None)
    base = next((result for copies, result in measured if copies == 1), None)
    if base is None or len(measured) < 2:
        return {**row, "measured": "-", "status": "not measured (needs x1 and at least one more copy count to succeed)"}
    changes = [(copies, result.peak_tree_rss / base.peak_tree_rss - 1) for copies, result in measured]
    text = ", ".join(f"x{copies} {format_gib(result.peak_tree_rss)}" for copies, result in measured)
    worst = max(abs(change) for _, change in changes)
    return {
        **row,
        "measured": f"{text}; largest change vs x1 {worst:+.1%}",
        "status": "met" if worst <= FLAT_TOLERANCE else "not met",
    }


def _auroc_targets(scenario: Scenario | None, key: str) -> list[dict[str, str]]:
    rows = []
    for metric in ("image_AUROC", "pixel_AUROC"):
        row = {"target": f"{metric} ours >= upstream - {AUROC_TOLERANCE}", "scenario": key}
        ours, theirs = (scenario.ok("ours"), scenario.ok("upstream")) if scenario else (None, None)
        if ours is None or theirs is None:
            rows.append({**row, "measured": "-", "status": f"not measured ({missing_reason(scenario)})"})
            continue
        difference = ours.metrics[metric] - theirs.metrics[metric]
        measured = f"{ours.metrics[metric]:.4f} vs {theirs.metrics[metric]:.4f} ({difference:+.4f})"
        # The epsilon keeps a difference of exactly the tolerance (in decimal) on the "met" side.
        met = difference >= -AUROC_TOLERANCE - 1e-9
        rows.append({**row, "measured": measured, "status": "met" if met else "not met"})
    return rows


def missing_reason(scenario: Scenario | None) -> str:
    """Why a scenario has no numbers to compare: skipped or failed sides, or not run at all."""
    if scenario is None:
        return "scenario not run"
    reasons = [f"{side} skipped: {reason}" for side, reason in scenario.skipped.items()]
    reasons += [f"{side} failed" for side, result in scenario.results.items() if not result.ok]
    return "; ".join(reasons) or "no result"
