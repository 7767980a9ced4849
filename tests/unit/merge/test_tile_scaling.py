"""Tile scaling: tile scales learned from normal images, held-out shares, top-k pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from anomalib_tiled.config.checks import check_tile_scaling
from anomalib_tiled.data.splits import calibration_indices
from anomalib_tiled.errors import ConfigError, DataError
from anomalib_tiled.merge.merging import TileMerger, TilePredictions
from anomalib_tiled.merge.tile_scaling import (
    UPPER_QUANTILE,
    NormalScale,
    NormalScaleEstimator,
    TileScales,
    TileScaling,
)
from anomalib_tiled.settings import ImageScore, MergeConfig, PostProcessingSettings, TrainingSettings
from anomalib_tiled.tiling import TileGrid

GRID = TileGrid.create(32, 16)  # 2x2 tiles of 16


def _learn(method: TileScaling, maps: torch.Tensor, scores: torch.Tensor, batch: int = 3) -> NormalScale:
    estimator = NormalScaleEstimator(method, len(maps))
    for start in range(0, len(maps), batch):
        estimator.update(maps[start : start + batch], scores[start : start + batch])
    return estimator.compute()


def test_zscore_is_the_mean_and_deviation_of_every_normal_value_streamed_in_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = 3 + 2 * torch.randn(10, 16, 16, generator=generator)
    scores = 5 + torch.randn(10, generator=generator)
    scale = _learn(TileScaling.NORMAL_ZSCORE, maps, scores)
    values = maps.double().numpy()
    assert scale.map_shift == pytest.approx(values.mean(), rel=1e-9)
    assert scale.map_scale == pytest.approx(values.std(), rel=1e-6)
    assert scale.score_shift == pytest.approx(float(scores.mean()), rel=1e-6)
    assert scale.score_scale == pytest.approx(float(scores.double().std(correction=0)), rel=1e-6)


def test_quantile_scaling_maps_the_median_to_0_and_the_upper_quantile_to_1() -> None:
    maps = torch.rand(7, 16, 16, generator=torch.Generator().manual_seed(1)) ** 3  # skewed, heavy upper tail
    scores = torch.arange(7.0)
    scale = _learn(TileScaling.NORMAL_QUANTILE, maps, scores)
    median, upper = np.quantile(maps.numpy(), [0.5, UPPER_QUANTILE])
    assert scale.map_shift == pytest.approx(median, rel=1e-5)
    assert NormalScale.maps_of(scale, torch.tensor([median, upper])).tolist() == pytest.approx([0, 1], abs=1e-4)
    assert scale.score_shift == 3.0


def test_a_constant_tile_model_gets_a_usable_scale() -> None:
    scale = _learn(TileScaling.NORMAL_ZSCORE, torch.full((4, 8, 8), 2.0), torch.full((4,), 2.0))
    assert scale.map_scale > 0 and scale.score_scale > 0
    assert torch.isfinite(NormalScale.maps_of(scale, torch.tensor([2.0, 9.0]))).all()


def test_learning_without_normal_predictions_is_an_error() -> None:
    with pytest.raises(ValueError, match="no normal calibration predictions"):
        NormalScaleEstimator(TileScaling.NORMAL_ZSCORE, 0).compute()


def test_scaling_lets_a_defect_in_a_quiet_tile_outrank_a_noisy_tile_model() -> None:
    """The motivating case: raw, the tile model with the widest range decides every image's score."""
    generator = torch.Generator().manual_seed(2)
    spreads = torch.tensor([1.0, 1.0, 1.0, 10.0])  # tile 3's model is noisy on normal images
    normal = torch.randn(20, 4, 16, 16, generator=generator).abs() * spreads[:, None, None]
    scales = TileScales(
        [_learn(TileScaling.NORMAL_ZSCORE, normal[:, t], normal[:, t].amax((-2, -1))) for t in range(4)]
    )
    test_normal = torch.randn(1, 4, 16, 16, generator=generator).abs() * spreads[:, None, None]
    defective = torch.randn(1, 4, 16, 16, generator=generator).abs() * spreads[:, None, None] * 0.5
    defective[0, 0, 4:6, 4:6] = 8.0  # 8 sigma in a quiet tile, below the noisy tile's raw values
    merger = TileMerger(GRID, image_score=ImageScore.MAX_MAP)

    def score(maps: torch.Tensor, *, scaled: bool) -> float:
        tile_scores = maps.amax((-2, -1))
        if scaled:
            maps, tile_scores = scales(maps, tile_scores)
        return float(merger.merge(TilePredictions(maps, tile_scores), []).pred_score[0])

    assert score(defective, scaled=False) < score(test_normal, scaled=False)
    assert score(defective, scaled=True) > score(test_normal, scaled=True)


