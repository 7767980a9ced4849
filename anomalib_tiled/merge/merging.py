"""Merge: full-resolution predictions from tile predictions.

Anomaly maps are blended with the grid's window weights (uniform mean by default), optionally
seam-smoothed, and the image score is pooled from the result by one of :data:`POOLINGS`. Tile
predictions may first be put on a common scale (:mod:`anomalib_tiled.merge.tile_scaling`), which the
run's statistics apply before merging.
Thresholded tile predictions (tile-stage thresholding) are merged consistently: a pixel is anomalous
when the blended vote of the tiles covering it reaches one half, and an image is anomalous when any
of its tiles is.

:func:`merged_batches` streams a whole split a few images at a time from the prediction store, with
the statistics applied before (tiles) and after (images) merging and the split's ground truth attached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from anomalib_tiled.merge.smoothing import SeamSmoother
from anomalib_tiled.settings import ImageScore, PostProcessingSettings
from anomalib_tiled.tiling import Blending, TileGrid

if TYPE_CHECKING:
    from anomalib_tiled.data.splits import SplitRecord
    from anomalib_tiled.run.store import StoreReader

MERGE_BATCH = 4
"""Images merged together: enough to vectorise, few enough to keep memory flat."""


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
    ``tile_scores`` keeps the (post-processed) score of every tile, for per-position reports.
    """

    image_path: list[str]
    anomaly_map: torch.Tensor
    pred_score: torch.Tensor
    pred_mask: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    gt_mask: torch.Tensor | None = None
    gt_label: torch.Tensor | None = None
    tile_scores: torch.Tensor | None = None


Pooling = Callable[[torch.Tensor, TilePredictions, float], torch.Tensor]


def _max_of_map(anomaly_map: torch.Tensor, tiles: TilePredictions, top_k: float) -> torch.Tensor:
    del tiles, top_k
    return anomaly_map.amax(dim=(-2, -1))


def _top_k_of_map(anomaly_map: torch.Tensor, tiles: TilePredictions, top_k: float) -> torch.Tensor:
    # The mean of the highest pixels: as sensitive as the maximum to a small defect, less to one noisy pixel.
    del tiles
    pixels = anomaly_map.flatten(-2)
    count = max(1, round(top_k * pixels.shape[-1]))
    return pixels.topk(count, dim=-1).values.mean(dim=-1)


def _mean_of_tiles(anomaly_map: torch.Tensor, tiles: TilePredictions, top_k: float) -> torch.Tensor:
    del anomaly_map, top_k
    return tiles.scores.mean(dim=-1)


def _max_of_tiles(anomaly_map: torch.Tensor, tiles: TilePredictions, top_k: float) -> torch.Tensor:
    del anomaly_map, top_k
    return tiles.scores.amax(dim=-1)


POOLINGS: dict[ImageScore, Pooling] = {
    ImageScore.MAX_MAP: _max_of_map,
    ImageScore.TOPK_MAP: _top_k_of_map,
    ImageScore.MEAN_TILES: _mean_of_tiles,
    ImageScore.MAX_TILES: _max_of_tiles,
}
"""Image-score pooling strategies by name: ``(merged maps, tile predictions, top_k) -> (B,)`` scores."""


