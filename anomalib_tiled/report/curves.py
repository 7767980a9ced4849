"""The report's curves and summaries, computed from per-image scalars and binned pixel counts.

Image curves come from torchmetrics' functional API on the exact per-image scores. Pixel curves
come from confusion matrices over fixed thresholds (see :mod:`anomalib_tiled.sinks.metrics`), so they
cost the same memory for ten images or ten thousand. The PRO curve is streamed the same way, with
the helpers of the streaming ``AUPRO`` metric: every ground-truth region's pixel scores are
histogrammed over those thresholds as the region goes by (:func:`~anomalib_tiled.sinks.aupro.region_overlap`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from anomalib_tiled.report.data import Curve, Histogram, TileGridSummary
from anomalib_tiled.sinks.aupro import pro_area, pro_curve
from anomalib_tiled.tiling import TileGrid

MAX_POINTS = 1000
"""Most points a curve keeps in ``report_data.json`` (plots do not need more)."""

PRO_FPR_LIMIT = 0.3
"""False-positive rate up to which the PRO curve is integrated (AUPRO's usual limit)."""


def downsample(curve: Curve, max_points: int = MAX_POINTS) -> Curve:
    """The curve with at most ``max_points`` points, evenly picked along it, ends kept."""
    if len(curve.x) <= max_points:
        return curve
    keep = np.unique(np.linspace(0, len(curve.x) - 1, max_points).round().astype(int))

    def pick(values: list[float]) -> list[float]:
        return [values[i] for i in keep] if values else []

    return Curve(pick(curve.x), pick(curve.y), pick(curve.thresholds), curve.area, curve.note)


def image_curves(scores: torch.Tensor, labels: torch.Tensor) -> tuple[Curve, Curve, Curve]:
    """Image ROC, precision-recall and F1-vs-threshold curves.

    Args:
        scores: ``(N,)`` image scores, in any range.
        labels: ``(N,)`` ground truth: 1 anomalous, 0 normal, -1 unknown (left out).

    Returns:
        ROC (FPR, TPR; area AUROC), PR (recall, precision; area AP) and F1 (threshold, F1; area
        the best F1), each empty with a note when the images are not of both classes.
    """
    known = labels >= 0
    scores, target = scores[known].double(), labels[known].long()
    note = _two_classes(int(target.sum()), int((target == 0).sum()), "images")
    if note is not None:
        return Curve(note=note), Curve(note=note), Curve(note=note)
    unit, low, span = _unit(scores)
    fpr, tpr, _ = binary_roc(unit, target)
    roc = Curve(fpr.tolist(), tpr.tolist(), area=float(binary_auroc(unit, target)))
    precision, recall, thresholds = binary_precision_recall_curve(unit, target)
    raw_thresholds = (thresholds * span + low).tolist()
    pr = Curve(recall.tolist(), precision.tolist(), area=float(binary_average_precision(unit, target)))
    # The last precision-recall point (recall 0) has no threshold.
    f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)[:-1]
    f1_curve = Curve(raw_thresholds, f1.tolist(), raw_thresholds, area=float(f1.max()))
    return downsample(roc), downsample(pr), downsample(f1_curve)


def pixel_curves(confusion: torch.Tensor, overlap_sum: torch.Tensor, regions: int) -> tuple[Curve, Curve]:
    """Pixel ROC and PRO curves from binned counts.

    Args:
        confusion: ``(T, 2, 2)`` confusion matrices ``[threshold, target, prediction]``.
        overlap_sum: ``(T,)`` per-region overlaps summed over all regions.
        regions: Number of ground-truth regions.

    Returns:
        ROC (FPR, TPR; area the binned AUROC) and PRO (FPR, mean overlap; area AUPRO up to
        :data:`PRO_FPR_LIMIT`), both from FPR 0 to 1, or empty with a note.
    """
    normal, anomalous = confusion[0, 0].sum().item(), confusion[0, 1].sum().item()
    note = _two_classes(anomalous, normal, "pixels")
    if note is not None:
        return Curve(note=note), Curve(note=note)
    # Thresholds ascend, so rates descend: flip, then close the curves at (0, 0) and (1, 1).
    fpr = _closed((confusion[:, 0, 1].double() / normal).flip(0))
    tpr = _closed((confusion[:, 1, 1].double() / anomalous).flip(0))
    roc = Curve(fpr.tolist(), tpr.tolist(), area=float(np.trapezoid(tpr, fpr)))
    if regions == 0:
        return roc, Curve(note="the ground truth has no anomalous region")
    fpr, pro = pro_curve(confusion[:, 0, 1], normal, overlap_sum, regions)
    area = pro_area(fpr, pro, PRO_FPR_LIMIT)
    return downsample(roc), downsample(Curve(fpr.tolist(), pro.tolist(), area=area))


