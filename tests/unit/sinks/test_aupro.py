"""Streaming AUPRO: anomalib's exact value from per-threshold counts, at flat memory."""

from __future__ import annotations

import pytest
import torch
from anomalib.metrics import AUPRO

from anomalib_tiled.errors import ConfigError
from anomalib_tiled.merge.merging import MergedBatch
from anomalib_tiled.sinks.aupro import StreamingAUPRO
from anomalib_tiled.sinks.metrics import MetricSuite, build_metric

SIDE = 64


def blob_masks(count: int, seed: int, defect_free: tuple[int, ...] = ()) -> torch.Tensor:
    """``(count, SIDE, SIDE)`` masks of two to four discs each, some touching; ``defect_free`` images are empty."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    masks = torch.zeros(count, SIDE, SIDE, dtype=torch.bool)
    for index in range(count):
        if index in defect_free:
            continue
        for _ in range(int(torch.randint(2, 5, (1,), generator=generator))):
            row, col = torch.randint(0, SIDE, (2,), generator=generator).tolist()
            radius = int(torch.randint(2, 9, (1,), generator=generator))
            masks[index] |= (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
    return masks


def noisy_maps(masks: torch.Tensor, seed: int) -> torch.Tensor:
    """Random maps in [0, 1], higher on the defects (so the PRO curve is not a diagonal)."""
    generator = torch.Generator().manual_seed(seed)
    return (0.7 * torch.rand(masks.shape, generator=generator) + 0.3 * masks).clamp(0, 1)


def batch(maps: torch.Tensor, masks: torch.Tensor, with_masks: bool = True) -> MergedBatch:
    """Merged predictions with image labels, and with their masks unless ``with_masks`` is false."""
    return MergedBatch(
        image_path=[str(i) for i in range(len(maps))],
        anomaly_map=maps,
        pred_score=maps.amax(dim=(-2, -1)),
        gt_mask=masks if with_masks else None,
        gt_label=masks.flatten(1).any(1),
    )


def batches(seed: int = 0) -> list[MergedBatch]:
    """Three batches of three images (the second without defects in one image) and one without masks."""
    masks = blob_masks(9, seed, defect_free=(4,))
    maps = noisy_maps(masks, seed)
    split = [batch(maps[start : start + 3], masks[start : start + 3]) for start in range(0, 9, 3)]
    unmasked = blob_masks(2, seed + 1, defect_free=(0,))
    return [*split[:2], batch(noisy_maps(unmasked, seed + 1), unmasked, with_masks=False), split[2]]


def exact_aupro(split: list[MergedBatch], fpr_limit: float = 0.3) -> float:
    reference = AUPRO(fields=["anomaly_map", "gt_mask"], strict=False, fpr_limit=fpr_limit)
    for item in split:
        reference.update(item)
    return float(reference.compute())


@pytest.mark.parametrize(("seed", "fpr_limit"), [(0, 0.3), (1, 0.3), (2, 0.05), (3, 1.0)])
def test_streaming_aupro_equals_anomalib(seed: int, fpr_limit: float) -> None:
    split = batches(seed)
    streaming = build_metric({"class_path": "AUPRO", "init_args": {"fpr_limit": fpr_limit}}, "pixel", "k")
    assert isinstance(streaming, StreamingAUPRO)
    for item in split:
        streaming.update(item)
    expected = exact_aupro(split, fpr_limit)
    assert 0.2 < expected < 1.0
    assert float(streaming.compute()) == pytest.approx(expected, abs=2e-3)


def test_any_spelling_of_anomalibs_aupro_streams_and_keeps_its_name() -> None:
    for spec in ("AUPRO", "anomalib.metrics.AUPRO", "anomalib.metrics.aupro.AUPRO", {"class_path": "AUPRO"}):
        metric = build_metric(spec, "pixel", "k")
        assert isinstance(metric, StreamingAUPRO)
        assert metric.name == "pixel_AUPRO" and metric.fields == ["anomaly_map", "gt_mask"]


def test_state_size_does_not_grow_with_the_images() -> None:
    metric = build_metric("AUPRO", "pixel", "k")

    def state_size() -> int:
        return sum(value.numel() for value in metric.metric_state.values())

    before = state_size()
    for seed in range(4):
        masks = blob_masks(4, seed)
        metric.update(batch(noisy_maps(masks, seed), masks))
    assert state_size() == before == 2 * metric.thresholds.numel() + 2
    assert all(not isinstance(value, list) for value in metric.metric_state.values())


def test_state_is_summed_across_processes() -> None:
    metric = build_metric("AUPRO", "pixel", "k")
    assert set(metric._reductions) == {"false_positives", "normal_pixels", "overlap_sum", "regions"}
    assert all(reduce is not None and reduce.__name__ == "dim_zero_sum" for reduce in metric._reductions.values())


def test_suite_reports_pixel_aupro_and_skips_it_without_masks() -> None:
    suite = MetricSuite(["AUROC"], ["AUROC", "AUPRO"], (0.0, 1.0))
    split = batches()
    for item in split:
        suite.update(item)
    results = suite.compute()
    assert set(results) == {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}
    assert results["pixel_AUPRO"] == pytest.approx(exact_aupro(split), abs=2e-3)
    unlabeled = MetricSuite([], ["AUPRO"], (0.0, 1.0))
    unlabeled.update(split[2])
    assert unlabeled.compute() == {}


def test_strict_aupro_refuses_a_batch_without_masks() -> None:
    metric = build_metric({"class_path": "AUPRO", "init_args": {"strict": True}}, "pixel", "k")
    with pytest.raises(ValueError, match="gt_mask"):
        metric.update(batches()[2])


def test_perfect_maps_score_one_and_no_regions_score_zero_like_anomalib() -> None:
    masks = blob_masks(3, 5)
    perfect = build_metric("AUPRO", "pixel", "k")
    perfect.update(batch(masks.float(), masks))
    assert float(perfect.compute()) == pytest.approx(1.0)
    empty = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    normal_only = [batch(torch.rand(2, SIDE, SIDE), empty)]
    streaming = build_metric("AUPRO", "pixel", "k")
    streaming.update(normal_only[0])
    assert float(streaming.compute()) == exact_aupro(normal_only) == 0.0


@pytest.mark.parametrize(
    ("init_args", "message"),
    [({"fpr_limit": 0}, "fpr_limit must be above 0"), ({"fpr_limt": 0.3}, "fpr_limt"), ({"thresholds": 8}, "")],
)
def test_bad_arguments_are_one_line_config_errors(init_args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^k: cannot create AUPRO with .*{message}") as error:
        build_metric({"class_path": "AUPRO", "init_args": init_args}, "pixel", "k")
    assert "\n" not in str(error.value)


def test_only_metrics_without_a_streaming_form_warn(caplog: pytest.LogCaptureFixture) -> None:
    build_metric("AUPRO", "pixel", "k")
    assert "keeps every pixel" not in caplog.text
    assert not isinstance(build_metric("PRO", "pixel", "k"), StreamingAUPRO)
    assert "PRO keeps every pixel of the split in memory" in caplog.text
