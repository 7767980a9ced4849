"""Inference with a trained run: every tile of a split predicted, then merged, calibrated and written.

:class:`SplitPredictor` makes sure a split's tile predictions are in the run's store — reused when
stored (the test split predicted during training), otherwise decoded once and predicted by every
tile model that lacks them. :func:`write_merged` streams the merged, calibrated predictions into
the outputs; ``eval`` and ``predict`` both go through it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from anomalib_tiled.calibration import Calibrations, Calibrator, build_merger
from anomalib_tiled.configfile import as_yaml_value
from anomalib_tiled.merging import ImageScore, merged_batches
from anomalib_tiled.models import ModelFactory
from anomalib_tiled.outputs import OutputWriter, Prediction, Sink, stream
from anomalib_tiled.progress import ProgressListener, Task
from anomalib_tiled.report import ReportCollector, render_report
from anomalib_tiled.run import RunDirectory
from anomalib_tiled.runconfig import RunConfig
from anomalib_tiled.settings import EnsembleSettings, PostProcessingSettings
from anomalib_tiled.sources import DatasetSource, FileSource, collect_images
from anomalib_tiled.splits import SplitCache, SplitRecord, split_fingerprint
from anomalib_tiled.store import run_store
from anomalib_tiled.tile_jobs import TileContext, TileSplit
from anomalib_tiled.tile_loop import TileLoop
from anomalib_tiled.tile_scaling import TileScaling
from anomalib_tiled.tiling import TilePosition
from anomalib_tiled.validation import check_calibration_source, check_settings, check_tile_scaling


class SplitPredictor:
    """Makes sure every tile position has predicted a split.

    Args:
        context: Run, model factory and settings of the tile jobs.
        settings: The ensemble's settings.
        listener: Progress reporting.
        batch_size: Tiles per batch when tile models predict.
    """

    def __init__(
        self,
        context: TileContext,
        trained: RunConfig,
        settings: EnsembleSettings,
        listener: ProgressListener,
        batch_size: int,
    ) -> None:
        self.context = context
        self.trained = trained
        self.settings = settings
        self.listener = listener
        self.batch_size = batch_size

    @classmethod
    def for_run(
        cls,
        run: RunDirectory,
        trained: RunConfig,
        settings: EnsembleSettings,
        listener: ProgressListener,
        datamodule: Any = None,
    ) -> SplitPredictor:
        """Tile inference of a trained run, after checking the settings against this machine.

        Tiles are predicted in batches of the data module's ``eval_batch_size`` (else the run's, else 32).
        """
        check_settings(settings)
        factory = ModelFactory.from_spec(trained.model_spec)
        batch = getattr(datamodule, "eval_batch_size", None) or trained.eval_batch_size
        context = TileContext(run, factory, settings.training, settings.runtime)
        return cls(context, trained, settings, listener, int(batch))

    def missing(self, fingerprint: str) -> list[TilePosition]:
        """Tile positions that have not predicted the split ``fingerprint`` yet."""
        return self._loop().missing(run_store(self.context.run, fingerprint), fingerprint)

    def _loop(self) -> TileLoop:
        return TileLoop(self.context, self.settings.grid, self.listener)

    def prepare(self, name: str, source: DatasetSource | FileSource, directory: Path, workers: int) -> SplitRecord:
        """Record of the split in ``directory``, with every tile's predictions stored.

        Stored predictions are reused; missing ones come from one decode of the images and one
        checkpoint at a time.
        """
        run = self.context.run
        fingerprint = split_fingerprint(source.image_paths, source.labels)
        store = run_store(run, fingerprint)
        missing = self.missing(fingerprint)
        cache = SplitCache(run, self.settings.grid.image_size, self.listener)
        recorded = None if missing else cache.recorded(fingerprint, directory)
        if recorded is not None:
            return recorded
        record, images = cache.decode(name, source, directory, workers, images=bool(missing))
        if images is not None:
            try:
                self._loop().predict(TileSplit(record, images, self.batch_size, store), missing)
            finally:
                cache.drop()
        return record


def calibrations_for(run: RunDirectory, settings: EnsembleSettings, output: Path | None) -> Calibrations:
    """Statistics of the settings: the run's own, or learned again from its validation predictions.

    Statistics learned again (post-processing settings changed) are saved in ``output``, never in the run.

    Raises:
        ConfigError: If they must be learned but the run has no validation (or calibration) split.
    """
    splits = run.manifest().get("splits", {})
    check_calibration_source(settings.postprocessing, has_validation="val" in splits)
    check_tile_scaling(settings.postprocessing, has_calibration="calibration" in splits)
    record = SplitRecord.load(run.split_dir("val")) if "val" in splits else None
    saved = json.loads(run.stats_path.read_text(encoding="utf-8"))
    store = run_store(run, record.fingerprint) if record is not None else None
    normal = None
    if "calibration" in splits:
        normal = (SplitRecord.load(run.split_dir("calibration")), run_store(run, splits["calibration"]))
    calibrator = Calibrator(settings.grid, settings.postprocessing)
    return calibrator.reuse_or_learn(saved, record, store, output, normal, settings.training.seed)


def write_merged(
    run: RunDirectory,
    settings: EnsembleSettings,
    record: SplitRecord,
    calibrations: Calibrations,
    sinks: list[Sink],
    listener: ProgressListener,
) -> None:
    """Stream a split's merged, calibrated predictions into ``sinks``."""
    grid = settings.grid
    reader = run_store(run, record.fingerprint).reader([p.name for p in grid])
    batches = merged_batches(record, reader, build_merger(grid, settings.postprocessing), calibrations)
    with Task(listener, "Merging and evaluating", len(record)) as task:
        stream(batches, sinks, task)


