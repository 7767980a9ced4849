"""Merge: full-resolution predictions from tile predictions.

Anomaly maps are blended with the grid's window weights (uniform mean by default), optionally
seam-smoothed, and the image score is pooled from the result. Thresholded tile predictions (tile-
stage thresholding) are merged consistently: a pixel is anomalous when the blended vote of the tiles
covering it reaches one half, and an image is anomalous when any of its tiles is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anomalib_tiled.config import ImageScore
from anomalib_tiled.smoothing import SeamSmoother
from anomalib_tiled.tiling import Blending, TileGrid


@dataclass
class TilePredictions:
    """Predictions of every tile of a batch of images.

    Attributes:
        maps: ``(B, n_tiles, tile_h, tile_w)`` anomaly maps.
        scores: ``(B, n_tiles)`` tile scores.
        masks: ``(B, n_tiles, tile_h, tile_w)`` thresholded maps, or None.
        labels: ``(B, n_tiles)`` thresholded scores, or None.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class MergedBatch:
    """Merged predictions of a batch of images, with whatever ground truth is known.

    Field names follow anomalib's ``ImageBatch``, so anomalib metrics and post-processors accept it.
    """

    image_path: list[str]
    anomaly_map: torch.Tensor
    pred_score: torch.Tensor
    pred_mask: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    gt_mask: torch.Tensor | None = None
    gt_label: torch.Tensor | None = None


class TileMerger:
    """Merges tile predictions into image predictions.

    Args:
        grid: Tile grid.
        blending: Weighting of overlapping tiles.
        image_score: How the image score is pooled.
        smoother: Seam smoother applied to merged maps, or None.
    """

    def __init__(
        self,
        grid: TileGrid,
        blending: Blending = Blending.MEAN,
        image_score: ImageScore = ImageScore.MAX_MAP,
        smoother: SeamSmoother | None = None,
    ) -> None:
        self.grid = grid
        self.blending = Blending(blending)
        self.image_score = ImageScore(image_score)
        self.smoother = smoother

    def merge(self, tiles: TilePredictions, image_path: list[str]) -> MergedBatch:
        """Merge a batch of tile predictions."""
        anomaly_map = self.grid.untile(tiles.maps, self.blending)
        if self.smoother is not None:
            anomaly_map = self.smoother(anomaly_map)
        if self.image_score == ImageScore.MAX_MAP:
            pred_score = anomaly_map.amax(dim=(-2, -1))
        elif self.image_score == ImageScore.MEAN_TILES:
            pred_score = tiles.scores.mean(dim=-1)
        else:
            pred_score = tiles.scores.amax(dim=-1)
        pred_mask = None
        if tiles.masks is not None:
            pred_mask = self.grid.untile(tiles.masks.float(), self.blending) >= 0.5
        pred_label = tiles.labels.any(dim=-1) if tiles.labels is not None else None
        return MergedBatch(image_path, anomaly_map, pred_score, pred_mask, pred_label)
