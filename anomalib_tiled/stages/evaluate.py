"""Evaluation stage: the test split of a trained run, merged, post-processed, scored and written.

Results go to a new ``eval/vN`` folder of the run: ``metrics.json``, ``metrics.csv``,
``predictions.csv`` and the result pictures.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from anomalib_tiled.config.checks import check_metric_inputs
from anomalib_tiled.config.components import instantiate_datamodule
from anomalib_tiled.data.sources import DatasetSource
from anomalib_tiled.data.splits import SplitRecord, recorded_fingerprint, setup_splits, split_fingerprint
from anomalib_tiled.errors import DataError
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.stages.common import SplitPredictor, write_results

logger = logging.getLogger(__name__)


def resolve_test_split(predictor: SplitPredictor, datamodule: Any) -> SplitRecord:
    """The test split to evaluate, with every tile predicted.

    Without a data module the run's recorded test split is used as long as its predictions are
    stored; otherwise the data module (given, or built from the run's config) is set up again with
    the run's seed.

    Raises:
        DataError: If the data module has no test split, or it cannot be evaluated.
    """
    run, settings = predictor.context.run, predictor.settings
    metrics = settings.postprocessing.metrics
    recorded = run.split_dir("test")
    if datamodule is None and recorded_fingerprint(recorded) is not None:
        record = SplitRecord.load(recorded)
        if not predictor.missing(record.fingerprint):
            check_metric_inputs(record.labels, metrics)
            return record
    if datamodule is None:
        datamodule = instantiate_datamodule(predictor.trained.data_spec)
    splits = setup_splits(datamodule, settings.training.seed)
    if "test" not in splits:
        msg = "data: the data module has no test split; check data.init_args.test_split_mode"
        raise DataError(msg)
    source = DatasetSource(splits["test"])
    check_metric_inputs(source.labels, metrics)
    fingerprint = split_fingerprint(source.image_paths, source.labels)
    directory = recorded if recorded_fingerprint(recorded) in (None, fingerprint) else run.root / "splits" / fingerprint
    workers = min(getattr(datamodule, "num_workers", 0) or 0, os.cpu_count() or 1)
    return predictor.prepare("test", source, directory, workers)


def evaluate(predictor: SplitPredictor, record: SplitRecord, output: Path) -> dict[str, float]:
    """Metrics of the merged, post-processed predictions of ``record``; outputs written to ``output``."""
    started = time.perf_counter()
    timings = run_timings(predictor.context.run)
    results = write_results(
        predictor, record, output, evaluate=True, timings=timings, timing=("evaluation (s)", started)
    )
    logger.info("Evaluation of %d images written to %s: %s", len(record), output, results.metrics)
    return results.metrics


def run_timings(run: RunDirectory) -> dict[str, float]:
    """Training time recorded in the manifest, if any."""
    seconds = run.manifest().get("training_seconds")
    return {} if seconds is None else {"training (s)": float(seconds)}
