"""Training stage: check everything, decode the splits once, fit every tile, learn the statistics.

:meth:`TrainingPlan.prepare` runs every check that can fail before any work (settings against this
machine, the model's init args, the splits the settings need); :meth:`TrainingPlan.run` then does
the work inside a run directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_tiled.config.checks import check_metric_inputs, check_training_splits
from anomalib_tiled.config.components import fresh_callbacks, fresh_loggers, monitored_metrics
from anomalib_tiled.config.format import object_spec
from anomalib_tiled.data.sources import DatasetSource
from anomalib_tiled.data.splits import (
    SplitCache,
    SplitRecord,
    batch_size,
    calibration_indices,
    decode_workers,
    link_split,
    setup_splits,
    split_fingerprint,
)
from anomalib_tiled.execution.jobs import PhaseClock, TileContext, TileSplit, release
from anomalib_tiled.execution.models import ModelFactory
from anomalib_tiled.execution.planner import TilePlanner
from anomalib_tiled.merge.statistics import Statistics, StatisticsPolicy
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.run.config import RunConfig
from anomalib_tiled.run.directory import RunDirectory, atomic_write_text
from anomalib_tiled.run.log import RunLog
from anomalib_tiled.run.session import RunSession, create_run, resume_run
from anomalib_tiled.run.store import PredictionStore, run_store
from anomalib_tiled.settings import EnsembleSettings
from anomalib_tiled.stages.common import SplitPredictor, check_environment

logger = logging.getLogger(__name__)


@dataclass
class Trained:
    """What fitting hands to the test stage of the same command, so that nothing is set up or read again.

    Attributes:
        predictor: Tile inference of the run just trained (its model factory and config, no check again).
        test: The test split, every tile's predictions stored (None when it was not predicted).
        statistics: The statistics just learned (what ``stats.json`` holds).
    """

    predictor: SplitPredictor
    test: SplitRecord | None
    statistics: Statistics


@dataclass
class TrainingPlan:
    """Everything a training needs, checked.

    Attributes:
        settings: The ensemble's settings.
        factory: Builds the tile models.
        splits: The data module's non-empty splits (``train``, ``val``, ``test``).
        monitored: Metrics the callbacks monitor.
        datamodule: The data module (batch sizes, augmentations, workers).
        evaluate: Whether the test split is predicted right after each tile is fitted.
        held_out: Indices of the training images held out of fitting (the ``calibration`` split).
    """

    settings: EnsembleSettings
    factory: ModelFactory
    splits: dict[str, Any]
    monitored: list[str]
    datamodule: Any
    evaluate: bool
    held_out: list[int]

    @classmethod
    def prepare(
        cls, settings: EnsembleSettings, factory: ModelFactory, datamodule: Any, *, evaluate: bool
    ) -> TrainingPlan:
        """Check the settings, the data and the model before any work.

        Raises:
            ConfigError: On invalid settings or model init args.
            DataError: On data that cannot be used.
        """
        check_environment(settings)
        trainer = settings.training.trainer
        fresh_loggers(trainer, str(settings.runtime.default_root_dir))  # fails fast on a bad logger spec
        monitored = monitored_metrics(fresh_callbacks(trainer))
        splits = setup_splits(datamodule, settings.training.seed)
        check_training_splits(settings.postprocessing, splits, monitored, evaluate=evaluate)
        held_out = calibration_indices(
            len(splits["train"]), settings.training.calibration_share, settings.training.seed
        )
        if evaluate:
            check_metric_inputs(DatasetSource(splits["test"]).labels, settings.postprocessing.metrics)
        # Fail on init args the model rejects (unknown backbone, missing weights...) before any work.
        factory.build(settings.grid.tile_size, monitored)
        release()
        return cls(settings, factory, splits, monitored, datamodule, evaluate, held_out)

    def run(self, run: RunDirectory, config: RunConfig, session: RunSession, listener: ProgressListener) -> Trained:
        """Decode the splits, fit every tile, learn and save the statistics, mark the run trained."""
        settings = self.settings
        logger.info(
            "Training %s on %d tile positions (%s), splits: %s.",
            self.factory.name,
            len(settings.grid),
            settings.grid,
            {name: len(dataset) for name, dataset in self.splits.items()},
        )
        stages = PhaseClock()
        cache = SplitCache(run, settings.grid.image_size, listener)
        splits = self._decode(run, cache)
        stages.lap("decode")
        context = TileContext(run, self.factory, settings.training, settings.runtime)
        val, test, normal = splits.get("val"), splits.get("test"), splits.get("calibration")
        if val is not None and test is not None and test.record.fingerprint == val.record.fingerprint:
            test = None  # validation predictions are the test predictions
        predicted = [split for split in (test, normal) if split is not None]
        TilePlanner(context, settings.grid, listener).fit(splits["train"], val, predicted, self.monitored)
        stages.lap("tiles")
        policy = StatisticsPolicy(settings.grid, settings.postprocessing)
        stats = policy.learn(
            val.record if val else None, val.store if val else None, _recorded(normal), seed=settings.training.seed
        )
        logger.info(
            "Statistics learned on validation: %s", json.dumps({"tile": stats["tile"], "image": stats["image"]})
        )
        atomic_write_text(run.stats_path, json.dumps(stats, indent=2) + "\n")
        cache.drop()
        stages.lap("statistics")
        session.trained({name: split.record.fingerprint for name, split in splits.items()}, stages.seconds)
        tested = splits.get("test")
        statistics = Statistics.from_stats(stats, settings.postprocessing)
        predictor = SplitPredictor(context, config, settings, listener, batch_size(self.datamodule, "eval"))
        return Trained(predictor, tested.record if tested else None, statistics)

    def _decode(self, run: RunDirectory, cache: SplitCache) -> dict[str, TileSplit]:
        """Each split decoded once; the test split shares validation's when they hold the same images."""
        workers = decode_workers(self.datamodule)
        train_batch, eval_batch = batch_size(self.datamodule, "train"), batch_size(self.datamodule, "eval")
        sources = {name: DatasetSource(dataset) for name, dataset in self.splits.items()}
        if not self.evaluate:
            sources.pop("test", None)
        if self.held_out:
            # Normal images the tile models never fit on, to measure each model's normal variation.
            kept = sorted(set(range(len(sources["train"]))) - set(self.held_out))
            sources["calibration"] = sources["train"].subset(self.held_out)
            sources["train"] = sources["train"].subset(kept)
        splits: dict[str, TileSplit] = {}
        for name in ("train", "calibration", "val", "test"):
            if name not in sources:
                continue
            source = sources[name]
            val = splits.get("val")
            if name == "test" and val is not None and val.record.fingerprint == _fingerprint(source):
                record = link_split(val.record, run.split_dir(name))
                splits[name] = TileSplit(record, val.images, eval_batch, val.store)
                continue
            record, images = cache.decode(name, source, run.split_dir(name), workers)
            assert images is not None
            if name == "train":
                augmentations = getattr(self.datamodule, "train_augmentations", None)
                splits[name] = TileSplit(record, images, train_batch, augmentations=augmentations)
            else:
                splits[name] = TileSplit(record, images, eval_batch, run_store(run, record.fingerprint))
        return splits


