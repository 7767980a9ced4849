"""Statistics of a run: the tile-scaling, normalisation and threshold policy of every stage combination.

Tile predictions are first put on a common scale of normal variation when ``merge.tile_scaling``
asks for it (:mod:`anomalib_tiled.merge.tile_scaling`, learned from the held-out ``calibration`` split of
normal training images). Normalisation then happens per tile model (``tile``), on merged images
(``image``) or not at all; thresholds are learned per tile model or on merged images.
:class:`StatisticsPolicy` learns the statistics a combination needs from the stored predictions
(``stats.json``), and
:class:`Statistics` applies them while tiles are merged (see
:func:`~anomalib_tiled.merge.merging.merged_batches`). The primitives (anomalib's ``MinMax``, threshold
metrics and ``PostProcessor``) are in :mod:`anomalib_tiled.merge.stage_stats`. :func:`statistics_for` gives
the statistics of a trained run to ``eval``, ``predict`` and ``export`` alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from anomalib_tiled.config.checks import check_statistics_source, check_tile_scaling
from anomalib_tiled.config.format import as_yaml_value
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.merge.merging import MERGE_BATCH, MergedBatch, TilePredictions, build_merger, merged_batches
from anomalib_tiled.merge.stage_stats import StageStats, StageStatsEstimator, apply_to_tiles
from anomalib_tiled.merge.tile_scaling import NormalScale, NormalScaleEstimator, TileScales
from anomalib_tiled.run.directory import RunDirectory, atomic_write_text
from anomalib_tiled.run.store import PredictionStore, run_store
from anomalib_tiled.settings import (
    EnsembleSettings,
    NormalizationStage,
    PostProcessingSettings,
    ThresholdStage,
    TileScaling,
)
from anomalib_tiled.tiling import TileGrid, TilePosition

NormalSplit = tuple[SplitRecord, PredictionStore]
"""The held-out normal images of a run and their stored predictions."""


@dataclass
class Statistics:
    """Learned statistics applied to tile and merged predictions.

    Attributes:
        tiles: One :class:`StageStats` per tile position (tile-stage normalisation or thresholds), or None.
        image: StageStats of merged images, or None.
        post: The settings they were learned for.
        scales: Per-position scaling onto normal variation (``merge.tile_scaling``), or None.
    """

    tiles: list[StageStats] | None
    image: StageStats | None
    post: PostProcessingSettings
    scales: TileScales | None = None

    @classmethod
    def from_stats(cls, stats: dict[str, Any], post: PostProcessingSettings) -> Statistics:
        """Statistics from a ``stats.json`` dict."""
        tiles = [StageStats.from_dict(values) for values in stats["tile"]] if stats.get("tile") else None
        image = StageStats.from_dict(stats["image"]) if stats.get("image") else None
        scales = TileScales([NormalScale(**values) for values in stats["normal"]]) if stats.get("normal") else None
        return cls(tiles, image, post, scales)

    def apply_to_tiles(self, tiles: TilePredictions) -> TilePredictions:
        """Scaling onto normal variation, then tile-stage normalisation (and thresholds) of tile predictions."""
        if self.scales is not None:
            tiles = TilePredictions(*self.scales(tiles.maps, tiles.scores))
        if self.tiles is None:
            return tiles
        threshold = self.post.thresholding.stage == ThresholdStage.TILE
        return TilePredictions(*apply_to_tiles(self.tiles, tiles.maps, tiles.scores, threshold=threshold))

    def apply_to_images(self, batch: MergedBatch) -> None:
        """Image-stage normalisation (and thresholds) of merged predictions, in place."""
        if self.image is not None:
            self.image.apply(batch, threshold=self.post.thresholding.stage == ThresholdStage.IMAGE)

    @property
    def normalized(self) -> bool:
        """Whether merged maps are on the normalised [0, 1] scale."""
        image = self.image is not None and self.image.normalize
        tiles = self.tiles is not None and self.post.normalization_stage == NormalizationStage.TILE
        return image or tiles

    @property
    def image_threshold(self) -> float | None:
        """Threshold of merged image scores in their own units, or None with tile-stage thresholds."""
        if self.image is None or self.post.thresholding.stage != ThresholdStage.IMAGE:
            return None
        return 0.5 if self.image.normalize else float(self.image.image_threshold)

    def pixel_range(self, store: PredictionStore, grid: TileGrid) -> tuple[float, float]:
        """Range of the merged map values of a split (binned pixel metrics span it)."""
        return (0.0, 1.0) if self.normalized else map_range(store, grid, self.scales)


def map_range(store: PredictionStore, grid: TileGrid, scales: TileScales | None) -> tuple[float, float]:
    """Range of a split's tile map values after scaling (merged values stay inside it)."""
    if scales is None:
        return store.value_range([p.name for p in grid])
    return scales.value_range([store.value_range([p.name]) for p in grid])


