"""Binned pixel curves: thresholds spanning a value range, and confusion counts filled by histogram.

Every metric built on torchmetrics' ``BinaryPrecisionRecallCurve`` (``AUROC``, ``AUPR``, ``F1Max``,
``F1AdaptiveThreshold``...) is used in its *binned* form over :data:`PIXEL_BINS` thresholds and is
updated through a histogram (``searchsorted`` + ``bincount``) that fills exactly the confusion-matrix
state torchmetrics would fill, in O(pixels) instead of O(pixels x thresholds).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

PIXEL_BINS = 32768
"""Thresholds of binned pixel curves (AUROC within a few 1e-4 of the exact value on real data)."""


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
