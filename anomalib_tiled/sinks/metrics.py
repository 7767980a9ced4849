"""Metrics on merged predictions, with anomalib's metric classes and bounded memory.

Image-level metrics keep one score per image and are computed exactly.

Pixel-level metrics would keep every pixel of the split in RAM with anomalib's default (exact)
curve metrics. Every metric built on torchmetrics' ``BinaryPrecisionRecallCurve`` (``AUROC``,
``AUPR``, ``F1Max``, ``F1AdaptiveThreshold``...) is therefore used in its *binned* form over
:data:`PIXEL_BINS` thresholds spanning the value range of the split, and is updated through a
histogram (``searchsorted`` + ``bincount``) that fills exactly the confusion-matrix state torchmetrics
would fill, in O(pixels) instead of O(pixels x thresholds). ``AUPRO`` is replaced by
:class:`StreamingAUPRO`, which keeps the same kind of per-threshold counts: false positives among
normal pixels and the summed overlap of the 8-connected ground-truth regions (see
:func:`region_overlap`), and integrates the PRO curve as anomalib does (:func:`pro_area`). Counting
metrics (``F1Score``, ``Precision``...) keep only counts. Metrics with none of these forms (``PRO``,
``AUPIMO``) stay exact and hold the split's maps in RAM; a warning says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from anomalib.metrics import AUPRO, AnomalibMetric
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.classification import BinaryPrecisionRecallCurve

from anomalib_tiled.config.components import METRIC_FIELDS, metric_class, metric_kind
from anomalib_tiled.errors import ConfigError

logger = logging.getLogger(__name__)

PIXEL_BINS = 32768
"""Thresholds of binned pixel curves (AUROC within a few 1e-4 of the exact value on real data)."""

# Regions touching at a corner are one defect, as in OpenCV's (and anomalib's) connected components.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def build_metric(
    spec: str | dict,
    level: str,
    key: str,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Metric:
    """Instantiate an anomalib metric for merged predictions.

    Args:
        spec: Metric name (``AUROC``), class path, or ``{class_path, init_args}``.
        level: ``image`` or ``pixel``; chooses the prefix and the batch fields.
        key: Config key, for error messages.
        value_range: Range of the values the pixel metric will see; binned thresholds span it.

    Returns:
        The metric, named ``<level>_<Class>`` like anomalib's evaluator.
    """
    cls, init_args = metric_class(spec, key)
    kind = metric_kind(cls)
    init_args.setdefault("fields", METRIC_FIELDS[level, kind])
    init_args.setdefault("prefix", f"{level}_")
    factory: Callable[..., Metric] = cls
    if level == "pixel":
        init_args.setdefault("strict", False)
        if cls is AUPRO:
            factory = partial(StreamingAUPRO, binned_thresholds(value_range))
        elif issubclass(cls, BinaryPrecisionRecallCurve) and "thresholds" not in init_args:
            factory = partial(streaming_binned(cls), thresholds=binned_thresholds(value_range), validate_args=False)
        elif kind == "score":
            logger.warning(
                "%s keeps every pixel of the split in memory (no binned variant); expect RAM to grow with the split.",
                cls.__name__,
            )
    try:
        return factory(**init_args)
    except (TypeError, ValueError) as error:
        msg = f"{key}: cannot create {cls.__name__} with {init_args}: {error}"
        raise ConfigError(msg) from None


def binned_thresholds(value_range: tuple[float, float], bins: int = PIXEL_BINS) -> torch.Tensor:
    """Evenly spaced thresholds over ``value_range`` (widened when the range is empty)."""
    low, high = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high <= low:
        high = low + 1.0
    return torch.linspace(low, high, bins, dtype=torch.float32)


def binned_confusion(preds: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Confusion matrices of ``preds >= threshold`` for every threshold, by histogram.

    Args:
        preds: Scores of any shape.
        target: Binary ground truth of the same number of elements.
        thresholds: Sorted 1-D thresholds.

    Returns:
        ``(len(thresholds), 2, 2)`` long tensor indexed ``[threshold, target, prediction]``, equal to
        the ``confmat`` torchmetrics accumulates in binned mode.
    """
    preds = preds.detach().flatten().float()
    target = target.detach().flatten().bool()
    if preds.numel() != target.numel():
        msg = f"predictions ({preds.numel()} values) and ground truth ({target.numel()} values) differ in size"
        raise ValueError(msg)
    # The number of thresholds at or below a score; the score is predicted positive for exactly those.
    at_or_below = torch.searchsorted(thresholds.to(preds.device), preds, right=True)
    confusion = torch.zeros(len(thresholds), 2, 2, dtype=torch.long, device=preds.device)
    for label in (0, 1):
        counts = torch.bincount(at_or_below[target == bool(label)], minlength=len(thresholds) + 1)
        positives = counts.flip(0).cumsum(0).flip(0)[1:]
        confusion[:, label, 1] = positives
        confusion[:, label, 0] = counts.sum() - positives
    return confusion


_STREAMING_CLASSES: dict[type, type] = {}


def streaming_binned(cls: type[Metric]) -> type[Metric]:
    """Subclass of a binned precision-recall-curve metric whose update runs in O(pixels).

    The subclass only changes how the ``confmat`` state is filled; ``compute`` is the original.
    """
    if cls not in _STREAMING_CLASSES:

        def update(self: Metric, batch: Any, *args: Any, **kwargs: Any) -> None:
            del args, kwargs
            values = [getattr(batch, name, None) for name in self.fields]
            if any(value is None for value in values):
                # Same contract as AnomalibMetric.update: a missing field is skipped when not strict.
                self._update_count -= 1
                if self.strict:
                    msg = f"{type(self).__name__}: batch has no value for {self.fields}"
                    raise ValueError(msg)
                return
            preds, target = values
            self.confmat += binned_confusion(preds, target, self.thresholds)

        _STREAMING_CLASSES[cls] = type(cls.__name__, (cls,), {"update": update, "__module__": __name__})
    return _STREAMING_CLASSES[cls]


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


class MetricSuite:
    """The configured image and pixel metrics of one evaluation.

    Args:
        image: Image metric specs.
        pixel: Pixel metric specs.
        pixel_range: Range of the anomaly-map values the pixel metrics will see.
    """

    def __init__(
        self,
        image: Sequence[str | dict],
        pixel: Sequence[str | dict],
        pixel_range: tuple[float, float],
    ) -> None:
        self.metrics = [build_metric(s, "image", f"TrainModels.metrics.image[{i}]") for i, s in enumerate(image)]
        self.metrics += [
            build_metric(s, "pixel", f"TrainModels.metrics.pixel[{i}]", pixel_range) for i, s in enumerate(pixel)
        ]

    def update(self, batch: Any) -> None:
        """Add one batch of merged predictions with their ground truth."""
        for metric in self.metrics:
            metric.update(batch)

    def compute(self) -> dict[str, float]:
        """Scalar value of every metric that could be computed."""
        results: dict[str, float] = {}
        for metric in self.metrics:
            if getattr(metric, "_update_count", 1) == 0:
                logger.warning("%s skipped: the split has no ground truth for it.", metric.name)
                continue
            value = metric.compute()
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                results[metric.name] = float(value)
        return results