class StatisticsPolicy:
    """Learns and reuses the statistics of one post-processing configuration.

    Args:
        grid: The tile grid.
        post: Post-processing settings.
    """

    def __init__(self, grid: TileGrid, post: PostProcessingSettings) -> None:
        self.grid = grid
        self.post = post

    @property
    def key(self) -> str:
        """Identity of the settings statistics depend on (saved with them)."""
        post = self.post
        return json.dumps(
            {
                "normalization": as_yaml_value(post.normalization_stage),
                "thresholding": as_yaml_value(asdict(post.thresholding)),
                "smoothing": asdict(post.seam_smoothing),
                "merge": as_yaml_value(asdict(post.merge)),
            },
            sort_keys=True,
        )

    def learn(
        self,
        record: SplitRecord | None,
        store: PredictionStore | None,
        normal: NormalSplit | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Statistics learned from validation predictions (``record`` None: only a fixed threshold).

        Configuration checks guarantee that without a validation split nothing else is asked for, and
        that ``normal`` (the held-out calibration split) exists when ``merge.tile_scaling`` needs it.
        ``seed`` fixes the pixel subsample of quantile scaling.
        """
        post = self.post
        tile_stage = post.thresholding.stage == ThresholdStage.TILE
        stats: dict[str, Any] = {
            "key": self.key,
            "split": None if record is None else record.fingerprint,
            "normal": None,
            "tile": None,
            "image": None,
        }
        scales = None
        if post.merge.tile_scaling != TileScaling.NONE:
            assert normal is not None, "check_tile_scaling guarantees a calibration split"
            scales = TileScales([self._learn_scale(position, *normal, seed) for position in self.grid])
            stats["normal"] = [scale.to_dict() for scale in scales.scales]
        if post.normalization_stage == NormalizationStage.TILE or tile_stage:
            stats["tile"] = [self._learn_tile(position, record, store, scales).to_dict() for position in self.grid]
        image_norm = post.normalization_stage == NormalizationStage.IMAGE
        if image_norm or not tile_stage:
            pixel_range = (0.0, 1.0)
            if store is not None and post.normalization_stage != NormalizationStage.TILE:
                pixel_range = map_range(store, self.grid, scales)
            estimator = StageStatsEstimator(None if tile_stage else post.thresholding.method, image_norm, pixel_range)
            if record is not None and store is not None:
                reader = store.reader([p.name for p in self.grid])
                merger = build_merger(self.grid, post)
                for batch in merged_batches(record, reader, merger, Statistics.from_stats(stats, post)):
                    estimator.update(batch)
            stats["image"] = estimator.compute().to_dict()
        return stats

    def _learn_scale(
        self, position: TilePosition, record: SplitRecord, store: PredictionStore, seed: int
    ) -> NormalScale:
        estimator = NormalScaleEstimator(self.post.merge.tile_scaling, len(record), seed + position.index)
        for batch in _tile_batches(store, record, position):
            estimator.update(batch.anomaly_map, batch.pred_score)
        return estimator.compute()

    def _learn_tile(
        self,
        position: TilePosition,
        record: SplitRecord | None,
        store: PredictionStore | None,
        scales: TileScales | None,
    ) -> StageStats:
        tile_stage = self.post.thresholding.stage == ThresholdStage.TILE
        scale = scales.scales[position.index] if scales is not None else None
        value_range = (0.0, 1.0)
        if store is not None:
            value_range = store.value_range([position.name])
            value_range = scale.value_range(*value_range) if scale is not None else value_range
        estimator = StageStatsEstimator(
            self.post.thresholding.method if tile_stage else None,
            self.post.normalization_stage == NormalizationStage.TILE,
            value_range,
        )
        if store is not None and record is not None:
            for batch in _tile_batches(store, record, position, scale):
                estimator.update(batch)
        return estimator.compute()

    def reuse_or_learn(
        self,
        saved: dict[str, Any],
        record: SplitRecord | None,
        store: PredictionStore | None,
        output: Path | None,
        normal: NormalSplit | None = None,
        seed: int = 0,
    ) -> Statistics:
        """The run's saved statistics when they fit these settings, else learned again (and saved in ``output``)."""
        if saved.get("key") == self.key and saved.get("split") == (record and record.fingerprint):
            return Statistics.from_stats(saved, self.post)
        stats = self.learn(record, store, normal, seed)
        if output is not None:
            atomic_write_text(output / "stats.json", json.dumps(stats, indent=2) + "\n")
        return Statistics.from_stats(stats, self.post)


def statistics_for(run: RunDirectory, settings: EnsembleSettings, output: Path | None) -> Statistics:
    """Statistics of the settings: the run's own, or learned again from its validation predictions.

    Statistics learned again (post-processing settings changed) are saved in ``output``, never in the run.

    Raises:
        ConfigError: If they must be learned but the run has no validation (or calibration) split.
    """
    splits = run.manifest().get("splits", {})
    check_statistics_source(settings.postprocessing, has_validation="val" in splits)
    check_tile_scaling(settings.postprocessing, has_calibration="calibration" in splits)
    record = SplitRecord.load(run.split_dir("val")) if "val" in splits else None
    saved = json.loads(run.stats_path.read_text(encoding="utf-8"))
    store = run_store(run, record.fingerprint) if record is not None else None
    normal = None
    if "calibration" in splits:
        normal = (SplitRecord.load(run.split_dir("calibration")), run_store(run, splits["calibration"]))
    policy = StatisticsPolicy(settings.grid, settings.postprocessing)
    return policy.reuse_or_learn(saved, record, store, output, normal, settings.training.seed)


def _tile_batches(
    store: PredictionStore, record: SplitRecord, position: TilePosition, scale: NormalScale | None = None
) -> Iterator[MergedBatch]:
    """Stored predictions of one tile position (scaled, if given) with the tile's ground truth."""
    maps = store.maps(position.name)
    scores = torch.from_numpy(store.scores(position.name))
    masks = record.masks
    rows, cols = position.slices
    step = MERGE_BATCH * 8
    for start in range(0, len(record), step):
        count = min(step, len(record) - start)
        labels = torch.tensor(record.labels[start : start + count])
        gt_mask = None
        if masks is not None:
            gt_mask = torch.from_numpy(masks.read(start, count)[:, rows, cols].copy()).bool()
            labels = gt_mask.flatten(1).any(dim=1).long()
        yield MergedBatch(
            image_path=record.image_paths[start : start + count],
            anomaly_map=NormalScale.maps_of(scale, torch.from_numpy(maps.read(start, count).copy())),
            pred_score=NormalScale.scores_of(scale, scores[start : start + count]),
            gt_mask=gt_mask,
            gt_label=labels.bool() if bool((labels >= 0).all()) else None,
        )
