"""What a report shows, as plain data: built by the collector, saved as ``report_data.json``, rendered to HTML.

Keeping the report's content in one JSON file lets ``anomalib tiled report`` re-render a run's report
(after a template change, say) without evaluating again. Every list in it is bounded: curves are
downsampled, galleries hold a handful of file names, and per-image values are summarised.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_DATA = "report_data.json"


@dataclass
class Curve:
    """A curve, or an empty one with the reason it could not be computed.

    Attributes:
        x: Abscissae (e.g. false-positive rate, recall or threshold).
        y: Ordinates (e.g. true-positive rate, precision or F1).
        thresholds: Score threshold of each point, where meaningful; else empty.
        area: Summary value shown in the legend (AUROC, AP, AUPRO...), or None.
        note: Why the curve is empty, or None.
    """

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    area: float | None = None
    note: str | None = None


@dataclass
class Histogram:
    """Image-score histograms of each group of images over shared bin edges.

    Attributes:
        edges: Bin edges (one more than each count list).
        counts: Counts per group: ``normal``, ``anomalous`` and/or ``unlabeled``.
        note: Why there is no histogram, or None.
    """

    edges: list[float] = field(default_factory=list)
    counts: dict[str, list[int]] = field(default_factory=dict)
    note: str | None = None


@dataclass
class TileGridSummary:
    """One value per tile position, for the tile-grid view.

    Attributes:
        shape: Grid ``(rows, columns)``.
        names: Position names in row-major order.
        values: Value of each position (row-major), None where nothing could be computed.
        kinds: What each value is: ``auroc`` (tile score vs tile ground truth), ``std`` (spread of
            the tile scores of normal images) or ``none``.
        note: Why there are no values, or None.
    """

    shape: tuple[int, int] = (0, 0)
    names: list[str] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    note: str | None = None


@dataclass
class GalleryItem:
    """One picture of a gallery.

    Attributes:
        file: Picture path relative to the report's folder (``gallery/...png``).
        image_path: Source image.
        score: Image score.
        pred_label: Predicted label, or None when unknown.
        gt_label: Ground-truth label, or None when unknown.
    """

    file: str
    image_path: str
    score: float
    pred_label: bool | None = None
    gt_label: bool | None = None


@dataclass
class Gallery:
    """A titled list of pictures (e.g. the worst false positives)."""

    key: str
    title: str
    items: list[GalleryItem] = field(default_factory=list)


@dataclass
class ReportData:
    """Everything the HTML report shows."""

    title: str
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    image_threshold: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    image_roc: Curve = field(default_factory=Curve)
    image_pr: Curve = field(default_factory=Curve)
    f1: Curve = field(default_factory=Curve)
    pixel_roc: Curve = field(default_factory=Curve)
    pro: Curve = field(default_factory=Curve)
    histogram: Histogram = field(default_factory=Histogram)
    tile_grid: TileGridSummary = field(default_factory=TileGridSummary)
    galleries: list[Gallery] = field(default_factory=list)

    def to_json(self) -> str:
        """The data as JSON text (non-finite numbers become null; unknown objects their ``str``)."""
        return json.dumps(_finite(asdict(self)), indent=1, default=str, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ReportData:
        """Rebuild the data from :meth:`to_json`'s text."""
        raw = json.loads(text)
        grid = raw.pop("tile_grid", {})
        grid["shape"] = tuple(grid.get("shape", (0, 0)))
        galleries = [
            Gallery(g["key"], g["title"], [GalleryItem(**item) for item in g["items"]])
            for g in raw.pop("galleries", [])
        ]
        curves = {name: Curve(**raw.pop(name, {})) for name in ("image_roc", "image_pr", "f1", "pixel_roc", "pro")}
        histogram = Histogram(**raw.pop("histogram", {}))
        return cls(**raw, **curves, histogram=histogram, tile_grid=TileGridSummary(**grid), galleries=galleries)


def load_report_data(path: str | Path) -> ReportData:
    """Read ``report_data.json`` (or the folder that holds it) back."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_DATA
    return ReportData.from_json(path.read_text(encoding="utf-8"))


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
