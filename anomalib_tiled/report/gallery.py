"""Gallery candidates kept in bounded heaps, and their three-panel pictures.

A gallery shows a handful of images (the highest scores, the worst mistakes). While evaluation
streams, each gallery is a min-heap of at most ``size`` candidates; an image's maps are copied only
when it enters a heap, so memory holds ``size`` maps per gallery whatever the number of images.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from anomalib.visualization.image.functional import add_text_to_image
from PIL import Image, ImageOps

from anomalib_tiled.sinks.visualization import ground_truth_panel, heat_panel, load_image, side_by_side
from anomalib_tiled.tiling import TileGrid

PANEL_GAP = 6
"""White pixels between panels, so that three similar pictures read as three."""

GT_FILL_ALPHA = 0.35
"""Opacity of the ground-truth fill: visible at a glance, the defect still shows through."""


@dataclass
class Candidate:
    """An image that may be shown, with copies of its maps (at the tiled image size)."""

    image_path: str
    score: float
    pred_label: bool | None
    gt_label: bool | None
    anomaly_map: torch.Tensor
    pred_mask: torch.Tensor | None
    gt_mask: torch.Tensor | None


class BoundedHeap:
    """The ``size`` candidates of highest priority seen so far.

    Args:
        size: Most candidates kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[float, int, Candidate]] = []
        # Ties are broken by arrival: the first image seen with a priority stays.
        self._order = itertools.count(0, -1)

    def __len__(self) -> int:
        return len(self._heap)

    def offer(self, priority: float, make: Callable[[], Candidate]) -> None:
        """Keep the candidate ``make()`` builds if its priority is among the ``size`` highest.

        ``make`` is called only when the candidate is kept, so rejected images cost no copy.
        """
        if self.size <= 0:
            return
        entry = (priority, next(self._order))
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (*entry, make()))
        elif entry > self._heap[0][:2]:
            heapq.heapreplace(self._heap, (*entry, make()))

    def candidates(self) -> list[Candidate]:
        """The kept candidates, highest priority first."""
        return [entry[2] for entry in sorted(self._heap, reverse=True)]


def gallery_picture(
    candidate: Candidate,
    grid: TileGrid,
    display_range: tuple[float, float],
    max_side: int,
) -> Image.Image:
    """Original | ground truth | anomaly-map heat overlay with predicted mask, tile grid and caption.

    Args:
        candidate: The image and its maps.
        grid: Tile grid, drawn over the heat map.
        display_range: Map values at the ends of the colour map.
        max_side: Longest side of each panel in pixels.

    Returns:
        The RGB picture, three panels wide.
    """
    try:
        image = load_image(candidate.image_path, max_side)
    except OSError:
        # A source moved since evaluation: the maps still tell most of the story.
        height, width = candidate.anomaly_map.shape[-2:]
        scale = min(1.0, max_side / max(height, width))
        image = _labelled(Image.new("RGB", (round(width * scale), round(height * scale)), "gray"), "image not found")
    if candidate.gt_mask is None:
        truth = _labelled(ImageOps.grayscale(image).convert("RGB"), "no ground truth")
    else:
        truth = ground_truth_panel(image, candidate.gt_mask, fill_alpha=GT_FILL_ALPHA)
    heat = heat_panel(image, candidate.anomaly_map, candidate.pred_mask, display_range, grid, caption(candidate))
    return side_by_side([image, truth, heat], gap=PANEL_GAP)


def caption(candidate: Candidate) -> str:
    """Score, predicted label and ground truth of a candidate, for its heat panel."""
    text = f"score {candidate.score:.3f}"
    if candidate.pred_label is not None:
        text += f"  {'ANOMALOUS' if candidate.pred_label else 'normal'}"
    if candidate.gt_label is not None:
        text += f"  (truth: {'anomalous' if candidate.gt_label else 'normal'})"
    return text


def _labelled(image: Image.Image, text: str) -> Image.Image:
    return add_text_to_image(image, text, size=max(12, image.height // 20)).convert("RGB")
