"""Normalisation and thresholding, at the tile stage or on merged images.

Statistics are learned from validation predictions with anomalib's own metric classes (``MinMax``
and the configured threshold, ``F1AdaptiveThreshold`` by default; the pixel threshold in its binned,
streaming form) and applied with anomalib's ``PostProcessor``: min-max normalisation centred on the
threshold, so a normalised value above 0.5 is anomalous. Without normalisation, raw values are
compared with the raw thresholds.

``ManualThreshold`` values are in the units of the values they are applied to: raw scores without
normalisation, normalised [0, 1] values after tile-stage normalisation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch
from anomalib.metrics import AnomalibMetric, MinMax
from anomalib.post_processing import PostProcessor

from anomalib_tiled.config.components import class_spec, threshold_class
from anomalib_tiled.sinks.binning import binned_thresholds, streaming_binned

NAN = float("nan")


@dataclass
class StageStats:
    """Normalisation statistics and thresholds of one stage: one tile model or the merged images.

    Attributes:
        image_min: Smallest validation score.
        image_max: Largest validation score.
        pixel_min: Smallest validation anomaly-map value.
        pixel_max: Largest validation anomaly-map value.
        image_threshold: Score threshold (NaN when not learned).
        pixel_threshold: Anomaly-map threshold (NaN when not learned; the image threshold is used).
        normalize: Whether values are min-max normalised with these statistics.
    """

    image_min: float = NAN
    image_max: float = NAN
    pixel_min: float = NAN
    pixel_max: float = NAN
    image_threshold: float = NAN
    pixel_threshold: float = NAN
    normalize: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN as null)."""
        return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StageStats:
        """Inverse of :meth:`to_dict`."""
        return cls(**{key: (NAN if v is None else v) for key, v in values.items()})

    @cached_property
    def post_processor(self) -> PostProcessor:
        """Anomalib ``PostProcessor`` holding these statistics.

        Built once, on first use (the statistics are final by then): merging reuses it batch after
        batch, and an exported graph registers it so that the statistics become its buffers.
        """
        processor = PostProcessor(enable_normalization=self.normalize)
        for name, value in (
            ("image_min", self.image_min),
            ("image_max", self.image_max),
            ("pixel_min", self.pixel_min),
            ("pixel_max", self.pixel_max),
            ("_image_threshold", self.image_threshold),
            ("_pixel_threshold", self.pixel_threshold),
        ):
            getattr(processor, name).fill_(value)
        return processor

    def apply(self, batch: Any, *, threshold: bool) -> None:
        """Normalise ``batch.anomaly_map``/``pred_score`` in place and, if asked, set ``pred_mask``/``pred_label``.

        Only tensor operations, so that exported graphs run this very code.

        Args:
            batch: Object with ``anomaly_map`` and ``pred_score`` (``MergedBatch``, tile batches).
            threshold: Whether to threshold too.
        """
        processor = self.post_processor
        if self.normalize:
            processor.normalize_batch(batch)
        if not threshold:
            return
        if self.normalize:
            batch.pred_mask = batch.pred_label = None
            processor.threshold_batch(batch)
            return
        batch.pred_label = batch.pred_score > processor.image_threshold
        batch.pred_mask = batch.anomaly_map > processor.pixel_threshold


class StageStatsEstimator:
    """Learns a :class:`StageStats` from a stream of validation predictions.

    Args:
        threshold_method: Threshold spec (``F1AdaptiveThreshold``, ``{class_path, init_args}``...), or
            None to learn no threshold.
        normalize: Whether min-max statistics are needed.
        pixel_range: Range of the anomaly-map values the stream will contain (binned pixel threshold).
    """

    def __init__(self, threshold_method: str | dict | None, normalize: bool, pixel_range: tuple[float, float]) -> None:
        self.normalize = normalize
        self.min_max = [MinMax(fields=["pred_score"], strict=False), MinMax(fields=["anomaly_map"], strict=False)]
        self.thresholds: list[Any] = []
        if threshold_method is not None:
            cls = threshold_class(threshold_method)
            _, init_args = class_spec(threshold_method, "thresholding.method")
            if issubclass(cls, AnomalibMetric):
                self.thresholds = [
                    cls(fields=["pred_score", "gt_label"], strict=False, **init_args),
                    streaming_binned(cls)(
                        fields=["anomaly_map", "gt_mask"],
                        strict=False,
                        thresholds=binned_thresholds(pixel_range),
                        validate_args=False,
                        **init_args,
                    ),
                ]
            else:
                # A fixed threshold (ManualThreshold) learns nothing: the same value for images and pixels.
                self.thresholds = [cls(**init_args), cls(**init_args)]

    def update(self, batch: Any) -> None:
        """Add a batch of validation predictions."""
        for metric in (*self.min_max, *self.thresholds):
            if isinstance(metric, AnomalibMetric):
                metric.update(batch)

    def compute(self) -> StageStats:
        """The learned statistics."""
        stats = StageStats(normalize=self.normalize)
        if self.normalize:
            for level, metric in zip(("image", "pixel"), self.min_max, strict=True):
                if getattr(metric, "_update_count", 0):
                    low, high = metric.compute()
                    setattr(stats, f"{level}_min", float(low))
                    setattr(stats, f"{level}_max", float(high))
        for level, metric in zip(("image", "pixel"), self.thresholds, strict=False):
            if isinstance(metric, AnomalibMetric):
                if getattr(metric, "_update_count", 0):
                    setattr(stats, f"{level}_threshold", float(metric.compute()))
                continue
            with warnings.catch_warnings():
                # A fixed threshold is never updated; torchmetrics warns about computing it anyway.
                warnings.simplefilter("ignore", UserWarning)
                setattr(stats, f"{level}_threshold", float(metric.compute()))
        return stats


def apply_to_tiles(
    statistics: list[StageStats],
    maps: torch.Tensor,
    scores: torch.Tensor,
    *,
    threshold: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Apply each tile position's statistics to a batch of tile predictions.

    Args:
        statistics: One StageStats per tile position.
        maps: ``(B, n_tiles, h, w)`` raw maps.
        scores: ``(B, n_tiles)`` raw scores.
        threshold: Whether to threshold (tile-stage thresholding).

    Returns:
        Maps, scores, masks (or None) and labels (or None), all ``(B, n_tiles, ...)``.
    """
    out_maps, out_scores, out_masks, out_labels = [], [], [], []
    for index, stats in enumerate(statistics):
        tile = _TileView(maps[:, index], scores[:, index])
        stats.apply(tile, threshold=threshold)
        out_maps.append(tile.anomaly_map)
        out_scores.append(tile.pred_score)
        out_masks.append(tile.pred_mask)
        out_labels.append(tile.pred_label)
    stack = torch.stack
    return (
        stack(out_maps, 1),
        stack(out_scores, 1),
        stack(out_masks, 1) if threshold else None,
        stack(out_labels, 1) if threshold else None,
    )


@dataclass
class _TileView:
    anomaly_map: torch.Tensor
    pred_score: torch.Tensor
    pred_mask: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
