"""The test evaluator of the benchmark's child processes: anomalib's default four metrics, plus AUPRO.

Imported by sibling children (they run by path, so this folder is on ``sys.path``).
"""

from __future__ import annotations

from typing import Any


def build_evaluator(*, aupro: bool) -> Any:
    """``Evaluator`` with anomalib's default test metrics (``configure_evaluator``) and, if asked, pixel AUPRO."""
    from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score  # noqa: PLC0415 - children import anomalib late

    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
    ]
    if aupro:
        metrics.append(AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False))
    return Evaluator(test_metrics=metrics)