def test_tile_scales_apply_per_position_and_bound_the_scaled_range() -> None:
    scales = TileScales([NormalScale(0.0, 1.0, 0.0, 1.0), NormalScale(10.0, 2.0, 1.0, 4.0)])
    maps, scores = scales(torch.full((1, 2, 2, 2), 12.0), torch.tensor([[5.0, 5.0]]))
    assert maps[0, 0].unique().tolist() == [12.0] and maps[0, 1].unique().tolist() == [1.0]
    assert scores.tolist() == [[5.0, 1.0]]
    assert scales.value_range([(0.0, 3.0), (8.0, 30.0)]) == (-1.0, 10.0)
    assert set(dict(scales.named_buffers())) == {"map_shift", "map_scale", "score_shift", "score_scale"}


@given(st.integers(1, 500), st.floats(0.01, 0.9), st.integers(0, 2**31 - 1))
def test_calibration_share_holds_out_a_seeded_subset_and_leaves_images_to_fit(
    count: int, share: float, seed: int
) -> None:
    if max(1, round(share * count)) >= count:
        with pytest.raises(DataError, match=r"calibration_share: .* leaves none to fit on"):
            calibration_indices(count, share, seed)
        return
    held = calibration_indices(count, share, seed)
    assert len(held) == max(1, round(share * count)) < count
    assert held == sorted(set(held)) and all(0 <= i < count for i in held)
    assert calibration_indices(count, share, seed) == held


def test_no_share_holds_nothing_out() -> None:
    assert calibration_indices(10, 0.0, 42) == []


@pytest.mark.parametrize(("pixels", "expected"), [(1, 9.0), (2, 8.5), (258, (9 + 8 + 256 * 4) / 258)])
def test_topk_map_is_the_mean_of_the_highest_pixels(pixels: int, expected: float) -> None:
    maps = torch.zeros(1, 4, 16, 16)
    maps[0, 0, 0, 0], maps[0, 0, 0, 1] = 9.0, 8.0
    maps[0, 1] = 4.0  # a quarter of the merged image at 4, the rest 0 except the two peaks
    merged = TileMerger(GRID, image_score=ImageScore.TOPK_MAP, top_k=pixels / 32**2).merge(
        TilePredictions(maps, maps.amax((-2, -1))), []
    )
    assert float(merged.pred_score[0]) == pytest.approx(expected)


def test_settings_name_the_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"merge.tile_scaling: unknown value 'normal_z'.*normal_zscore"):
        MergeConfig(tile_scaling="normal_z")
    with pytest.raises(ConfigError, match=r"merge.top_k: must be a fraction of the pixels in \(0, 1\], got 0"):
        MergeConfig(top_k=0)
    with pytest.raises(ConfigError, match=r"TrainModels.calibration_share: must be in \[0, 1\), got 1"):
        TrainingSettings(GRID, calibration_share=1)


def test_scaling_without_held_out_images_says_how_to_fix_it() -> None:
    post = PostProcessingSettings(merge=MergeConfig(tile_scaling="normal_quantile"))
    with pytest.raises(ConfigError, match=r"^merge.tile_scaling: normal_quantile .* TrainModels.calibration_share"):
        check_tile_scaling(post, has_calibration=False)
    check_tile_scaling(post, has_calibration=True)
    check_tile_scaling(PostProcessingSettings(merge=MergeConfig(tile_scaling="none")), has_calibration=False)
