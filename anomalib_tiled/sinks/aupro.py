"""AUPRO at a memory cost independent of the number of images.

:class:`StreamingAUPRO` keeps per-threshold counts: false positives among normal pixels and the
summed overlap of the 8-connected ground-truth regions (:func:`region_overlap`), and integrates the
PRO curve as anomalib does (:func:`pro_area`). The report's PRO curve uses the same functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from anomalib.metrics import AnomalibMetric
from scipy import ndimage
from torchmetrics import Metric

from anomalib_tiled.sinks.binning import binned_confusion

# Regions touching at a corner are one defect, as in OpenCV's (and anomalib's) connected components.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def region_overlap(
    anomaly_map: torch.Tensor, gt_mask: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed per-region overlap of one image's ground-truth regions, at every threshold.

    Args:
        anomaly_map: ``(H, W)`` scores.
        gt_mask: ``(H, W)`` ground truth, anomalous where non-zero.
        thresholds: Sorted 1-D thresholds.

    Returns:
        ``(len(thresholds),)`` float64 sum over the 8-connected regions of the fraction of the region's
        pixels scoring at or above each threshold, and the number of regions.
    """
    regions, count = ndimage.label(gt_mask.detach().cpu().numpy(), structure=_EIGHT_CONNECTED)
    if count == 0:
        return torch.zeros(len(thresholds), dtype=torch.float64), 0
    region = torch.from_numpy(regions).flatten().long()
    inside = region > 0
    region = region[inside]
    # Each pixel weighs 1 / its region's size (anomalib's formulation): one weighted histogram over
    # the thresholds, whatever the number of regions, then counts at or above by reverse cumsum.
    weights = 1.0 / torch.bincount(region).double()[region]
    scores = anomaly_map.detach().cpu().float().flatten()[inside]
    at_or_below = torch.searchsorted(thresholds.cpu(), scores, right=True)
    summed = torch.bincount(at_or_below, weights=weights, minlength=len(thresholds) + 1)
    return summed.flip(0).cumsum(0).flip(0)[1:], count


def pro_curve(
    false_positives: torch.Tensor, normal: int, overlap_sum: torch.Tensor, regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve from per-threshold counts.

    Args:
        false_positives: ``(T,)`` normal pixels scoring at or above each ascending threshold.
        normal: Number of normal pixels (above 0).
        overlap_sum: ``(T,)`` per-region overlaps summed over all regions (see :func:`region_overlap`).
        regions: Number of ground-truth regions (above 0).

    Returns:
        Ascending false-positive rate of normal pixels and the mean region overlap at each rate,
        from (0, 0) to (1, 1).
    """
    # Thresholds ascend, so rates descend: flip, then close the curve at (0, 0) and (1, 1).
    fpr = (false_positives.detach().cpu().double() / normal).flip(0).numpy()
    pro = (overlap_sum.detach().cpu().double() / regions).flip(0).numpy()
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Area under a PRO curve up to ``fpr_limit``, divided by the limit: anomalib's AUPRO.

    Args:
        fpr: Ascending false-positive rates from 0 to 1.
        pro: Mean region overlap at each rate.
        fpr_limit: Upper rate, in (0, 1].

    Returns:
        The normalised area; the curve is cut at the limit by linear interpolation, as anomalib does.
    """
    last = int(np.searchsorted(fpr, fpr_limit, side="right")) - 1
    x, y = fpr[: last + 1], pro[: last + 1]
    if x[-1] < fpr_limit:
        weight = (fpr_limit - fpr[last]) / (fpr[last + 1] - fpr[last])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[last] + weight * (pro[last + 1] - pro[last]))
    return float(np.trapezoid(y, x)) / fpr_limit


class _CountedAUPRO(Metric):
    """AUPRO from per-threshold counts; the tensor half of :class:`StreamingAUPRO`.

    Args:
        thresholds: Sorted thresholds of the PRO curve (see :func:`binned_thresholds`).
        fpr_limit: False-positive rate up to which the curve is integrated.
        **kwargs: torchmetrics ``Metric`` arguments.

    Raises:
        ValueError: If ``fpr_limit`` is not above 0.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, thresholds: torch.Tensor, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not fpr_limit > 0:
            msg = f"fpr_limit must be above 0, got {fpr_limit}"
            raise ValueError(msg)
        # anomalib divides by the curve's last rate, which is 1 for limits above 1.
        self.fpr_limit = min(float(fpr_limit), 1.0)
        self.register_buffer("thresholds", thresholds.float(), persistent=False)
        bins = len(thresholds)
        self.add_state("false_positives", torch.zeros(bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("normal_pixels", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("overlap_sum", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("regions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add anomaly maps and their ground-truth masks, ``(B, H, W)`` or ``(B, 1, H, W)`` each."""
        # Regions are labelled on the CPU (scipy), like anomalib's CPU path (OpenCV).
        maps = preds.detach().cpu().float().reshape(-1, *preds.shape[-2:])
        masks = target.detach().cpu().reshape(-1, *target.shape[-2:])
        thresholds = self.thresholds.cpu()
        confusion = binned_confusion(maps, masks, thresholds)
        device = self.false_positives.device
        self.false_positives += confusion[:, 0, 1].to(device)
        self.normal_pixels += confusion[0, 0].sum().to(device)
        for anomaly_map, gt_mask in zip(maps, masks, strict=True):
            overlap, regions = region_overlap(anomaly_map, gt_mask, thresholds)
            self.overlap_sum += overlap.to(device)
            self.regions += regions

    def compute(self) -> torch.Tensor:
        """AUPRO up to ``fpr_limit``; 0 without normal pixels or regions, as anomalib's."""
        normal, regions = int(self.normal_pixels), int(self.regions)
        if normal == 0 or regions == 0:
            return torch.tensor(0.0)
        fpr, pro = pro_curve(self.false_positives, normal, self.overlap_sum, regions)
        return torch.tensor(pro_area(fpr, pro, self.fpr_limit), dtype=torch.float32)


class StreamingAUPRO(AnomalibMetric, _CountedAUPRO):
    """anomalib's ``AUPRO`` at a memory cost independent of the number of images.

    Updated with batches like any anomalib metric (fields ``anomaly_map`` and ``gt_mask`` by default);
    batches missing a field are skipped when not strict.

    Args:
        thresholds: Sorted thresholds of the PRO curve (see :func:`binned_thresholds`).
        fpr_limit: False-positive rate up to which the curve is integrated, as anomalib's ``AUPRO``.
        prefix: Prefix of the name, which is ``<prefix>AUPRO`` like anomalib's metric.
        **kwargs: ``fields``, ``strict`` and torchmetrics ``Metric`` arguments.
    """

    default_fields = ("anomaly_map", "gt_mask")

    def __init__(self, thresholds: torch.Tensor, fpr_limit: float = 0.3, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(prefix=prefix, thresholds=thresholds, fpr_limit=fpr_limit, **kwargs)
        self.name = f"{prefix}AUPRO"