def score_histogram(scores: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> Histogram:
    """Histograms of normal, anomalous and unlabeled image scores over shared bins (threshold inside)."""
    if scores.numel() == 0:
        return Histogram(note="no images")
    values = scores.double().numpy()
    # The bins span the threshold too, so that its line falls inside the plot.
    span = values if threshold is None else np.append(values, threshold)
    edges = np.histogram_bin_edges(span, bins=min(50, max(10, round(math.sqrt(len(values))))))
    groups = {"normal": labels == 0, "anomalous": labels == 1, "unlabeled": labels < 0}
    counts = {
        name: np.histogram(values[chosen.numpy()], edges)[0].tolist() for name, chosen in groups.items() if chosen.any()
    }
    return Histogram(edges.tolist(), counts)


def tile_grid_summary(grid: TileGrid, tile_scores: torch.Tensor, tile_labels: torch.Tensor) -> TileGridSummary:
    """Per-position AUROC of tile scores vs tile ground truth, else the spread of normal tile scores.

    Args:
        grid: Tile grid.
        tile_scores: ``(N, n_tiles)`` tile scores.
        tile_labels: ``(N, n_tiles)`` tile ground truth: 1 anomalous, 0 normal, -1 unknown.

    Returns:
        The summary; a position whose tiles are of one class only shows the standard deviation of
        its normal tiles' scores (of all its tiles when none is known normal).
    """
    summary = TileGridSummary(grid.shape, [p.name for p in grid.positions])
    if tile_scores.numel() == 0:
        summary.note = "no tile scores were recorded"
        return summary
    for index in range(len(grid)):
        scores, labels = tile_scores[:, index].double(), tile_labels[:, index]
        known = labels >= 0
        if bool((labels == 1).any()) and bool((labels == 0).any()):
            value = float(binary_auroc(_unit(scores[known])[0], labels[known].long()))
            summary.values.append(value)
            summary.kinds.append("auroc")
            continue
        normal = scores[labels == 0] if bool((labels == 0).any()) else scores
        summary.values.append(float(normal.std()) if normal.numel() > 1 else None)
        summary.kinds.append("std" if normal.numel() > 1 else "none")
    return summary


def _unit(scores: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Scores mapped into [0, 1] by ``(score - low) / span``, with ``low`` and ``span``.

    torchmetrics squashes scores outside [0, 1] with a sigmoid, which collapses raw scores (often
    tens) to 1.0; an increasing affine map keeps the ranking, hence every curve.
    """
    low = float(scores.min())
    span = float(scores.max()) - low or 1.0
    return (scores - low) / span, low, span


def _closed(rates: torch.Tensor) -> np.ndarray:
    """Ascending rates with the curve's ends (0 and 1) added."""
    return np.concatenate([[0.0], rates.numpy(), [1.0]])


def _two_classes(positives: int, negatives: int, what: str) -> str | None:
    """Why a curve over ``what`` cannot be drawn, or None when both classes are present."""
    if positives == 0 and negatives == 0:
        return f"no {what} with ground truth"
    if positives == 0:
        return f"no anomalous {what}: the curve needs both classes"
    if negatives == 0:
        return f"no normal {what}: the curve needs both classes"
    return None
