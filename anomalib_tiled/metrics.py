"""Metrics on merged predictions, with anomalib's metric classes and bounded memory.

Image-level metrics keep one score per image and are computed exactly.

Pixel-level metrics would keep every pixel of the split in RAM with anomalib's default (exact)
curve metrics. Every metric built on torchmetrics' ``BinaryPrecisionRecallCurve`` (``AUROC``,
``AUPR``, ``F1Max``, ``F1AdaptiveThreshold``...) is therefore used in its *binned* form over
:data:`PIXEL_BINS` thresholds spanning the value range of the split, and is updated through a
histogram (``searchsorted`` + ``bincount``) that fills exactly the confusion-matrix state torchmetrics
would fill, in O(pixels) instead of O(pixels x thresholds). Counting metrics (``F1Score``,
``Precision``...) keep only counts. Metrics with neither property (``AUPRO``, ``PRO``, ``AUPIMO``)
stay exact and hold the split's maps in RAM; a warning says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.classification import BinaryPrecisionRecallCurve

from anomalib_tiled.components import METRIC_FIELDS, metric_class, metric_kind
from anomalib_tiled.errors import ConfigError

logger = logging.getLogger(__name__)

PIXEL_BINS = 32768
"""Thresholds of binned pixel curves (AUROC within a few 1e-4 of the exact value on real data)."""


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
    if level == "pixel":
        init_args.setdefault("strict", False)
        if issubclass(cls, BinaryPrecisionRecallCurve) and "thresholds" not in init_args:
            return streaming_binned(cls)(thresholds=binned_thresholds(value_range), validate_args=False, **init_args)
        if kind == "score":
            logger.warning(
                "%s keeps every pixel of the split in memory (no binned variant); expect RAM to grow with the split.",
                cls.__name__,
            )
    try:
        return cls(**init_args)
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