def run_summary(predictor: SplitPredictor) -> dict[str, Any]:
    """What a report lists about the run: model, data, grid, stages, seed and package versions."""
    run, settings = predictor.context.run, predictor.settings
    grid, post = settings.grid, settings.postprocessing
    data_spec = predictor.trained.data_spec or {}
    return {
        "model": predictor.context.factory.name,
        "data": str(data_spec.get("class_path", "")).rpartition(".")[2],
        "category": (data_spec.get("init_args") or {}).get("category", ""),
        "run": str(run.root),
        "grid": f"{grid.shape[0]}x{grid.shape[1]} tiles of {grid.tile_size}, stride {grid.stride}",
        "image size": str(grid.image_size),
        "stages": {
            "normalization": as_yaml_value(post.normalization_stage),
            "thresholding": f"{post.thresholding.method} at {as_yaml_value(post.thresholding.stage)} stage",
            "seam smoothing": post.seam_smoothing.apply,
            "blending": as_yaml_value(post.merge.blending),
            "image score": _image_score(post),
            "tile calibration": _tile_calibration(post, settings.training.calibration_share),
        },
        "seed": settings.training.seed,
        "versions": {name: metadata.version(name) for name in ("anomalib-tiled", "anomalib", "torch", "lightning")},
    }


def _image_score(post: PostProcessingSettings) -> str:
    name = as_yaml_value(post.merge.image_score)
    return f"{name} (top {post.merge.top_k:.2%} of pixels)" if post.merge.image_score == ImageScore.TOPK_MAP else name


def _tile_calibration(post: PostProcessingSettings, share: float) -> str:
    name = as_yaml_value(post.merge.calibration)
    return name if post.merge.calibration == TileScaling.NONE else f"{name} ({share:.0%} of training images held out)"


def write_report(
    collector: ReportCollector,
    output: Path,
    metrics: dict[str, float],
    summary: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    """``report.html`` (and its data and gallery) of an evaluation or a prediction."""
    return render_report(collector.finish(output, metrics, summary, timings), output)


def predict_images(
    predictor: SplitPredictor, data_path: str | Path, output: Path, listener: ProgressListener
) -> list[Prediction]:
    """Predict unlabeled images into ``output``: maps, pictures and ``predictions.csv``.

    The tile predictions of images that are not one of the run's splits are not kept in the run.
    """
    started = time.perf_counter()
    run, settings = predictor.context.run, predictor.settings
    source = FileSource(collect_images(data_path))
    output.mkdir(parents=True, exist_ok=True)
    record = predictor.prepare("predict", source, output / "split", workers=os.cpu_count() or 1)
    calibrations = calibrations_for(run, settings, output)
    display_range = calibrations.pixel_range(run_store(run, record.fingerprint), settings.grid)
    visualization = settings.postprocessing.visualization
    collector = ReportCollector(
        settings.grid, calibrations.image_threshold, display_range, max_side=visualization.max_side
    )
    with OutputWriter(output, settings.grid, visualization, display_range, output / "maps") as writer:
        write_merged(run, settings, record, calibrations, [writer, collector], listener)
    predictions = writer.finish()
    summary = run_summary(predictor)
    write_report(collector, output, {}, summary, {"prediction (s)": time.perf_counter() - started})
    shutil.rmtree(output / "split", ignore_errors=True)
    if record.fingerprint not in run.manifest().get("splits", {}).values():
        shutil.rmtree(run_store(run, record.fingerprint).directory, ignore_errors=True)
    listener.message(f"Predictions of {len(predictions)} images written to {output}")
    return predictions