class TileMerger:
    """Merges tile predictions into image predictions.

    Args:
        grid: Tile grid.
        blending: Weighting of overlapping tiles.
        image_score: How the image score is pooled.
        smoother: Seam smoother applied to merged maps, or None.
        top_k: Fraction of the merged map's pixels ``topk_map`` averages.
    """

    def __init__(
        self,
        grid: TileGrid,
        blending: Blending = Blending.MEAN,
        image_score: ImageScore = ImageScore.MAX_MAP,
        smoother: SeamSmoother | None = None,
        top_k: float = 0.01,
    ) -> None:
        self.grid = grid
        self.blending = Blending(blending)
        self.pooling = POOLINGS[ImageScore(image_score)]
        self.smoother = smoother
        self.top_k = top_k

    def merge(self, tiles: TilePredictions, image_path: list[str]) -> MergedBatch:
        """Merge a batch of tile predictions."""
        anomaly_map = self.grid.untile(tiles.maps, self.blending)
        if self.smoother is not None:
            anomaly_map = self.smoother(anomaly_map)
        pred_mask = None
        if tiles.masks is not None:
            pred_mask = self.grid.untile(tiles.masks.float(), self.blending) >= 0.5
        pred_label = tiles.labels.any(dim=-1) if tiles.labels is not None else None
        return MergedBatch(
            image_path,
            anomaly_map,
            self.pooling(anomaly_map, tiles, self.top_k),
            pred_mask,
            pred_label,
            tile_scores=tiles.scores,
        )


def build_merger(grid: TileGrid, post: PostProcessingSettings) -> TileMerger:
    """The merger of the settings: blending, pooling and (if on) seam smoothing."""
    smoothing = post.seam_smoothing
    smoother = SeamSmoother(grid, smoothing.sigma, smoothing.width) if smoothing.apply else None
    return TileMerger(grid, post.merge.blending, post.merge.image_score, smoother, post.merge.top_k)


class BatchStatistics(Protocol):
    """What :func:`merged_batches` needs of the statistics (see :mod:`anomalib_tiled.merge.statistics`)."""

    def apply_to_tiles(self, tiles: TilePredictions) -> TilePredictions:
        """Tile predictions on the tile stage's scale (and thresholded there, if asked)."""

    def apply_to_images(self, batch: MergedBatch) -> None:
        """Normalise/threshold merged predictions in place."""


def merged_batches(
    record: SplitRecord,
    reader: StoreReader,
    merger: TileMerger,
    statistics: BatchStatistics | None,
    indices: range | None = None,
) -> Iterator[MergedBatch]:
    """Merged, post-processed predictions of a split, a few images at a time, with ground truth.

    Args:
        record: The split (paths, labels, masks).
        reader: Its stored tile predictions, tiles in grid order.
        merger: How tiles are merged.
        statistics: Tile scaling, normalisation and thresholds to apply, or None for raw values.
        indices: Images to merge (default: all).
    """
    masks = record.masks
    indices = range(len(record)) if indices is None else indices
    for start in range(0, len(indices), MERGE_BATCH):
        chunk = indices[start : start + MERGE_BATCH]
        raw = [reader.read(i) for i in chunk]
        tiles = TilePredictions(torch.stack([m for m, _ in raw]), torch.stack([s for _, s in raw]))
        batch = post_process(tiles, merger, statistics, [record.image_paths[i] for i in chunk])
        labels = torch.tensor([record.labels[i] for i in chunk])
        if bool((labels >= 0).all()):
            batch.gt_label = labels.bool()
            if masks is not None:
                batch.gt_mask = torch.from_numpy(masks.read(chunk[0], len(chunk)).copy()).bool()
        yield batch


def post_process(
    tiles: TilePredictions, merger: TileMerger, statistics: BatchStatistics | None, image_path: list[str]
) -> MergedBatch:
    """Tile scaling and tile-stage statistics, merge, image-stage statistics: all of the post-processing of a batch.

    Tensor operations only: exported ensembles (:mod:`anomalib_tiled.export`) trace this function,
    so they post-process exactly as ``eval`` and ``predict`` do.

    Args:
        tiles: Raw predictions of every tile of a batch of images.
        merger: How tiles are merged.
        statistics: Tile scaling, normalisation and thresholds to apply, or None for raw values.
        image_path: Paths of the images (may be empty inside a graph).
    """
    if statistics is not None:
        tiles = statistics.apply_to_tiles(tiles)
    batch = merger.merge(tiles, image_path)
    if statistics is not None:
        statistics.apply_to_images(batch)
    return batch
