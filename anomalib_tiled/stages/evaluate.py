"""Evaluation stage: the test split of a trained run, merged, post-processed, scored and written.

Results go to a new ``eval/vN`` folder of the run: ``metrics.json``, ``metrics.csv``,
``predictions.csv`` and the result pictures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from anomalib_tiled.config.checks import check_metric_inputs
from anomalib_tiled.config.components import instantiate_datamodule
from anomalib_tiled.data.sources import DatasetSource
from anomalib_tiled.data.splits import (
    SplitRecord,
    decode_workers,
    recorded_fingerprint,
    setup_splits,
    split_fingerprint,
)
from anomalib_tiled.errors import DataError
from anomalib_tiled.merge.statistics import Statistics
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.run.log import RunLog
from anomalib_tiled.run.session import RunSession
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
    return predictor.prepare("test", source, directory, decode_workers(datamodule))


def evaluate_run(
    predictor: SplitPredictor,
    record: SplitRecord | None = None,
    statistics: Statistics | None = None,
    datamodule: Any = None,
) -> tuple[Path, dict[str, float]]:
    """Evaluate a trained run into a new ``eval/vN`` folder, recorded in the manifest.

    Args:
        predictor: Tile inference of the run.
        record: The test split with every tile predicted (right after fitting), or None to resolve it
            from ``datamodule`` or the run (:func:`resolve_test_split`).
        statistics: The run's statistics when already in memory, else read (or learned again) from the run.
        datamodule: The data module whose test split is evaluated when ``record`` is None.

    Returns:
        The evaluation folder and the metrics.
    """
    run = predictor.context.run
    started = time.perf_counter()
    with RunLog(run.log_path):
        record = record or resolve_test_split(predictor, datamodule)
        output = run.new_output_dir("eval")
        timings = run_timings(run)
        results = write_results(
            predictor,
            record,
            output,
            evaluate=True,
            timings=timings,
            timing=("evaluation (s)", started),
            statistics=statistics,
        )
        logger.info("Evaluation of %d images written to %s: %s", len(record), output, results.metrics)
    RunSession(run, len(predictor.settings.grid)).evaluated(output, results.metrics, time.perf_counter() - started)
    return output, results.metrics


def run_timings(run: RunDirectory) -> dict[str, float]:
    """Training time recorded in the manifest, if any."""
    seconds = run.manifest().get("training_seconds")
    return {} if seconds is None else {"training (s)": float(seconds)}
