"""What the stages share: checks before work, tile inference of a trained run, and one results writer.

:class:`SplitPredictor` makes sure a split's tile predictions are in the run's store — reused when
stored (the test split predicted during training), otherwise decoded once and predicted by every
tile model that lacks them. :func:`write_results` merges them, applies the run's statistics and
writes every output; ``eval`` and ``predict`` both go through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from anomalib_tiled.config.checks import check_settings
from anomalib_tiled.config.format import as_yaml_value
from anomalib_tiled.data.sources import DatasetSource, FileSource
from anomalib_tiled.data.splits import SplitCache, SplitRecord, split_fingerprint
from anomalib_tiled.execution.jobs import TileContext, TileSplit
from anomalib_tiled.execution.models import ModelFactory
from anomalib_tiled.execution.planner import TilePlanner
from anomalib_tiled.execution.runners.factory import check_execution
from anomalib_tiled.merge.merging import build_merger, merged_batches
from anomalib_tiled.merge.statistics import Statistics, statistics_for
from anomalib_tiled.progress import ProgressListener, Task
from anomalib_tiled.report import ReportCollector, render_report
from anomalib_tiled.run.config import RunConfig
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.run.store import run_store
from anomalib_tiled.settings import EnsembleSettings, ImageScore, PostProcessingSettings, TileScaling
from anomalib_tiled.sinks.metrics import MetricSuite
from anomalib_tiled.sinks.outputs import OutputWriter, Prediction, Sink, stream, write_metrics
from anomalib_tiled.tiling import TilePosition


def check_environment(settings: EnsembleSettings) -> None:
    """Every check of the settings against this machine, its libraries and its runners, before any work.

    Raises:
        ConfigError: Naming the key and the fix.
    """
    check_settings(settings)
    check_execution(settings.runtime)


class SplitPredictor:
    """Makes sure every tile position has predicted a split.

    Args:
        context: Run, model factory and settings of the tile jobs.
        settings: The ensemble's settings.
        listener: Progress reporting.
        batch_size: Tiles per batch when tile models predict (default: the run's eval batch size).
    """

    def __init__(
        self,
        context: TileContext,
        trained: RunConfig,
        settings: EnsembleSettings,
        listener: ProgressListener,
        batch_size: int | None = None,
    ) -> None:
        self.context = context
        self.trained = trained
        self.settings = settings
        self.listener = listener
        self.batch_size = batch_size or trained.eval_batch_size

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

        Tiles are predicted in batches of the data module's ``eval_batch_size``, else the run's.
        """
        check_environment(settings)
        factory = ModelFactory.from_spec(trained.model_spec)
        context = TileContext(run, factory, settings.training, settings.runtime)
        return cls(context, trained, settings, listener, getattr(datamodule, "eval_batch_size", None))

    def missing(self, fingerprint: str) -> list[TilePosition]:
        """Tile positions that have not predicted the split ``fingerprint`` yet."""
        return self._planner().missing(run_store(self.context.run, fingerprint), fingerprint)

    def _planner(self) -> TilePlanner:
        return TilePlanner(self.context, self.settings.grid, self.listener)

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
                self._planner().predict(TileSplit(record, images, self.batch_size, store), missing)
            finally:
                cache.drop()
        return record


@dataclass
class Results:
    """What an evaluation or a prediction wrote into its output folder.

    Attributes:
        metrics: Metric values (empty for a prediction of unlabeled images).
        predictions: One entry per image whose map was kept (predictions keep them).
        report: ``report.html``.
    """

    metrics: dict[str, float]
    predictions: list[Prediction]
    report: Path


def write_results(
    predictor: SplitPredictor,
    record: SplitRecord,
    output: Path,
    *,
    evaluate: bool,
    timings: dict[str, float],
    timing: tuple[str, float],
    maps_dir: Path | None = None,
    statistics: Statistics | None = None,
) -> Results:
    """Merge a split's tile predictions and write every output of ``eval`` and ``predict`` into ``output``.

    Args:
        predictor: Tile inference of the run (the split's predictions are stored).
        record: The split.
        output: Output folder: ``predictions.csv``, pictures, ``report.html``; ``metrics.json``/``.csv``
            when ``evaluate``.
        evaluate: Compute and write the metrics.
        timings: Timings the report lists besides this stage's own.
        timing: Name and start (``time.perf_counter()``) of this stage, for the report.
        maps_dir: Where the merged maps are kept (``.npy``), or None.
        statistics: The run's statistics when already in memory (right after training), else from the run.
    """
    run, settings = predictor.context.run, predictor.settings
    grid, post = settings.grid, settings.postprocessing
    statistics = statistics or statistics_for(run, settings, output)
    pixel_range = statistics.pixel_range(run_store(run, record.fingerprint), grid)
    suite = MetricSuite(post.metrics.image, post.metrics.pixel if record.has_masks else [], pixel_range)
    collector = ReportCollector(grid, statistics.image_threshold, pixel_range, max_side=post.visualization.max_side)
    with OutputWriter(output, grid, post.visualization, pixel_range, maps_dir) as writer:
        sinks: list[Sink] = [suite, writer, collector] if evaluate else [writer, collector]
        batches = merged_batches(
            record,
            run_store(run, record.fingerprint).reader([p.name for p in grid]),
            build_merger(grid, post),
            statistics,
        )
        with Task(predictor.listener, "Merging and evaluating", len(record)) as task:
            stream(batches, sinks, task)
    predictions = writer.finish()
    metrics = suite.compute() if evaluate else {}
    if evaluate:
        write_metrics(metrics, output)
    name, started = timing
    summary = run_summary(predictor)
    data = collector.finish(output, metrics, summary, {**timings, name: time.perf_counter() - started})
    return Results(metrics, predictions, render_report(data, output))


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
            "tile scaling": _tile_scaling(post, settings.training.calibration_share),
        },
        "seed": settings.training.seed,
        "versions": {name: metadata.version(name) for name in ("anomalib-tiled", "anomalib", "torch", "lightning")},
    }


def _image_score(post: PostProcessingSettings) -> str:
    name = as_yaml_value(post.merge.image_score)
    return f"{name} (top {post.merge.top_k:.2%} of pixels)" if post.merge.image_score == ImageScore.TOPK_MAP else name


def _tile_scaling(post: PostProcessingSettings, share: float) -> str:
    name = as_yaml_value(post.merge.tile_scaling)
    return name if post.merge.tile_scaling == TileScaling.NONE else f"{name} ({share:.0%} of training images held out)"
