"""Metrics on merged predictions: anomalib's classes, binned pixel curves in O(pixels)."""

from __future__ import annotations

import pytest
import torch
from anomalib.metrics import AUPR, AUROC, F1AdaptiveThreshold, F1Score
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import BinaryPrecisionRecallCurve

from anomalib_tiled.errors import ConfigError
from anomalib_tiled.merge.merging import MergedBatch
from anomalib_tiled.sinks.binning import binned_confusion, binned_thresholds
from anomalib_tiled.sinks.metrics import MetricSuite, build_metric


@given(st.integers(1, 400), st.integers(2, 64), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_histogram_confusion_equals_torchmetrics_binned_state(count: int, bins: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    preds = torch.rand(count, generator=generator)
    target = torch.rand(count, generator=generator) > 0.7
    thresholds = torch.linspace(0, 1, bins)
    reference = BinaryPrecisionRecallCurve(thresholds=thresholds)
    reference.update(preds, target.long())
    assert torch.equal(binned_confusion(preds, target, thresholds), reference.confmat)


def _batch(maps: torch.Tensor, masks: torch.Tensor) -> MergedBatch:
    return MergedBatch(
        image_path=[str(i) for i in range(len(maps))],
        anomaly_map=maps,
        pred_score=maps.amax(dim=(-2, -1)),
        gt_mask=masks,
        gt_label=masks.flatten(1).any(1),
    )


def test_binned_pixel_auroc_matches_exact_auroc_on_raw_values() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[3:, 10:16, 10:16] = True
    # Raw (unnormalised) values far outside [0, 1]: torchmetrics squashes those with a sigmoid, which
    # saturates to 1.0 here, so the exact reference is computed on min-max scaled values (same ranking).
    maps = 40 + 5 * torch.randn(6, 32, 32, generator=generator) + 8 * masks
    exact = AUROC(fields=["anomaly_map", "gt_mask"])
    exact.update(_batch((maps - maps.min()) / (maps.max() - maps.min()), masks))
    streaming = build_metric("AUROC", "pixel", "test", value_range=(float(maps.min()), float(maps.max())))
    for index in range(len(maps)):
        streaming.update(_batch(maps[index : index + 1], masks[index : index + 1]))
    assert float(streaming.compute()) == pytest.approx(float(exact.compute()), abs=2e-3)
    assert streaming.name == "pixel_AUROC"


def test_pixel_metrics_keep_no_pixels_in_memory() -> None:
    metric = build_metric("AUPR", "pixel", "test")
    assert isinstance(metric, AUPR)
    metric.update(_batch(torch.rand(2, 64, 64), torch.rand(2, 64, 64) > 0.9))
    state_sizes = [value.numel() for value in metric.metric_state.values() if isinstance(value, torch.Tensor)]
    assert sum(state_sizes) == metric.thresholds.numel() * 4


def test_fields_follow_the_metric_kind() -> None:
    assert build_metric("F1Score", "image", "k").fields == ["pred_label", "gt_label"]
    assert build_metric("AUROC", "image", "k").fields == ["pred_score", "gt_label"]
    assert build_metric("F1Score", "pixel", "k").fields == ["pred_mask", "gt_mask"]
    assert isinstance(build_metric("anomalib.metrics.F1Score", "pixel", "k"), F1Score)
    assert isinstance(build_metric("F1AdaptiveThreshold", "pixel", "k"), F1AdaptiveThreshold)


def test_unknown_metric_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError, match=r"TrainModels\.metrics\.image\[0\]: unknown class 'AUROCC' \(did you mean 'AUROC'\?\)"
    ):
        build_metric("AUROCC", "image", "TrainModels.metrics.image[0]")


def test_suite_computes_named_scalars() -> None:
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[2:, 4:8, 4:8] = True
    maps = masks.float() * 0.8 + 0.1
    batch = _batch(maps, masks)
    batch.pred_label = batch.pred_score > 0.5
    batch.pred_mask = maps > 0.5
    suite = MetricSuite(["AUROC", "F1Score"], ["AUROC", "F1Score"], (0.0, 1.0))
    suite.update(batch)
    assert suite.compute() == pytest.approx(
        {"image_AUROC": 1.0, "image_F1Score": 1.0, "pixel_AUROC": 1.0, "pixel_F1Score": 1.0},
    )


def test_thresholds_span_an_empty_range() -> None:
    thresholds = binned_thresholds((2.0, 2.0), bins=5)
    assert float(thresholds[0]) == 2.0 and float(thresholds[-1]) > 2.0


def test_exact_image_auroc_ranks_raw_scores_without_squashing() -> None:
    # Raw scores in the tens: a sigmoid would map them all to 1.0 and report 0.5.
    batch = MergedBatch(
        image_path=["a", "b", "c", "d"],
        anomaly_map=torch.zeros(4, 2, 2),
        pred_score=torch.tensor([21.0, 23.0, 40.0, 45.0]),
        gt_label=torch.tensor([False, False, True, True]),
    )
    metric = build_metric("AUROC", "image", "k")
    metric.update(batch)
    assert float(metric.compute()) == 1.0