def _recorded(split: TileSplit | None) -> tuple[SplitRecord, PredictionStore] | None:
    return None if split is None or split.store is None else (split.record, split.store)


def _fingerprint(source: DatasetSource) -> str:
    return split_fingerprint(source.image_paths, source.labels)


def fit_run(
    settings: EnsembleSettings,
    model: Any,
    datamodule: Any,
    resume: str | Path | None,
    data_spec: dict | None,
    listener: ProgressListener,
    *,
    evaluate: bool,
) -> Trained:
    """Check everything, then train a new run (or finish the interrupted run ``resume``).

    Args:
        settings: The ensemble's settings.
        model: An anomalib model, class, name or class spec.
        datamodule: Any anomalib image data module.
        resume: Run directory of an interrupted run, or None for a new one.
        data_spec: The data module's class spec for the run's config (default: read off the instance).
        listener: Progress reporting.
        evaluate: Whether the test split is predicted while each tile model is in memory.
    """
    factory = ModelFactory.from_spec(model)
    plan = TrainingPlan.prepare(settings, factory, datamodule, evaluate=evaluate)
    config = RunConfig(settings, factory.spec, data_spec or object_spec(datamodule))
    run = resume_run(resume, config) if resume is not None else create_run(config, datamodule)
    listener.message(f"Run directory: {run.root}")
    session = RunSession(run, len(settings.grid))
    with RunLog(run.log_path), session.training():
        return plan.run(run, config, session, listener)
