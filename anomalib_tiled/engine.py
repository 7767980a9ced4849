"""Engine API of the tiled ensemble, mirroring ``anomalib.engine.Engine``.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.models import Padim
    >>> from anomalib_tiled import TiledEnsembleEngine
    >>> engine = TiledEnsembleEngine(image_size=(1024, 1024), tile_size=256, stride=128,
    ...                              seam_smoothing=True, normalization_stage="image")
    >>> engine.fit(model=Padim(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> results = engine.test(datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> predictions = engine.predict(data_path="images/")  # doctest: +SKIP

The engine only orchestrates; each stage lives in its own module and data flows one way:
``data`` (decode once) -> ``training`` (one model per tile) -> ``store`` (tile predictions on disk)
-> ``merging`` + ``smoothing`` -> ``postprocessing`` (normalise, threshold) -> ``metrics`` and
``visualization``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from anomalib_tiled import config as config_module
from anomalib_tiled.config import (
    EnsembleSettings,
    MergeConfig,
    MetricsConfig,
    NormalizationStage,
    SeamSmoothingConfig,
    ThresholdingConfig,
    ThresholdStage,
    VisualizationConfig,
)
from anomalib_tiled.data import (
    DatasetSource,
    FileSource,
    NpyFile,
    SplitRecord,
    TileDataset,
    cache_split,
    collect_images,
    datamodule_spec,
    setup_splits,
    split_fingerprint,
    tile_loader,
)
from anomalib_tiled.errors import ConfigError, DataError, RunDirectoryError, RunInterruptedError
from anomalib_tiled.merging import MergedBatch, TileMerger, TilePredictions
from anomalib_tiled.metrics import MetricSuite, format_table, write_metrics
from anomalib_tiled.postprocessing import Calibration, CalibrationEstimator, apply_to_tiles
from anomalib_tiled.run import RunDirectory, RunStatus, atomic_path, atomic_write_text, file_digest
from anomalib_tiled.smoothing import SeamSmoother
from anomalib_tiled.store import PredictionStore, TilePredictionWriter
from anomalib_tiled.tiling import TileGrid, TilePosition
from anomalib_tiled.training import (
    ModelFactory,
    TileCheckpoint,
    TileEngine,
    fit_tile,
    fresh_callbacks,
    fresh_loggers,
    monitored_metrics,
    predict_tile,
    release,
    seed_tile,
    trainer_arguments,
)
from anomalib_tiled.visualization import ResultPicture, ResultVisualizer, output_name

logger = logging.getLogger(__name__)

MERGE_BATCH = 4
"""Images merged together: enough to vectorise, few enough to keep memory flat."""


@dataclass
class Prediction:
    """Merged prediction of one image written by :meth:`TiledEnsembleEngine.predict`.

    Attributes:
        image_path: Source image.
        pred_score: Image anomaly score.
        pred_label: Predicted label (True = anomalous), or None without thresholds.
        anomaly_map_path: ``.npy`` file with the full-resolution anomaly map.
        image_file: Result picture, or None when visualisation is off.
    """

    image_path: str
    pred_score: float
    pred_label: bool | None
    anomaly_map_path: Path
    image_file: Path | None

    @property
    def anomaly_map(self) -> np.ndarray:
        """The anomaly map (loaded on access, so many predictions do not fill RAM)."""
        return np.load(self.anomaly_map_path)


class TiledEnsembleEngine:
    """Train, evaluate and apply a tiled ensemble of anomalib models.

    Args:
        image_size: Size images are resized to before tiling, ``n`` or ``(h, w)``.
        tile_size: Tile size, ``n`` or ``(h, w)``.
        stride: Step between tiles; defaults to ``tile_size`` (no overlap).
        seed: Seed of data splits and models.
        accelerator: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``mps``.
        default_root_dir: Results root; runs go to ``<root>/<Model>/<Dataset>/<category>/vN``.
        normalization_stage: ``image``, ``tile`` or ``none``.
        thresholding: Threshold method (``F1AdaptiveThreshold``, ``{class_path, init_args}``...) or a
            :class:`~anomalib_tiled.config.ThresholdingConfig`.
        threshold_stage: ``image`` or ``tile`` (ignored when ``thresholding`` is a ThresholdingConfig).
        seam_smoothing: ``True``/``False`` or a :class:`~anomalib_tiled.config.SeamSmoothingConfig`.
        blending: ``mean``, ``hann`` or ``gaussian``.
        image_score: ``max_map``, ``mean_tiles`` or ``max_tiles``.
        image_metrics: Image metric names or specs (default ``AUROC``, ``F1Score``).
        pixel_metrics: Pixel metric names or specs (default ``AUROC``, ``F1Score``).
        visualization: Result-image settings.
        callbacks: Lightning callbacks for every tile model (copied per tile).
        **trainer_kwargs: Lightning Trainer arguments for every tile model (``max_epochs``...).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        tile_size: int | Sequence[int] = 256,
        stride: int | Sequence[int] | None = None,
        *,
        seed: int = 42,
        accelerator: str = "auto",
        default_root_dir: str | Path = "results",
        normalization_stage: str | NormalizationStage = NormalizationStage.IMAGE,
        thresholding: str | dict | ThresholdingConfig = "F1AdaptiveThreshold",
        threshold_stage: str | ThresholdStage = ThresholdStage.IMAGE,
        seam_smoothing: bool | SeamSmoothingConfig = False,
        blending: str = "mean",
        image_score: str = "max_map",
        image_metrics: Sequence[str | dict] | None = None,
        pixel_metrics: Sequence[str | dict] | None = None,
        visualization: VisualizationConfig | None = None,
        callbacks: list[Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(thresholding, ThresholdingConfig):
            thresholding = ThresholdingConfig(method=thresholding, stage=threshold_stage)
        if not isinstance(seam_smoothing, SeamSmoothingConfig):
            seam_smoothing = SeamSmoothingConfig(apply=bool(seam_smoothing))
        defaults = MetricsConfig()
        trainer = dict(trainer_kwargs)
        if callbacks:
            trainer["callbacks"] = list(callbacks)
        try:
            grid = TileGrid.create(image_size, tile_size, stride)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        config_module.check_trainer(trainer)
        settings = EnsembleSettings(
            grid=grid,
            seed=seed,
            accelerator=accelerator,
            default_root_dir=Path(default_root_dir),
            normalization_stage=normalization_stage,
            thresholding=thresholding,
            seam_smoothing=seam_smoothing,
            merge=MergeConfig(blending=blending, image_score=image_score),
            metrics=MetricsConfig(
                image=defaults.image if image_metrics is None else list(image_metrics),
                pixel=defaults.pixel if pixel_metrics is None else list(pixel_metrics),
            ),
            trainer=trainer,
            visualization=visualization or VisualizationConfig(),
        )
        self._init(settings)

    def _init(self, settings: EnsembleSettings) -> None:
        self.settings = settings
        self.run: RunDirectory | None = None
        self.factory: ModelFactory | None = None
        self.datamodule: Any = None
        self.console = Console(stderr=True)
        self._interrupt_requested = threading.Event()

    @classmethod
    def from_settings(cls, settings: EnsembleSettings) -> TiledEnsembleEngine:
        """Engine from already-resolved settings (the CLI's path)."""
        engine = cls.__new__(cls)
        engine._init(settings)  # noqa: SLF001 - the constructor's second half, shared
        return engine

    @classmethod
    def from_run(cls, root: str | Path, settings: EnsembleSettings | None = None) -> TiledEnsembleEngine:
        """Engine for a trained run: its own settings, or ``settings`` checked against the run's.

        Raises:
            RunDirectoryError: If ``root`` is not a finished run.
            ConfigError: If ``settings`` change what the run was trained with (tiling, seed, blending).
        """
        run = RunDirectory.open(root)
        run_settings, model_spec = _trained_with(run, settings, "settings")
        engine = cls.from_settings(settings or run_settings)
        engine.run = run
        engine.factory = ModelFactory.from_spec(model_spec)
        return engine

    # ----------------------------------------------------------------------------------------------
    # fit

    @property
    def grid(self) -> TileGrid:
        """The tile grid."""
        return self.settings.grid

    def fit(
        self,
        model: Any,
        datamodule: Any,
        *,
        resume: str | Path | None = None,
        data_spec: dict | None = None,
    ) -> RunDirectory:
        """Train one model per tile position and learn normalisation/threshold statistics.

        Args:
            model: Model template: an ``AnomalibModule`` instance (its class and hyper-parameters are
                used), a model class, a name (``"Padim"``) or ``{class_path, init_args}``.
            datamodule: Any anomalib image data module.
            resume: Run directory of an interrupted run: finished, verified tiles are kept.
            data_spec: ``{class_path, init_args}`` of the data module for the run's config (the CLI
                passes the one it parsed); derived from the instance when omitted.

        Returns:
            The run directory.
        """
        return self._train(model, datamodule, resume=resume, data_spec=data_spec, evaluate=False)

    def train(
        self,
        model: Any,
        datamodule: Any,
        *,
        resume: str | Path | None = None,
        data_spec: dict | None = None,
    ) -> list[dict[str, float]]:
        """Fit, then test on the data module's test split (like ``Engine.train``).

        Test tiles are predicted right after each tile model is fitted, while it is still in memory.

        Returns:
            ``[metrics]`` as :meth:`test` returns them.
        """
        self._train(model, datamodule, resume=resume, data_spec=data_spec, evaluate=True)
        return self.test(datamodule=datamodule)

    def _train(
        self, model: Any, datamodule: Any, *, resume: Any, data_spec: dict | None, evaluate: bool
    ) -> RunDirectory:
        self.factory = ModelFactory.from_spec(model)
        callbacks = fresh_callbacks(self.settings.trainer)
        fresh_loggers(self.settings.trainer, self.settings.default_root_dir)  # fails fast on a bad logger spec
        monitored = monitored_metrics(callbacks)
        splits = setup_splits(datamodule, self.settings.seed)
        self.datamodule = datamodule
        if self.settings.needs_validation_split and "val" not in splits:
            msg = (
                "data.init_args.val_split_mode: the data has no validation split, but "
                f"normalization_stage '{self.settings.normalization_stage.value}' and thresholding.method "
                f"{self.settings.thresholding.method!r} learn from validation predictions; set val_split_mode to "
                "same_as_test, from_test or from_train, or use normalization_stage: none with ManualThreshold"
            )
            raise ConfigError(msg)
        if monitored and "val" not in splits:
            msg = (
                f"TrainModels.trainer.callbacks: {monitored} are validation metrics but the data has no "
                "validation split; set data.init_args.val_split_mode"
            )
            raise ConfigError(msg)
        if evaluate and "test" not in splits:
            msg = (
                "data: the data module has no test split to evaluate on; "
                "check test_split_mode or train with --evaluate false"
            )
            raise DataError(msg)
        if evaluate:
            _check_metric_inputs(DatasetSource(splits["test"]).labels, self.settings.metrics)
        # Fail on init args the model rejects (unknown backbone, missing weights...) before any work.
        self.factory.build(self.grid.tile_size, monitored)
        release()

        if resume is not None:
            self.run = RunDirectory.open(resume, require_trained=False, option="--resume")
            self._check_resume_settings()
            self.run.update_manifest(status=RunStatus.TRAINING)
        else:
            self.run = RunDirectory.create(
                self.settings.default_root_dir,
                self.factory.name,
                getattr(datamodule, "name", type(datamodule).__name__),
                getattr(datamodule, "category", "") or "",
            )
            config = config_module.settings_to_config(
                self.settings,
                self.factory.spec,
                data_spec or datamodule_spec(datamodule),
            )
            atomic_write_text(self.run.config_path, config_module.dump_config(config))
        self.console.print(f"Run directory: {self.run.root}")
        with self._run_log(), self._interruptible():
            logger.info(
                "Training %s on %d tile positions (%s), splits: %s.",
                self.factory.name,
                len(self.grid),
                self.grid,
                {name: len(dataset) for name, dataset in splits.items()},
            )
            try:
                records, caches = self._cache_splits(splits, with_test=evaluate)
                self._train_tiles(records, caches, monitored, datamodule)
                stats = self._calibrate(records.get("val"))
                logger.info(
                    "Statistics learned on validation: %s", json.dumps({"tile": stats["tile"], "image": stats["image"]})
                )
                atomic_write_text(self.run.stats_path, json.dumps(stats, indent=2) + "\n")
                self._drop_caches()
                self.run.update_manifest(
                    status=RunStatus.TRAINED,
                    splits={name: record.fingerprint for name, record in records.items()},
                )
            except (KeyboardInterrupt, SystemExit) as interrupt:
                raise self._interrupted("interrupted") from interrupt
            except BaseException as error:
                # Lightning stops a fit on SIGTERM with its own exception type.
                if type(error).__name__ == "SIGTERMException":
                    raise self._interrupted("stopped by SIGTERM") from error
                self.run.update_manifest(status=RunStatus.FAILED)
                raise
        return self.run

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Turn SIGINT and SIGTERM into KeyboardInterrupt, and remember them.

        An interrupt that lands in a ``__del__`` (garbage collection of a finished tile) is swallowed
        by Python; the remembered request is raised again at the next tile boundary.
        """
        self._interrupt_requested = threading.Event()
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum: int, frame: object) -> None:
            del signum, frame
            self._interrupt_requested.set()
            raise KeyboardInterrupt

        previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _raise_if_interrupted(self) -> None:
        if self._interrupt_requested.is_set():
            raise KeyboardInterrupt

    def _interrupted(self, how: str) -> RunInterruptedError:
        assert self.run is not None
        self.run.update_manifest(status=RunStatus.INTERRUPTED)
        done = len(self.run.manifest()["tiles"])
        return RunInterruptedError(
            f"training {how}; {done} of {len(self.grid)} tiles are saved in {self.run.root}; "
            f"resume with 'anomalib tiled train --resume {self.run.root}'",
        )

    def _check_resume_settings(self) -> None:
        assert self.run is not None
        _, model_spec = _trained_with(self.run, self.settings, "--resume")
        assert self.factory is not None
        if ModelFactory.from_spec(model_spec).name != self.factory.name:
            msg = f"--resume: the run trains {ModelFactory.from_spec(model_spec).name}, not {self.factory.name}"
            raise ConfigError(msg)

    def _cache_splits(
        self, splits: dict[str, Any], *, with_test: bool
    ) -> tuple[dict[str, SplitRecord], dict[str, NpyFile]]:
        """Decode each split once; the test split shares the validation cache when they are the same images."""
        assert self.run is not None
        records: dict[str, SplitRecord] = {}
        caches: dict[str, NpyFile] = {}
        workers = self._workers(self.datamodule)
        wanted = [name for name in ("train", "val", "test") if name in splits and (name != "test" or with_test)]
        for name in wanted:
            source = DatasetSource(splits[name])
            same_as_val = "val" in records and records["val"].fingerprint == split_fingerprint(
                source.image_paths, source.labels
            )
            if name == "test" and same_as_val:
                records[name] = _link_split(records["val"], self.run.split_dir(name))
                caches[name] = caches["val"]
                continue
            cache_file = self.run.root / "cache" / f"{name}.images.npy"
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with self._progress() as progress:
                task = progress.add_task(f"Decoding {name} images", total=len(source))
                records[name] = cache_split(
                    source,
                    self.grid.image_size,
                    self.run.split_dir(name),
                    cache_file,
                    workers,
                    with_masks=name != "train",
                    progress=lambda done, task=task: progress.update(task, completed=done),
                )
            caches[name] = NpyFile(cache_file)
            logger.info("%s split: %d images decoded once into %s.", name, len(records[name]), cache_file)
        return records, caches

    def _drop_caches(self) -> None:
        assert self.run is not None
        shutil.rmtree(self.run.root / "cache", ignore_errors=True)

    def _train_tiles(
        self,
        records: dict[str, SplitRecord],
        caches: dict[str, NpyFile],
        monitored: list[str],
        datamodule: Any,
    ) -> None:
        assert self.run is not None
        train_batch = getattr(datamodule, "train_batch_size", 32)
        eval_batch = getattr(datamodule, "eval_batch_size", 32)
        augmentations = getattr(datamodule, "train_augmentations", None)
        stores = {name: self._store(record.fingerprint) for name, record in records.items()}
        with self._progress() as progress:
            task = progress.add_task("Training tile models", total=len(self.grid))
            for position in self.grid:
                progress.update(task, description=f"Training {position.name}")
                if self._tile_is_done(position, records, stores):
                    logger.info("%s: checkpoint and predictions verified, skipping.", position.name)
                else:
                    self._train_tile(
                        position, records, caches, stores, monitored, train_batch, eval_batch, augmentations
                    )
                    # The tile's model and trainer are unreachable now; return their memory before the next tile.
                    release()
                progress.advance(task)
                self._raise_if_interrupted()

    def _tile_is_done(
        self, position: TilePosition, records: dict[str, SplitRecord], stores: dict[str, PredictionStore]
    ) -> bool:
        assert self.run is not None
        if self.run.verified_tile(position.name) is None:
            return False
        return all(
            stores[name].is_complete(position.name, record.fingerprint)
            for name, record in records.items()
            if name != "train"
        )

    def _train_tile(
        self,
        position: TilePosition,
        records: dict[str, SplitRecord],
        caches: dict[str, NpyFile],
        stores: dict[str, PredictionStore],
        monitored: list[str],
        train_batch: int,
        eval_batch: int,
        augmentations: Any,
    ) -> None:
        assert self.run is not None
        assert self.factory is not None
        started = time.perf_counter()
        seed = self.settings.seed
        seed_tile(seed, position.index)
        model = self.factory.build((position.height, position.width), monitored)
        loaders = {
            name: tile_loader(
                TileDataset(caches[name], record, position, augmentations if name == "train" else None),
                train_batch if name == "train" else eval_batch,
                shuffle=name == "train",
                seed=seed,
            )
            for name, record in records.items()
        }
        writers = {}
        if "val" in records:
            writers["val"] = TilePredictionWriter(
                stores["val"], position, len(records["val"]), records["val"].fingerprint, "validate"
            )
        needs_test = (
            "test" in records and records["test"].fingerprint != records.get("val", records["test"]).fingerprint
        )
        if "test" in records and "val" not in records:
            needs_test = True
        if needs_test:
            writers["test"] = TilePredictionWriter(
                stores["test"], position, len(records["test"]), records["test"].fingerprint, "predict"
            )
        checkpoint = TileCheckpoint(self.run.checkpoint_path(position.name))
        tile_dir = self.run.root / "tiles" / position.name
        engine = fit_tile(
            model,
            tile_dir,
            loaders["train"],
            loaders.get("val"),
            [*fresh_callbacks(self.settings.trainer), checkpoint, *writers.values()],
            trainer_arguments(self.settings.trainer, self.settings.accelerator, tile_dir),
        )
        checkpoint.save_final(engine.trainer)
        val_writer = writers.get("val")
        if val_writer is not None and val_writer.last_written_step != engine.trainer.global_step:
            # The last validation ran before the final weights (val_check_interval / check_val_every_n_epoch).
            engine.validate(model=model, dataloaders=loaders["val"], verbose=False)
        if "test" in writers:
            predict_tile(engine, model, loaders["test"])
        self.run.record_tile(position.name, {"checkpoint": file_digest(checkpoint.path)})
        logger.info(
            "%s trained in %.1f s (%d training tiles, checkpoint %.1f MB).",
            position.name,
            time.perf_counter() - started,
            len(records["train"]),
            checkpoint.path.stat().st_size / 2**20,
        )

    def _store(self, fingerprint: str) -> PredictionStore:
        """Tile predictions are stored by split content, so identical splits (test = val) share them."""
        assert self.run is not None
        return PredictionStore(self.run.root / "predictions" / fingerprint)

    # ----------------------------------------------------------------------------------------------
    # calibration

    def _calibrate(self, record: SplitRecord | None) -> dict[str, Any]:
        """Normalisation/threshold statistics of the current settings, learned from validation predictions.

        Without a validation split (``record`` None) only a fixed threshold (ManualThreshold) can be
        set; configuration checks guarantee nothing else is asked for then.
        """
        settings = self.settings
        store = self._store(record.fingerprint) if record is not None else None
        method = settings.thresholding.method
        tile_stage = settings.thresholding.stage == ThresholdStage.TILE
        stats: dict[str, Any] = {
            "key": _calibration_key(settings),
            "split": None if record is None else record.fingerprint,
            "tile": None,
            "image": None,
        }
        if settings.normalization_stage == NormalizationStage.TILE or tile_stage:
            tiles = []
            for position in self.grid:
                estimator = CalibrationEstimator(
                    method if tile_stage else None,
                    settings.normalization_stage == NormalizationStage.TILE,
                    store.value_range([position.name]) if store is not None else (0.0, 1.0),
                )
                if store is not None and record is not None:
                    for batch in _tile_batches(store, record, position):
                        estimator.update(batch)
                tiles.append(estimator.compute().to_dict())
            stats["tile"] = tiles
        image_norm = settings.normalization_stage == NormalizationStage.IMAGE
        if image_norm or not tile_stage:
            pixel_range = (0.0, 1.0)
            if store is not None and settings.normalization_stage != NormalizationStage.TILE:
                pixel_range = store.value_range([p.name for p in self.grid])
            estimator = CalibrationEstimator(None if tile_stage else method, image_norm, pixel_range)
            if record is not None:
                for batch in self._merged(record, _tile_calibrations(stats), None):
                    estimator.update(batch)
            stats["image"] = estimator.compute().to_dict()
        return stats

    def _stats(self, output: Path | None) -> dict[str, Any]:
        """Statistics for the current settings.

        The run's own, or learned again from its validation predictions when post-processing settings
        changed (then saved in ``output``, never in the run).
        """
        assert self.run is not None
        has_val = "val" in self.run.manifest().get("splits", {})
        record = SplitRecord.load(self.run.split_dir("val")) if has_val else None
        stats = json.loads(self.run.stats_path.read_text(encoding="utf-8"))
        if stats.get("key") == _calibration_key(self.settings) and stats.get("split") == (
            record and record.fingerprint
        ):
            return stats
        if record is None and self.settings.needs_validation_split:
            msg = (
                "normalization_stage/thresholding: the run has no validation split to learn them from; "
                "use normalization_stage: none with a ManualThreshold"
            )
            raise ConfigError(msg)
        stats = self._calibrate(record)
        if output is not None:
            atomic_write_text(output / "stats.json", json.dumps(stats, indent=2) + "\n")
        return stats

    # ----------------------------------------------------------------------------------------------
    # merged predictions

    def _merger(self) -> TileMerger:
        smoothing = self.settings.seam_smoothing
        smoother = SeamSmoother(self.grid, smoothing.sigma, smoothing.width) if smoothing.apply else None
        return TileMerger(self.grid, self.settings.merge.blending, self.settings.merge.image_score, smoother)

    def _merged(
        self,
        record: SplitRecord,
        tile_calibrations: list[Calibration] | None,
        image_calibration: Calibration | None,
    ) -> Iterator[MergedBatch]:
        """Merged, calibrated predictions of a split, a few images at a time, with ground truth."""
        settings = self.settings
        reader = self._store(record.fingerprint).reader([p.name for p in self.grid])
        masks = record.masks
        merger = self._merger()
        tile_threshold = settings.thresholding.stage == ThresholdStage.TILE and tile_calibrations is not None
        for start in range(0, len(record), MERGE_BATCH):
            indices = range(start, min(start + MERGE_BATCH, len(record)))
            raw = [reader.read(i) for i in indices]
            maps = torch.stack([m for m, _ in raw])
            scores = torch.stack([s for _, s in raw])
            tiles = TilePredictions(maps, scores)
            if tile_calibrations is not None:
                tiles = TilePredictions(*apply_to_tiles(tile_calibrations, maps, scores, threshold=tile_threshold))
            batch = merger.merge(tiles, [record.image_paths[i] for i in indices])
            if image_calibration is not None:
                image_calibration.apply(batch, threshold=settings.thresholding.stage == ThresholdStage.IMAGE)
            labels = torch.tensor([record.labels[i] for i in indices])
            if bool((labels >= 0).all()):
                batch.gt_label = labels.bool()
            if masks is not None and bool((labels >= 0).all()):
                batch.gt_mask = torch.from_numpy(masks.read(start, len(indices)).copy()).bool()
            yield batch

    def _calibrations(self, output: Path | None) -> tuple[list[Calibration] | None, Calibration | None]:
        stats = self._stats(output)
        image = Calibration.from_dict(stats["image"]) if stats.get("image") else None
        return _tile_calibrations(stats), image

    # ----------------------------------------------------------------------------------------------
    # test

    def test(self, datamodule: Any = None) -> list[dict[str, float]]:
        """Evaluate the trained ensemble on a test split.

        Tile predictions already stored for this split (e.g. by :meth:`train`) are reused; otherwise
        every tile checkpoint is loaded in turn to predict it. Results go to a new ``eval/vN`` folder
        of the run: ``metrics.json``, ``metrics.csv``, ``predictions.csv`` and ``images/``.

        Args:
            datamodule: Data module whose test split is evaluated; defaults to the one used by
                :meth:`fit`, else the run's recorded test split.

        Returns:
            ``[{metric name: value}]``, like ``Engine.test``.
        """
        run = self._require_run()
        record = self._test_split(datamodule)
        output = run.new_output_dir("eval")
        with self._run_log():
            tile_calibrations, image_calibration = self._calibrations(output)
            pixel_range = self._pixel_range(record, tile_calibrations, image_calibration)
            suite = MetricSuite(
                self.settings.metrics.image, self.settings.metrics.pixel if record.has_masks else [], pixel_range
            )
            self._write_outputs(record, output, tile_calibrations, image_calibration, pixel_range, suite)
            results = suite.compute()
            write_metrics(results, output)
            logger.info("Evaluation of %d images written to %s: %s", len(record), output, results)
        manifest = run.manifest()
        manifest.setdefault("evaluations", []).append({"dir": str(output.relative_to(run.root)), "metrics": results})
        run.write_manifest(manifest)
        self.console.print(format_table(results, "Tiled ensemble"))
        self.console.print(f"Evaluation written to {output}")
        return [results]

    def _test_split(self, datamodule: Any) -> SplitRecord:
        """The test split to evaluate, with every tile predicted.

        Without a data module the run's recorded test split is used as long as its predictions are
        stored; otherwise the data module (given, used by :meth:`fit`, or built from the run's config)
        is set up again with the run's seed.
        """
        run = self._require_run()
        recorded = run.split_dir("test")
        if datamodule is None and self.datamodule is None and (recorded / "index.json").is_file():
            record = SplitRecord.load(recorded)
            if self._missing_tiles(record.fingerprint) == []:
                _check_metric_inputs(record.labels, self.settings.metrics)
                return record
        datamodule = datamodule or self.datamodule
        if datamodule is None:
            _, _, data_spec = config_module.load_run_config(run)
            datamodule = config_module.instantiate_datamodule(data_spec)
        splits = setup_splits(datamodule, self.settings.seed)
        if "test" not in splits:
            msg = "data: the data module has no test split; check data.init_args.test_split_mode"
            raise DataError(msg)
        source = DatasetSource(splits["test"])
        _check_metric_inputs(source.labels, self.settings.metrics)
        fingerprint = split_fingerprint(source.image_paths, source.labels)
        directory = (
            recorded
            if self._recorded_fingerprint(recorded) in (None, fingerprint)
            else run.root / "splits" / fingerprint
        )
        return self._prepare_split(source, directory, workers=self._workers(datamodule))

    def _recorded_fingerprint(self, directory: Path) -> str | None:
        return SplitRecord.load(directory).fingerprint if (directory / "index.json").is_file() else None

    def _missing_tiles(self, fingerprint: str) -> list[TilePosition]:
        store = self._store(fingerprint)
        return [position for position in self.grid if not store.is_complete(position.name, fingerprint)]

    def _prepare_split(self, source: DatasetSource | FileSource, directory: Path, workers: int = 0) -> SplitRecord:
        """Record of a split with every tile predicted.

        Stored predictions are reused; missing ones come from one decode of the images and one
        checkpoint at a time.
        """
        run = self._require_run()
        assert self.factory is not None
        fingerprint = split_fingerprint(source.image_paths, source.labels)
        missing = self._missing_tiles(fingerprint)
        if not missing:
            if self._recorded_fingerprint(directory) == fingerprint:
                return SplitRecord.load(directory)
            # Same images recorded under another split (test = validation): no need to decode again.
            for recorded in sorted((run.root / "splits").iterdir()):
                if recorded != directory and self._recorded_fingerprint(recorded) == fingerprint:
                    return _link_split(SplitRecord.load(recorded), directory)
        cache_file = run.root / "cache" / f"{fingerprint}.images.npy" if missing else None
        with self._progress() as progress:
            task = progress.add_task("Decoding images", total=len(source))
            record = cache_split(
                source,
                self.grid.image_size,
                directory,
                cache_file,
                workers,
                progress=lambda done: progress.update(task, completed=done),
            )
        if not missing:
            return record
        assert cache_file is not None
        store = self._store(fingerprint)
        images = NpyFile(cache_file)
        try:
            with self._progress() as progress:
                task = progress.add_task("Predicting tiles", total=len(missing))
                for position in missing:
                    checkpoint = run.verify_checkpoint(position.name)
                    model = self.factory.load(checkpoint)
                    writer = TilePredictionWriter(store, position, len(record), fingerprint, "predict")
                    tile_dir = run.root / "tiles" / position.name
                    engine = TileEngine(
                        callbacks=[writer],
                        default_root_dir=tile_dir,
                        **trainer_arguments({}, self.settings.accelerator, tile_dir),
                    )
                    loader = tile_loader(
                        TileDataset(images, record, position), 32, shuffle=False, seed=self.settings.seed
                    )
                    predict_tile(engine, model, loader)
                    del model, engine, loader
                    release()
                    progress.advance(task)
        finally:
            shutil.rmtree(run.root / "cache", ignore_errors=True)
        return record

    def _workers(self, datamodule: Any) -> int:
        return min(getattr(datamodule, "num_workers", 0) or 0, os.cpu_count() or 1)

    def _pixel_range(
        self,
        record: SplitRecord,
        tile_calibrations: list[Calibration] | None,
        image_calibration: Calibration | None,
    ) -> tuple[float, float]:
        normalized = (image_calibration is not None and image_calibration.normalize) or (
            tile_calibrations is not None and self.settings.normalization_stage == NormalizationStage.TILE
        )
        if normalized:
            return (0.0, 1.0)
        return self._store(record.fingerprint).value_range([p.name for p in self.grid])

    def _write_outputs(
        self,
        record: SplitRecord,
        output: Path,
        tile_calibrations: list[Calibration] | None,
        image_calibration: Calibration | None,
        pixel_range: tuple[float, float],
        suite: MetricSuite | None,
        maps_dir: Path | None = None,
    ) -> list[Prediction]:
        """Stream merged predictions into metrics, ``predictions.csv``, pictures and (predict) maps."""
        visualization = self.settings.visualization
        rows = io.StringIO()
        table = csv.writer(rows)
        table.writerow(["image_path", "pred_score", "pred_label", "gt_label", "result_image", "anomaly_map"])
        predictions: list[Prediction] = []
        index = 0
        visualizer = ResultVisualizer(self.grid, visualization.max_side, visualization.grid, pixel_range)
        with self._progress() as progress, visualizer:
            task = progress.add_task("Merging and evaluating", total=len(record))
            for batch in self._merged(record, tile_calibrations, image_calibration):
                if suite is not None:
                    suite.update(batch)
                for offset, path in enumerate(batch.image_path):
                    name = output_name(path, index)
                    label = None if batch.pred_label is None else bool(batch.pred_label[offset])
                    score = float(batch.pred_score[offset])
                    picture = output / "images" / f"{name}.png" if visualization.save else None
                    if picture is not None:
                        caption = f"score {score:.3f}" + (
                            "" if label is None else f"  {'ANOMALOUS' if label else 'normal'}"
                        )
                        visualizer.submit(
                            ResultPicture(
                                path,
                                batch.anomaly_map[offset],
                                None if batch.pred_mask is None else batch.pred_mask[offset],
                                None if batch.gt_mask is None else batch.gt_mask[offset],
                                caption,
                                picture,
                            ),
                        )
                    map_file = None
                    if maps_dir is not None:
                        map_file = maps_dir / f"{name}.npy"
                        with atomic_path(map_file) as temporary, temporary.open("wb") as handle:
                            np.save(handle, batch.anomaly_map[offset].numpy())
                        predictions.append(Prediction(path, score, label, map_file, picture))
                    table.writerow(
                        [
                            path,
                            f"{score:.6f}",
                            "" if label is None else int(label),
                            "" if batch.gt_label is None else int(batch.gt_label[offset]),
                            "" if picture is None else picture.relative_to(output),
                            "" if map_file is None else map_file.relative_to(output),
                        ]
                    )
                    index += 1
                progress.update(task, completed=index)
        atomic_write_text(output / "predictions.csv", rows.getvalue())
        return predictions

    # ----------------------------------------------------------------------------------------------
    # predict

    def predict(self, data_path: str | Path, output: str | Path | None = None) -> list[Prediction]:
        """Predict unlabeled images with the trained ensemble.

        Args:
            data_path: A folder (searched recursively), an image file, or a glob pattern.
            output: Output folder; defaults to a new ``predict/vN`` folder of the run.

        Returns:
            One :class:`Prediction` per image; anomaly maps are ``.npy`` files in ``<output>/maps``,
            pictures in ``<output>/images``, and ``<output>/predictions.csv`` lists them all.
        """
        run = self._require_run()
        source = FileSource(collect_images(data_path))
        out = Path(output) if output is not None else run.new_output_dir("predict")
        out.mkdir(parents=True, exist_ok=True)
        record = self._prepare_split(source, out / "split", workers=os.cpu_count() or 1)
        with self._run_log():
            tile_calibrations, image_calibration = self._calibrations(out)
            pixel_range = self._pixel_range(record, tile_calibrations, image_calibration)
            predictions = self._write_outputs(
                record, out, tile_calibrations, image_calibration, pixel_range, None, out / "maps"
            )
        shutil.rmtree(out / "split", ignore_errors=True)
        if record.fingerprint not in run.manifest().get("splits", {}).values():
            # Outputs hold everything; the tile predictions of unlabeled images need not stay in the run.
            shutil.rmtree(self._store(record.fingerprint).directory, ignore_errors=True)
        self.console.print(f"Predictions of {len(predictions)} images written to {out}")
        return predictions

    # ----------------------------------------------------------------------------------------------
    # helpers

    def _require_run(self) -> RunDirectory:
        if self.run is None:
            msg = "no trained run: call fit() first or create the engine with TiledEnsembleEngine.from_run(path)"
            raise RunDirectoryError(msg)
        if self.factory is None:
            _, model_spec, _ = config_module.load_run_config(self.run)
            self.factory = ModelFactory.from_spec(model_spec)
        return self.run

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )

    @contextmanager
    def _run_log(self) -> Iterator[None]:
        """Log everything (tracebacks included) to the run's ``run.log`` while the block runs.

        This package's progress records (INFO) go to the file only; the console shows its warnings
        and errors, whatever logging the host application (anomalib's CLI) configured.
        """
        assert self.run is not None
        file_handler = logging.FileHandler(self.run.log_path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(logging.INFO)
        console_handler = logging.StreamHandler()
        console_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        console_handler.setLevel(logging.WARNING)
        # Failures reach the console as the CLI's one line; their tracebacks belong in run.log.
        console_handler.addFilter(lambda record: not record.exc_info)
        root = logging.getLogger()
        package = logging.getLogger("anomalib_tiled")
        saved = package.level, package.propagate
        package.setLevel(logging.INFO)
        package.propagate = False
        package.addHandler(file_handler)
        package.addHandler(console_handler)
        root.addHandler(file_handler)
        try:
            yield
        except BaseException:
            logger.exception("Stopped by an error")
            raise
        finally:
            root.removeHandler(file_handler)
            package.removeHandler(file_handler)
            package.removeHandler(console_handler)
            package.level, package.propagate = saved
            file_handler.close()


def _trained_with(run: RunDirectory, settings: EnsembleSettings | None, option: str) -> tuple[EnsembleSettings, dict]:
    """The run's own settings and model spec, after checking ``settings`` keep what training fixed.

    Raises:
        ConfigError: If ``settings`` change the tiling, the seed or the blending of the run.
    """
    run_settings, model_spec, _ = config_module.load_run_config(run)
    if settings is not None:
        for name, trained, given in (
            ("tiling", run_settings.grid, settings.grid),
            ("seed", run_settings.seed, settings.seed),
            ("merge.blending", run_settings.merge.blending, settings.merge.blending),
        ):
            if trained != given:
                msg = f"{option}: the run was trained with {name} {trained}, not {given}; keep the run's {name}"
                raise ConfigError(msg)
    return run_settings, model_spec


def _calibration_key(settings: EnsembleSettings) -> str:
    return json.dumps(
        {
            "normalization": settings.normalization_stage.value,
            "thresholding": config_module.as_yaml_value(asdict(settings.thresholding)),
            "smoothing": asdict(settings.seam_smoothing),
            "merge": config_module.as_yaml_value(asdict(settings.merge)),
        },
        sort_keys=True,
    )


def _tile_calibrations(stats: dict[str, Any]) -> list[Calibration] | None:
    return [Calibration.from_dict(values) for values in stats["tile"]] if stats.get("tile") else None


def _tile_batches(store: PredictionStore, record: SplitRecord, position: TilePosition) -> Iterator[Any]:
    """Validation predictions of one tile position with the tile's ground truth."""
    maps = store.maps(position.name)
    scores = torch.from_numpy(store.scores(position.name))
    masks = record.masks
    rows, cols = position.slices
    for start in range(0, len(record), MERGE_BATCH * 8):
        count = min(MERGE_BATCH * 8, len(record) - start)
        labels = torch.tensor(record.labels[start : start + count])
        gt_mask = None
        if masks is not None:
            gt_mask = torch.from_numpy(masks.read(start, count)[:, rows, cols].copy()).bool()
            labels = gt_mask.flatten(1).any(dim=1).long()
        batch = MergedBatch(
            image_path=record.image_paths[start : start + count],
            anomaly_map=torch.from_numpy(maps.read(start, count).copy()),
            pred_score=scores[start : start + count],
            gt_mask=gt_mask,
            gt_label=labels.bool() if bool((labels >= 0).all()) else None,
        )
        yield batch


def _link_split(source: SplitRecord, directory: Path) -> SplitRecord:
    """Record, in ``directory``, a split that holds the same images as ``source`` (test = validation)."""
    directory.mkdir(parents=True, exist_ok=True)
    if source.has_masks:
        masks = directory / "masks.npy"
        masks.unlink(missing_ok=True)
        os.link(source.directory / "masks.npy", masks)
    record = SplitRecord(directory, source.image_paths, source.mask_paths, source.labels, source.has_masks)
    record.save()
    return record


def _check_metric_inputs(labels: Sequence[int], metrics: MetricsConfig) -> None:
    """Refuse image metrics on a test split without anomalous images, where AUROC & co. are undefined."""
    if metrics.image and set(labels) <= {0}:
        msg = (
            "data: the test split has no anomalous images, so image metrics such as AUROC are undefined; "
            "add anomalous test images or set TrainModels.metrics.image to []"
        )
        raise DataError(msg)
