"""Metrics on merged predictions, with anomalib's metric classes and bounded memory.

Image-level metrics keep one score per image and are computed exactly.

Pixel-level metrics would keep every pixel of the split in RAM with anomalib's default (exact)
curve metrics. Curve metrics (``AUROC``, ``AUPR``, ``F1Max``, ``F1AdaptiveThreshold``...) are
therefore used in their binned, streaming form (:mod:`anomalib_tiled.sinks.binning`) over thresholds
spanning the value range of the split, and ``AUPRO`` is replaced by
:class:`~anomalib_tiled.sinks.aupro.StreamingAUPRO`. Counting metrics (``F1Score``, ``Precision``...)
keep only counts. Metrics with none of these forms (``PRO``, ``AUPIMO``) stay exact and hold the
split's maps in RAM; a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from anomalib.metrics import AUPRO
from torchmetrics import Metric
from torchmetrics.classification import BinaryPrecisionRecallCurve

from anomalib_tiled.config.components import METRIC_FIELDS, metric_class, metric_kind
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.sinks.aupro import StreamingAUPRO
from anomalib_tiled.sinks.binning import binned_thresholds, streaming_binned

logger = logging.getLogger(__name__)


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
