"""Prediction stage: unlabeled images predicted by a trained run, merged and written."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from anomalib_tiled.data.sources import FileSource, collect_images
from anomalib_tiled.run.store import run_store
from anomalib_tiled.sinks.outputs import Prediction
from anomalib_tiled.stages.common import SplitPredictor, write_results


def predict_images(predictor: SplitPredictor, data_path: str | Path, output: Path) -> list[Prediction]:
    """Predict unlabeled images into ``output``: maps, pictures, ``predictions.csv`` and ``report.html``.

    The tile predictions of images that are not one of the run's splits are not kept in the run.
    """
    started = time.perf_counter()
    run = predictor.context.run
    source = FileSource(collect_images(data_path))
    output.mkdir(parents=True, exist_ok=True)
    record = predictor.prepare("predict", source, output / "split", workers=os.cpu_count() or 1)
    results = write_results(
        predictor,
        record,
        output,
        evaluate=False,
        timings={},
        timing=("prediction (s)", started),
        maps_dir=output / "maps",
    )
    shutil.rmtree(output / "split", ignore_errors=True)
    if record.fingerprint not in run.manifest().get("splits", {}).values():
        shutil.rmtree(run_store(run, record.fingerprint).directory, ignore_errors=True)
    predictor.listener.message(f"Predictions of {len(results.predictions)} images written to {output}")
    return results.predictions
