"""What one side of a benchmark gave: wall time, stages, memory peaks and metrics, verified."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.harness.markdown import format_gib, format_seconds

if TYPE_CHECKING:
    from benchmarks.harness.procmon import ProcessRun

REQUIRED_METRICS = ("image_AUROC", "pixel_AUROC")
REPORTED_METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score")
KEPT_METRICS = (*REPORTED_METRICS, "pixel_AUPRO")
"""Metrics a side keeps: the reported four plus AUPRO, which only workloads with ``pixel_aupro`` compute."""


@dataclass
class SideResult:
    """Measurements of one side of a scenario.

    Attributes:
        side: ``ours``, ``upstream`` or ``reference``.
        ok: Whether it ran to the end and produced the required metrics.
        error: One line saying why it failed.
        wall_s: End-to-end wall time of its processes.
        stages: Wall time per observable stage (``train``, ``eval``...).
        peak_tree_rss: Peak RSS of the process tree (bytes), the maximum over its processes.
        peak_main_rss: Peak RSS of the main process alone (bytes).
        peak_tree_pss: Peak PSS of the process tree (bytes), when sampled.
        metrics: Metric values it reported.
        run_dir: Where it wrote its results.
        logs: Standard output/error files of its processes.
    """

    side: str
    ok: bool = False
    error: str | None = None
    wall_s: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    peak_tree_rss: int | None = None
    peak_main_rss: int | None = None
    peak_tree_pss: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str | None = None
    logs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)

    def summary(self) -> str:
        """One progress line: wall time, peak RSS of the tree and metrics, or why it failed."""
        if not self.ok:
            return f"FAILED: {self.error}"
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in self.metrics.items())
        return f"{format_seconds(self.wall_s)}, peak RSS {format_gib(self.peak_tree_rss)}, {metrics}"

    def add_process(self, run: ProcessRun) -> None:
        """Account for one finished process: wall time adds up, memory peaks take the maximum."""
        self.wall_s = (self.wall_s or 0.0) + run.wall_s
        self.peak_tree_rss = max(self.peak_tree_rss or 0, run.peak_tree_rss)
        self.peak_main_rss = max(self.peak_main_rss or 0, run.peak_main_rss)
        if run.peak_tree_pss is not None:
            self.peak_tree_pss = max(self.peak_tree_pss or 0, run.peak_tree_pss)
        self.logs += [str(run.stdout_path), str(run.stderr_path)]


def finish_metrics(result: SideResult, values: dict[str, float], source: str) -> SideResult:
    """Keep the reported metrics; fail when a required one is missing or not a finite number."""
    result.metrics = {name: float(values[name]) for name in KEPT_METRICS if name in values}
    bad = [name for name in REQUIRED_METRICS if not math.isfinite(result.metrics.get(name, math.nan))]
    if bad:
        result.error = f"{source}: missing or non-finite {', '.join(bad)} (got {sorted(values)})"
        return result
    result.ok = True
    return result
