"""Normalisation and thresholding: learned with anomalib's metrics, applied like anomalib's PostProcessor."""

from __future__ import annotations

import math

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.post_processing import PostProcessor

from anomalib_tiled.merge.merging import MergedBatch, TileMerger, TilePredictions
from anomalib_tiled.merge.smoothing import SeamSmoother
from anomalib_tiled.merge.stage_stats import StageStats, StageStatsEstimator, apply_to_tiles
from anomalib_tiled.tiling import TileGrid


def _validation() -> MergedBatch:
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    masks[4:, 5:9, 5:9] = True
    noise = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.05
    maps = 2.0 + torch.linspace(0, 1, 16).expand(8, 16, 16) * 0.1 + masks * 3.0 + noise
    return MergedBatch(
        image_path=[str(i) for i in range(8)],
        anomaly_map=maps,
        pred_score=maps.amax(dim=(-2, -1)),
        gt_mask=masks,
        gt_label=masks.flatten(1).any(1),
    )


def test_estimator_learns_min_max_and_a_separating_threshold() -> None:
    batch = _validation()
    estimator = StageStatsEstimator("F1AdaptiveThreshold", normalize=True, pixel_range=(2.0, 5.1))
    estimator.update(batch)
    calibration = estimator.compute()
    assert calibration.pixel_min == pytest.approx(float(batch.anomaly_map.min()))
    assert calibration.pixel_max == pytest.approx(float(batch.anomaly_map.max()))
    normal, anomalous = batch.gt_mask.flatten(1).any(1).logical_not(), batch.gt_mask.flatten(1).any(1)
    assert (
        float(batch.pred_score[normal].max()) < calibration.image_threshold <= float(batch.pred_score[anomalous].min())
    )
    assert float(batch.anomaly_map[~batch.gt_mask].max()) < calibration.pixel_threshold
    assert calibration.pixel_threshold <= float(batch.anomaly_map[batch.gt_mask].min())


def test_normalisation_is_anomalib_post_processors() -> None:
    calibration = StageStats(1.0, 5.5, 0.5, 6.0, 3.0, 2.5, normalize=True)
    batch = _validation()
    calibration.apply(batch, threshold=True)
    reference = PostProcessor()
    for name, value in (("image_min", 1.0), ("image_max", 5.5), ("pixel_min", 0.5), ("pixel_max", 6.0)):
        getattr(reference, name).fill_(value)
    reference._image_threshold.fill_(3.0)
    reference._pixel_threshold.fill_(2.5)
    raw = _validation()
    expected = ImageBatch(image=torch.zeros(8, 3, 16, 16), anomaly_map=raw.anomaly_map, pred_score=raw.pred_score)
    reference.post_process_batch(expected)
    torch.testing.assert_close(batch.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(batch.pred_score, expected.pred_score)
    assert torch.equal(batch.pred_mask, expected.pred_mask)
    assert torch.equal(batch.pred_label, expected.pred_label)


def test_without_normalisation_raw_values_meet_raw_thresholds() -> None:
    batch = _validation()
    StageStats(image_threshold=4.0, pixel_threshold=3.5).apply(batch, threshold=True)
    assert torch.equal(batch.pred_label, batch.pred_score > 4.0)
    assert torch.equal(batch.pred_mask, batch.anomaly_map > 3.5)
    assert float(batch.anomaly_map.max()) > 1.0  # untouched raw values


def test_manual_threshold_is_taken_as_given() -> None:
    estimator = StageStatsEstimator(
        {"class_path": "ManualThreshold", "init_args": {"default_value": 0.7}}, False, (0, 1)
    )
    estimator.update(_validation())
    calibration = estimator.compute()
    assert calibration.image_threshold == pytest.approx(0.7)
    assert calibration.pixel_threshold == pytest.approx(0.7)
    assert math.isnan(calibration.pixel_min)


def test_missing_pixel_threshold_falls_back_to_the_image_one() -> None:
    batch = _validation()
    StageStats(image_threshold=4.0).apply(batch, threshold=True)
    assert torch.equal(batch.pred_mask, batch.anomaly_map > 4.0)


def test_calibration_round_trips_through_json_values() -> None:
    calibration = StageStats(image_min=1.0, image_threshold=2.0, normalize=True)
    restored = StageStats.from_dict(calibration.to_dict())
    assert restored.image_min == 1.0 and restored.normalize
    assert math.isnan(restored.pixel_max)


def test_tile_stage_thresholds_merge_by_vote_and_any() -> None:
    grid = TileGrid.create((4, 6), (4, 4), 2)  # two tiles overlapping in columns 2..3
    statistics = [
        StageStats(image_threshold=0.5, pixel_threshold=0.5),
        StageStats(image_threshold=2.0, pixel_threshold=2.0),
    ]
    maps = torch.ones(1, 2, 4, 4)
    scores = torch.tensor([[1.0, 1.0]])
    tile_maps, tile_scores, masks, labels = apply_to_tiles(statistics, maps, scores, threshold=True)
    merged = TileMerger(grid).merge(TilePredictions(tile_maps, tile_scores, masks, labels), ["a"])
    assert bool(merged.pred_label[0])  # the first tile is anomalous
    assert bool(merged.pred_mask[0, :, :2].all())  # only tile 0 covers these: anomalous
    assert not bool(merged.pred_mask[0, :, 4:].any())  # only tile 1 covers these: normal
    assert bool(merged.pred_mask[0, :, 2:4].all())  # one vote of two reaches one half


def test_image_score_pooling_modes() -> None:
    grid = TileGrid.create(4, 2)
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 3] = 0.9
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.8]])
    tiles = TilePredictions(maps, scores)
    assert float(TileMerger(grid, image_score="max_map").merge(tiles, ["a"]).pred_score) == pytest.approx(0.9)
    assert float(TileMerger(grid, image_score="mean_tiles").merge(tiles, ["a"]).pred_score) == pytest.approx(0.35)
    assert float(TileMerger(grid, image_score="max_tiles").merge(tiles, ["a"]).pred_score) == pytest.approx(0.8)


def test_seam_smoothing_changes_only_the_seam_bands() -> None:
    grid = TileGrid.create(32, 16)
    smoother = SeamSmoother(grid, sigma=2.0, width=0.25)
    maps = torch.rand(2, 32, 32)
    smoothed = smoother(maps)
    assert torch.equal(smoothed[:, ~smoother.mask], maps[:, ~smoother.mask])
    assert not torch.equal(smoothed[:, smoother.mask], maps[:, smoother.mask])
    # A step between two tiles gets softened across the seam.
    step = torch.zeros(1, 32, 32)
    step[:, :, 16:] = 1.0
    softened = smoother(step)
    assert 0.0 < float(softened[0, 5, 15]) < 0.5 < float(softened[0, 5, 16]) < 1.0
