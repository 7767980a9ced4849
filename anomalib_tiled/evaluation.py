"""Evaluation stage: the test split of a trained run, merged, calibrated, scored and written.

Results go to a new ``eval/vN`` folder of the run: ``metrics.json``, ``metrics.csv``,
``predictions.csv`` and the result pictures.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from anomalib_tiled.components import instantiate_datamodule
from anomalib_tiled.errors import DataError
from anomalib_tiled.inference import SplitPredictor, calibrations_for, run_summary, write_merged, write_report
from anomalib_tiled.metrics import MetricSuite
from anomalib_tiled.outputs import OutputWriter, write_metrics
from anomalib_tiled.report import ReportCollector
from anomalib_tiled.run import RunDirectory
from anomalib_tiled.sources import DatasetSource
from anomalib_tiled.splits import SplitRecord, recorded_fingerprint, setup_splits, split_fingerprint
from anomalib_tiled.store import run_store
from anomalib_tiled.validation import check_metric_inputs

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
    """Metrics of the merged, calibrated predictions of ``record``; outputs written to ``output``."""
    started = time.perf_counter()
    run, settings = predictor.context.run, predictor.settings
    post = settings.postprocessing
    calibrations = calibrations_for(run, settings, output)
    pixel_range = calibrations.pixel_range(run_store(run, record.fingerprint), settings.grid)
    suite = MetricSuite(post.metrics.image, post.metrics.pixel if record.has_masks else [], pixel_range)
    max_side = post.visualization.max_side
    collector = ReportCollector(settings.grid, calibrations.image_threshold, pixel_range, max_side=max_side)
    with OutputWriter(output, settings.grid, post.visualization, pixel_range) as writer:
        write_merged(run, settings, record, calibrations, [suite, writer, collector], predictor.listener)
    writer.finish()
    results = suite.compute()
    write_metrics(results, output)
    timings = {**run_timings(run), "evaluation (s)": time.perf_counter() - started}
    write_report(collector, output, results, run_summary(predictor), timings)
    logger.info("Evaluation of %d images written to %s: %s", len(record), output, results)
    return results


def run_timings(run: RunDirectory) -> dict[str, float]:
    """Training time recorded in the manifest, if any."""
    seconds = run.manifest().get("training_seconds")
    return {} if seconds is None else {"training (s)": float(seconds)}
