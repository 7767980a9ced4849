"""The report's plots, one function per plot, each returning PNG bytes.

Figures are built with matplotlib's object API (``Figure`` rendered by Agg), not ``pyplot``: no
global figure registry, no display backend, safe beside the threads that write result pictures.
A plot never raises: missing or one-class data, or any drawing error, gives a placeholder picture
that says why, because a report with one empty plot beats no report.
"""

from __future__ import annotations

import functools
import io
import logging
import textwrap
from collections.abc import Callable
from typing import ParamSpec

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from anomalib_tiled.report.curves import PRO_FPR_LIMIT
from anomalib_tiled.report.data import Curve, Histogram, TileGridSummary

logger = logging.getLogger(__name__)

FIGURE_SIZE = (6.4, 4.6)
DPI = 100
GROUP_COLORS = {"normal": "tab:green", "anomalous": "tab:red", "unlabeled": "tab:gray"}
P = ParamSpec("P")


def figure_png(figure: Figure) -> bytes:
    """Encode a figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def placeholder_png(reason: str) -> bytes:
    """A picture that says why a plot is empty (the page's heading names the plot)."""
    # Low: a missing plot should not take a plot's room on the page.
    figure = Figure(figsize=(FIGURE_SIZE[0], 1.6), layout="constrained")
    axes = figure.add_subplot()
    axes.set_axis_off()
    text = textwrap.fill(f"Not available: {reason}", 40)
    axes.text(0.5, 0.5, text, ha="center", va="center", color="dimgray", fontsize=14)
    return figure_png(figure)


def never_raises(title: str) -> Callable[[Callable[P, bytes]], Callable[P, bytes]]:
    """Decorator: a failing plot function returns a placeholder naming the error instead."""

    def decorate(draw: Callable[P, bytes]) -> Callable[P, bytes]:
        @functools.wraps(draw)
        def safe(*args: P.args, **kwargs: P.kwargs) -> bytes:
            try:
                return draw(*args, **kwargs)
            except Exception as error:  # one broken plot must not cost the whole report
                # One line for the console; the traceback for run.log.
                logger.warning("Report plot %r failed: %s: %s", title, type(error).__name__, error)
                logger.info("Traceback of the failed report plot %r", title, exc_info=True)
                return placeholder_png(f"could not draw ({type(error).__name__}: {error})")

        return safe

    return decorate


def _axes(xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    # No title: the page gives each plot a heading.
    figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
    axes = figure.add_subplot()
    axes.set(xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _rate_plot(
    curve: Curve,
    labels: tuple[str, str, str],
    chance: bool,
    decorate: Callable[[Axes], None] | None = None,
) -> bytes:
    """A curve in the unit square with its area in the legend, or the placeholder saying why not.

    Args:
        curve: The curve.
        labels: x-axis label, y-axis label and the name of the curve's area.
        chance: Whether to draw the chance diagonal.
        decorate: Draws anything else onto the axes before the legend.

    Returns:
        PNG bytes.
    """
    if not curve.x:
        return placeholder_png(curve.note or "no data")
    xlabel, ylabel, area_name = labels
    figure, axes = _axes(xlabel, ylabel)
    label = area_name if curve.area is None else f"{area_name} = {curve.area:.4f}"
    axes.plot(curve.x, curve.y, linewidth=2, label=label)
    if chance:
        axes.plot([0, 1], [0, 1], linestyle="--", linewidth=1, color="gray", label="chance")
    if decorate is not None:
        decorate(axes)
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.set_aspect("equal")
    axes.legend(loc="lower right")
    return figure_png(figure)


@never_raises("Image ROC")
def image_roc_plot(curve: Curve) -> bytes:
    """Image-level ROC curve, AUROC in the legend."""
    return _rate_plot(curve, ("False-positive rate", "True-positive rate", "AUROC"), chance=True)


@never_raises("Image precision-recall")
def image_pr_plot(curve: Curve) -> bytes:
    """Image-level precision-recall curve, average precision in the legend."""
    return _rate_plot(curve, ("Recall", "Precision", "AP"), chance=False)


@never_raises("Pixel ROC")
def pixel_roc_plot(curve: Curve) -> bytes:
    """Pixel-level ROC curve (binned), its AUROC in the legend."""
    labels = ("False-positive rate (pixels)", "True-positive rate (pixels)", "AUROC (binned)")
    return _rate_plot(curve, labels, chance=True)


@never_raises("Per-region overlap (PRO)")
def pro_plot(curve: Curve) -> bytes:
    """PRO curve: mean overlap of ground-truth regions vs pixel FPR; the AUPRO range is shaded."""
    labels = ("False-positive rate (normal pixels)", "Mean per-region overlap", f"AUPRO@{PRO_FPR_LIMIT:g}")

    def shade(axes: Axes) -> None:
        axes.axvspan(0, PRO_FPR_LIMIT, color="tab:blue", alpha=0.08, label=f"FPR ≤ {PRO_FPR_LIMIT:g}")

    return _rate_plot(curve, labels, chance=False, decorate=shade)


@never_raises("F1 vs threshold")
def f1_threshold_plot(curve: Curve, threshold: float | None) -> bytes:
    """Image F1 score at every threshold, the best one and the chosen one marked."""
    if not curve.x:
        return placeholder_png(curve.note or "no data")
    figure, axes = _axes("Image-score threshold", "F1 score")
    # F1 holds from one distinct score to the next: a step function.
    axes.plot(curve.x, curve.y, linewidth=2, drawstyle="steps-post", label="F1")
    best = int(np.argmax(curve.y))
    axes.plot(curve.x[best], curve.y[best], "o", color="tab:orange", label=f"best F1 = {curve.y[best]:.3f}")
    if threshold is None:
        axes.text(0.02, 0.04, "No image threshold was set.", transform=axes.transAxes, color="dimgray")
    else:
        # F1 holds its value up to the next distinct score: step interpolation, not linear.
        # anomalib's post-processor labels a score anomalous when it is above the threshold, so the F1
        # shown is that of the first curve point past it (what the metrics table reports).
        index = int(np.searchsorted(curve.x, threshold, side="right"))
        at = curve.y[index] if index < len(curve.y) else 0.0
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g} (F1 {at:.3f})")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="best")
    return figure_png(figure)


@never_raises("Image scores")
def score_histogram_plot(histogram: Histogram, threshold: float | None) -> bytes:
    """Histograms of normal vs anomalous (or unlabeled) image scores with the threshold line."""
    if not histogram.counts:
        return placeholder_png(histogram.note or "no data")
    figure, axes = _axes("Image score", "Images")
    for name, counts in histogram.counts.items():
        color = GROUP_COLORS.get(name, "tab:blue")
        label = f"{name} ({sum(counts)})"
        axes.stairs(counts, histogram.edges, fill=True, alpha=0.45, color=color, label=label)
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.legend(loc="best")
    return figure_png(figure)


@never_raises("Tile positions")
def tile_grid_plot(summary: TileGridSummary) -> bytes:
    """Heat map of the tile grid: per-position AUROC (or normal-score spread); the weakest is boxed."""
    if not summary.values or all(value is None for value in summary.values):
        return placeholder_png(summary.note or "no tile values")
    rows, cols = summary.shape
    values = np.array([np.nan if v is None else v for v in summary.values], dtype=float).reshape(rows, cols)
    kinds = np.array(summary.kinds).reshape(rows, cols)
    by_auroc = bool((kinds == "auroc").any())
    # With AUROC, low is bad (red); with spread alone, a noisy position is the suspect (dark).
    shown = np.where(kinds == "auroc", values, np.nan) if by_auroc else values
    cmap = colormaps["RdYlGn" if by_auroc else "Reds"].with_extremes(bad="lightgray")
    low, high = (min(0.5, np.nanmin(shown)), 1.0) if by_auroc else (0.0, max(np.nanmax(shown), 1e-12))
    figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=low, vmax=high)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.85)
    colorbar.set_label(
        "tile AUROC (tile score vs tile ground truth)" if by_auroc else "std of tile scores (normal tiles where known)"
    )
    _annotate_cells(axes, image, values, kinds, by_auroc)
    weakest = int(np.nanargmin(shown) if by_auroc else np.nanargmax(shown))
    row, col = divmod(weakest, cols)
    if np.nanmin(shown) < np.nanmax(shown):
        # Box the weakest position, unless all are alike and none is weaker.
        axes.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=3))
        which, measure = ("weakest", "AUROC") if by_auroc else ("noisiest", "std")
        axes.set_title(f"{which} position: {summary.names[weakest]} ({measure} {values[row, col]:.3f})")
    xlabel = "Tile column"
    if by_auroc and bool((kinds == "std").any()):
        xlabel += "\n(grey: one class only at that position; std of its normal tile scores)"
    axes.set(xlabel=xlabel, ylabel="Tile row", xticks=range(cols), yticks=range(rows))
    return figure_png(figure)


def _annotate_cells(axes: Axes, image: AxesImage, values: np.ndarray, kinds: np.ndarray, by_auroc: bool) -> None:
    """Write each cell's value, in black or white for contrast with the cell colour."""
    size = max(5.0, min(11.0, 40.0 / max(values.shape)))
    for row, col in np.ndindex(values.shape):
        value, kind = float(values[row, col]), str(kinds[row, col])
        coloured = not np.isnan(value) and (kind == "auroc" or not by_auroc)
        if np.isnan(value):
            text = "n/a"
        elif kind == "std" and by_auroc:
            # A grey cell among AUROC cells: its position saw one class only; show its spread.
            text = f"std\n{value:.2g}"
        else:
            text = f"{value:.2f}" if kind == "auroc" else f"{value:.3g}"
        color = _contrast(image.cmap(image.norm(value))) if coloured else "black"
        axes.text(col, row, text, ha="center", va="center", fontsize=size, color=color)


def _contrast(rgba: tuple[float, ...]) -> str:
    """Black on light colours, white on dark ones."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
