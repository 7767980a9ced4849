"""Every normalisation x threshold stage combination: learned from stored validation predictions, applied in merging.

A 2x2 grid of 4x4 tiles on 8x8 images. Each tile "model" has its own raw scale (a different base
level); a defect adds 3 (validation) or 5 (test: clearly anomalous) to a 2x2 patch of one tile. The
validation split holds 4 clean images and 2 anomalous ones per tile position; the test split a clean
image and two images with a defect in one tile each. Learned thresholds sit at the weakest validation
defect (F1-optimal), so test defects are made stronger than every validation one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.merge.merging import MergedBatch, build_merger, merged_batches
from anomalib_tiled.merge.statistics import Statistics, StatisticsPolicy
from anomalib_tiled.run.store import PredictionStore
from anomalib_tiled.settings import MergeConfig, PostProcessingSettings, ThresholdingConfig
from anomalib_tiled.tiling import TileGrid
from tests.fakes import make_record, write_tile

GRID = TileGrid.create(8, 4)
TILES = [position.name for position in GRID]
BASE = [1.0, 1.2, 1.4, 1.6]  # raw level of each tile model
COMBINATIONS = [(norm, thr) for norm in ("tile", "image", "none") for thr in ("tile", "image")]


@dataclass
class SplitData:
    """A split recorded and predicted: its record and store, and the raw maps and masks they hold."""

    record: SplitRecord
    store: PredictionStore
    maps: np.ndarray
    masks: np.ndarray

    def tile_scores(self) -> np.ndarray:
        """Raw ``(N, n_tiles)`` tile scores (the maximum of each tile's map)."""
        return GRID.tile(torch.from_numpy(self.maps)).amax(dim=(-2, -1)).numpy()


def _split(defects: list[int | None], noise: float, seed: int, defect: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw merged-resolution maps ``(N, 8, 8)`` and masks of images with a defect in tile ``defects[i]`` (or none)."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((len(defects), 8, 8), dtype=np.float32)
    masks = np.zeros((len(defects), 8, 8), dtype=np.uint8)
    for position in GRID:
        rows, cols = position.slices
        maps[:, rows, cols] = BASE[position.index] + rng.uniform(0, noise, (len(defects), 4, 4))
    for index, tile in enumerate(defects):
        if tile is not None:
            top, left = GRID.positions[tile].top + 1, GRID.positions[tile].left + 1
            maps[index, top : top + 2, left : left + 2] += defect
            masks[index, top : top + 2, left : left + 2] = 1
    return maps, masks


def _store_split(root: Path, name: str, defects: list[int | None], noise: float, seed: int, defect: float) -> SplitData:
    maps, masks = _split(defects, noise, seed, defect)
    record = make_record(root / "splits" / name, [int(d is not None) for d in defects], masks)
    store = PredictionStore(root / "predictions" / record.fingerprint)
    tiles = GRID.tile(torch.from_numpy(maps)).numpy()  # (N, 4 tiles, 4, 4)
    for position in GRID:
        write_tile(store, position.name, tiles[:, position.index], record.fingerprint, batch=3)
    return SplitData(record, store, maps, masks.astype(bool))


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[SplitData, SplitData]:
    root = tmp_path_factory.mktemp("run")
    validation = _store_split(root, "val", [None] * 4 + [0, 1, 2, 3] * 2, noise=0.3, seed=0, defect=3.0)
    test = _store_split(root, "test", [None, 2, 1], noise=0.1, seed=1, defect=5.0)
    return validation, test


def _post(norm: str, thr: str, **thresholding: object) -> PostProcessingSettings:
    # Raw tile values: these splits have no held-out normal images to learn tile scales from.
    return PostProcessingSettings(
        normalization_stage=norm,
        thresholding=ThresholdingConfig(stage=thr, **thresholding),
        merge=MergeConfig(tile_scaling="none"),
    )


def _merge(split: SplitData, post: PostProcessingSettings, statistics: Statistics | None) -> MergedBatch:
    batches = list(merged_batches(split.record, split.store.reader(TILES), build_merger(GRID, post), statistics))
    fields = {}
    for name in ("anomaly_map", "pred_score", "pred_mask", "pred_label", "gt_mask", "gt_label", "tile_scores"):
        values = [getattr(batch, name) for batch in batches]
        fields[name] = None if values[0] is None else torch.cat(values)
    return MergedBatch(image_path=[p for b in batches for p in b.image_path], **fields)


@pytest.mark.parametrize(("norm", "thr"), COMBINATIONS)
def test_clean_and_anomalous_images_are_told_apart_in_every_combination(
    splits: tuple[SplitData, SplitData], norm: str, thr: str
) -> None:
    validation, test = splits
    post = _post(norm, thr)
    stats = StatisticsPolicy(GRID, post).learn(validation.record, validation.store)
    assert stats["split"] == validation.record.fingerprint
    assert (stats["tile"] is not None) == ("tile" in (norm, thr))
    assert (stats["image"] is not None) == ("image" in (norm, thr))
    json.dumps(stats, allow_nan=False)  # stats.json holds no NaN (unlearned values are null)

    merged = _merge(test, post, Statistics.from_stats(stats, post))
    assert merged.pred_label.tolist() == [False, True, True]
    assert merged.gt_label.tolist() == [False, True, True]
    assert torch.equal(merged.gt_mask, torch.from_numpy(test.masks))
    assert torch.equal(merged.pred_mask, merged.gt_mask)  # the defect pixels exactly
    if norm == "none":
        torch.testing.assert_close(merged.anomaly_map, torch.from_numpy(test.maps))  # raw values untouched
    else:
        assert float(merged.anomaly_map.min()) >= 0 and float(merged.anomaly_map.max()) <= 1
        assert float(merged.pred_score.min()) >= 0 and float(merged.pred_score.max()) <= 1


@pytest.mark.parametrize("norm", ["tile", "image", "none"])
def test_tile_stage_labels_are_any_tile_above_its_own_threshold(splits: tuple[SplitData, SplitData], norm: str) -> None:
    validation, test = splits
    post = _post(norm, "tile")
    stats = StatisticsPolicy(GRID, post).learn(validation.record, validation.store)
    statistics = Statistics.from_stats(stats, post)
    assert statistics.image_threshold is None  # no threshold on merged scores
    thresholds = np.array([tile["image_threshold"] for tile in stats["tile"]])
    # Each tile's threshold sits between its clean and its anomalous validation scores, on its own scale.
    val_scores = validation.tile_scores()
    for index in range(len(GRID)):
        rows, cols = GRID.positions[index].slices
        anomalous = validation.masks[:, rows, cols].any(axis=(1, 2))
        assert val_scores[~anomalous, index].max() < thresholds[index] <= val_scores[anomalous, index].min()
    assert thresholds[3] > thresholds[0]  # the tile models' raw scales differ, so do their thresholds

    merged = _merge(test, post, statistics)
    tile_anomalous = test.tile_scores() > thresholds  # raw tile scores against raw tile thresholds
    assert tile_anomalous.sum(axis=1).tolist() == [0, 1, 1]  # one anomalous tile is enough
    assert merged.pred_label.tolist() == tile_anomalous.any(axis=1).tolist()
    if norm == "tile":  # tile scores normalised around each tile's threshold
        assert ((merged.tile_scores > 0.5).numpy() == tile_anomalous).all()


@pytest.mark.parametrize("norm", ["image", "none"])
def test_image_stage_thresholds_are_learned_on_raw_merged_values(
    splits: tuple[SplitData, SplitData], norm: str
) -> None:
    validation, test = splits
    post = _post(norm, "image")
    stats = StatisticsPolicy(GRID, post).learn(validation.record, validation.store)
    image = stats["image"]
    val_scores = validation.maps.max(axis=(1, 2))
    anomalous = np.array(validation.record.labels, dtype=bool)
    assert val_scores[~anomalous].max() < image["image_threshold"] <= val_scores[anomalous].min()
    assert validation.maps[~validation.masks].max() < image["pixel_threshold"]
    assert image["pixel_threshold"] <= validation.maps[validation.masks].min() + 1e-3  # binned: one bin of slack

    statistics = Statistics.from_stats(stats, post)
    merged = _merge(test, post, statistics)
    raw_scores = torch.from_numpy(test.maps).amax(dim=(-2, -1))
    assert torch.equal(merged.pred_label, raw_scores > image["image_threshold"])
    if norm == "none":
        assert statistics.image_threshold == pytest.approx(image["image_threshold"])
        assert not statistics.normalized
        torch.testing.assert_close(merged.pred_score, raw_scores)
        return
    # Image normalisation: anomalib's min-max centred on the threshold, which lands on 0.5.
    assert statistics.image_threshold == 0.5 and statistics.normalized
    span = image["image_max"] - image["image_min"]
    expected = ((raw_scores - image["image_threshold"]) / span + 0.5).clamp(0, 1)
    torch.testing.assert_close(merged.pred_score, expected)
    assert torch.equal(merged.pred_label, merged.pred_score > 0.5)
    at_threshold = MergedBatch(
        image_path=["t"],
        anomaly_map=torch.full((1, 8, 8), image["pixel_threshold"]),
        pred_score=torch.tensor([image["image_threshold"]]),
    )
    statistics.apply_to_images(at_threshold)
    assert float(at_threshold.pred_score) == pytest.approx(0.5)
    torch.testing.assert_close(at_threshold.anomaly_map, torch.full((1, 8, 8), 0.5))


def test_pixel_range_of_metrics_follows_the_scale_of_merged_maps(splits: tuple[SplitData, SplitData]) -> None:
    validation, _ = splits
    raw = (float(validation.maps.min()), float(validation.maps.max()))
    for norm, expected in (("none", raw), ("image", (0.0, 1.0)), ("tile", (0.0, 1.0))):
        post = _post(norm, "image")
        learned = StatisticsPolicy(GRID, post).learn(validation.record, validation.store)
        statistics = Statistics.from_stats(learned, post)
        assert statistics.pixel_range(validation.store, GRID) == pytest.approx(expected)


def test_a_manual_threshold_without_validation_predictions(splits: tuple[SplitData, SplitData]) -> None:
    _, test = splits
    post = _post("none", "image", method={"class_path": "ManualThreshold", "init_args": {"default_value": 3.0}})
    stats = StatisticsPolicy(GRID, post).learn(None, None)
    assert stats["split"] is None and stats["image"]["image_threshold"] == 3.0
    merged = _merge(test, post, Statistics.from_stats(stats, post))
    assert merged.pred_label.tolist() == [False, True, True]


def test_reuse_or_learn_reuses_matching_stats_and_relearns_otherwise(
    splits: tuple[SplitData, SplitData], tmp_path: Path
) -> None:
    validation, _ = splits
    calibrator = StatisticsPolicy(GRID, _post("image", "image"))
    saved = calibrator.learn(validation.record, validation.store)
    saved["image"]["image_threshold"] = 123.0  # tell reused statistics from learned ones

    reused = calibrator.reuse_or_learn(saved, validation.record, validation.store, tmp_path)
    assert reused.image.image_threshold == 123.0
    assert not (tmp_path / "stats.json").exists()

    other_split = make_record(tmp_path / "other", [1, *validation.record.labels[1:]], None)
    relearned = calibrator.reuse_or_learn(saved, other_split, validation.store, tmp_path / "split")
    assert json.loads((tmp_path / "split" / "stats.json").read_text())["split"] == other_split.fingerprint
    assert relearned.image.image_threshold != 123.0

    changed = StatisticsPolicy(GRID, _post("tile", "image"))
    assert changed.key != calibrator.key
    learned = changed.reuse_or_learn(saved, validation.record, validation.store, tmp_path)
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written == changed.learn(validation.record, validation.store)
    assert written["key"] == changed.key and len(written["tile"]) == len(GRID)
    assert learned.tiles is not None and learned.image.image_threshold == written["image"]["image_threshold"]
