"""Tile jobs: fit one tile model, or predict one split with one trained tile model.

What a job does is kept apart from where it runs (:mod:`anomalib_tiled.execution.runners.serial`), as in anomalib's
``pipelines.components.base`` (``Job`` / ``Runner``). Every job gets everything it needs in its
fields, so a runner can execute it anywhere. Tile models run through anomalib's ``Engine`` (a
Lightning ``Trainer``); :func:`predict_tile` is how one tile model predicts a split, for the test split
and calibration splits right after fitting, and for ``eval`` and ``predict`` when tile models share
no feature extractor (else :mod:`anomalib_tiled.execution.batched` predicts them together).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.plugins.io import CheckpointIO

from anomalib_tiled.config.components import fresh_callbacks, fresh_loggers
from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.data.tiles import TileCrops, TileDataset, tile_loader
from anomalib_tiled.errors import ConfigError, RunDirectoryError
from anomalib_tiled.execution.models import ModelFactory
from anomalib_tiled.run.directory import RunDirectory, atomic_path, file_digest
from anomalib_tiled.run.store import PredictionStore, TilePredictionWriter
from anomalib_tiled.run.weights import SharedWeights, share
from anomalib_tiled.settings import RuntimeSettings, TrainingSettings
from anomalib_tiled.tiling import TilePosition

logger = logging.getLogger(__name__)


@dataclass
class TileContext:
    """What every tile job of a run shares.

    Attributes:
        run: The run directory (checkpoints, tile folders, manifest).
        factory: Builds and loads the tile models.
        training: Seed and trainer settings.
        runtime: Accelerator and device.
        where: Where the job runs besides its device (a Ray node), for its log line.
    """

    run: RunDirectory
    factory: ModelFactory
    training: TrainingSettings
    runtime: RuntimeSettings
    where: str = ""

    def tile_dir(self, position: TilePosition) -> Path:
        """The tile's Lightning working folder (loggers write there)."""
        return self.run.root / "tiles" / position.name

    def engine(self, position: TilePosition, callbacks: list[Any], *, fitting: bool) -> TileEngine:
        """Anomalib Engine of one tile: the user's trainer settings over quiet defaults, on one device."""
        arguments = self.trainer_arguments(position, fitting=fitting)
        return TileEngine(callbacks=callbacks, default_root_dir=self.tile_dir(position), **arguments)

    def trainer_arguments(self, position: TilePosition, *, fitting: bool) -> dict[str, Any]:
        """Lightning ``Trainer`` arguments of a tile's engine (callbacks and root folder aside)."""
        trainer = self.training.trainer
        tile_dir = self.tile_dir(position)
        devices = self.runtime.devices if self.runtime.devices is not None else trainer.get("devices")
        return {
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **{k: v for k, v in trainer.items() if k not in {"callbacks", "logger", "devices"}},
            # Predicting logs nothing worth a logger's files.
            "logger": fresh_loggers(trainer, str(tile_dir)) if fitting else False,
            "accelerator": "gpu" if self.runtime.accelerator == "cuda" else self.runtime.accelerator,
            # One device per tile model; a single device index ([1]) is honoured (not on the CPU, which has
            # no index: a run trained on GPU 1 is evaluated on a CPU box), "auto" means one.
            "devices": devices if isinstance(devices, list) and self.runtime.accelerator != "cpu" else 1,
        }

    def pinned(self) -> TileContext:
        """A copy for a worker pinned to one device, which it sees as its first (``CUDA_VISIBLE_DEVICES``)."""
        return replace(self, runtime=replace(self.runtime, devices=1))


@dataclass
class TileSplit:
    """A split as tile jobs read it: its record, its image cache (or a job's tiles cut out of it), store, batch size."""

    record: SplitRecord
    images: NpyFile | TileCrops
    batch_size: int
    store: PredictionStore | None = None
    augmentations: Any = None

    def loader(self, position: TilePosition, seed: int, *, shuffle: bool = False) -> Any:
        """DataLoader of the split's tiles at ``position``."""
        dataset = TileDataset(self.images, self.record, position, self.augmentations)
        return tile_loader(dataset, self.batch_size, shuffle=shuffle, seed=seed)

    def writer(self, position: TilePosition, stage: str) -> TilePredictionWriter:
        """Callback storing the tile model's ``stage`` (``validate``/``predict``) outputs for this split."""
        assert self.store is not None, "a split whose predictions are stored needs a store"
        return TilePredictionWriter(self.store, position, len(self.record), self.record.fingerprint, stage)


@dataclass
class TileResult:
    """What a finished tile job reports.

    Attributes:
        name: The tile position's name.
        seconds: Wall time of the job.
        checkpoint: Size and sha256 of the checkpoint a fit wrote (None for predictions).
        phases: Seconds of a fit's phases: ``setup`` (model, callbacks, trainer), ``fit`` (training and
            validation), ``predict`` (the other splits), ``save`` (checkpoint and digest).
        shared: Size and sha256 of each shared weights file the checkpoint references.
        tiles: Tile positions the job did (a batched prediction job does several).
    """

    name: str
    seconds: float
    checkpoint: dict[str, Any] | None = None
    phases: dict[str, float] = field(default_factory=dict)
    shared: list[dict[str, Any]] = field(default_factory=list)
    tiles: int = 1


@dataclass
class TileJobBase:
    """What every tile job has: the shared context and its tile position.

    Attributes:
        context: What every tile job of the run shares.
        position: The tile position.
    """

    context: TileContext
    position: TilePosition

    @property
    def name(self) -> str:
        """The tile position's name."""
        return self.position.name

    def pinned(self) -> TileJobBase:
        """A copy for a worker pinned to one device (see :meth:`TileContext.pinned`)."""
        return replace(self, context=self.context.pinned())

    def reads(self) -> list[Path]:
        """Files of the run directory the job reads besides its splits' images (sent to detached jobs)."""
        return []


@dataclass
class PredictTileJob(TileJobBase):
    """Predict one split with the trained model of one tile position (``eval``, ``predict``)."""

    split: TileSplit

    def reads(self) -> list[Path]:
        """The manifest, the tile's checkpoint and the shared files it references (verified against it)."""
        run = self.context.run
        return [run.manifest_path, run.checkpoint_path(self.name), *(path for path, _ in run.shared_files(self.name))]

    def run(self) -> TileResult:
        """Load the verified checkpoint and store the tile's predictions."""
        started = time.perf_counter()
        checkpoint = self.context.run.verify_checkpoint(self.position.name)
        model = self.context.factory.load(checkpoint, (self.position.height, self.position.width))
        predict_tile(self.context, model, self.position, self.split)
        return TileResult(self.name, time.perf_counter() - started)

    def finish(self, result: TileResult) -> None:
        """Nothing to record: the store marks the tile's predictions complete itself."""
        del result


@dataclass
class FitTileJob(TileJobBase):
    """Fit the model of one tile position, store its validation (and other) predictions, save its checkpoint."""

    train: TileSplit
    val: TileSplit | None = None
    predicted: list[TileSplit] = field(default_factory=list)
    monitored: list[str] = field(default_factory=list)

    def run(self) -> TileResult:
        """Train the tile and save its checkpoint; :meth:`finish` records it in the manifest."""
        started = time.perf_counter()
        clock = PhaseClock()
        context, position = self.context, self.position
        seed_tile(context.training.seed, position.index)
        model = context.factory.build((position.height, position.width), self.monitored)
        checkpoint = TileCheckpoint(context.run.checkpoint_path(position.name))
        writer = self.val.writer(position, "validate") if self.val is not None else None
        callbacks = [*fresh_callbacks(context.training.trainer), checkpoint, *([writer] if writer else [])]
        engine = context.engine(position, callbacks, fitting=True)
        val_loader = self.val.loader(position, context.training.seed) if self.val is not None else None
        clock.lap("setup")
        _fit(engine, model, self.train.loader(position, context.training.seed, shuffle=True), val_loader)
        clock.lap("fit")
        shared = checkpoint.save_final(engine.trainer)
        clock.lap("save")
        if writer is not None and writer.last_written_step != engine.trainer.global_step:
            # The last validation ran before the final weights (val_check_interval / check_val_every_n_epoch).
            engine.validate(model=model, dataloaders=val_loader, verbose=False)
        clock.lap("fit")
        for split in self.predicted:
            predict_tile(context, model, position, split)
        clock.lap("predict")
        digest = file_digest(checkpoint.path)
        clock.lap("save")
        seconds = time.perf_counter() - started
        device, visible = engine.trainer.strategy.root_device, os.environ.get("CUDA_VISIBLE_DEVICES")
        # Which physical GPU a pinned worker's cuda:0 is.
        where = f"{device} (CUDA_VISIBLE_DEVICES={visible})" if device.type == "cuda" and visible else str(device)
        where += f", {context.where}" if context.where else ""
        logger.info(
            "%s trained in %.1f s on %s (%d training tiles, checkpoint %.1f MB + %.1f MB in %d shared files).",
            position.name,
            seconds,
            where,
            len(self.train.record),
            checkpoint.path.stat().st_size / 2**20,
            sum(entry["size"] for entry in shared) / 2**20,
            len(shared),
        )
        return TileResult(self.name, seconds, digest, phases=clock.seconds, shared=shared)

    def finish(self, result: TileResult) -> None:
        """Record the tile as done, once the checkpoint and shared files here match those the job wrote.

        Runs in the process that owns the run (the only writer of ``manifest.json``), whichever
        worker or node ran the job.

        Raises:
            RunDirectoryError: If the checkpoint or a shared file is missing or differs (storage not shared).
        """
        run = self.context.run
        written = [("checkpoint", run.checkpoint_path(self.name), result.checkpoint)]
        written += [("shared weights file", run.shared_path(entry["sha256"]), entry) for entry in result.shared]
        for what, path, recorded in written:
            if recorded is None or not path.is_file() or file_digest(path) != recorded:
                msg = (
                    f"{path}: the {what} written by the tile job is missing or different here; put the run "
                    "directory on storage every worker sees (see docs/distributed.md)"
                )
                raise RunDirectoryError(msg)
        entry = {
            "checkpoint": result.checkpoint,
            "shared": result.shared,
            "seconds": round(result.seconds, 2),
            "phases": result.phases,
        }
        run.record_tile(self.name, entry)


def predict_tile(context: TileContext, model: AnomalibModule, position: TilePosition, split: TileSplit) -> None:
    """Run a fitted or loaded tile model over a split's tiles; the split's store keeps the outputs."""
    engine = context.engine(position, [split.writer(position, "predict")], fitting=False)
    loader = split.loader(position, context.training.seed)
    engine.predict(model=model, dataloaders=loader, return_predictions=False)


def _fit(engine: TileEngine, model: AnomalibModule, train_loader: Any, val_loader: Any) -> None:
    try:
        engine.fit(model=model, train_dataloaders=train_loader, val_dataloaders=val_loader)
    except RuntimeError as error:
        if "conditioned on metric" in str(error):
            msg = f"TrainModels.trainer.callbacks: {str(error).splitlines()[0]} Monitor a metric the tile model logs."
            raise ConfigError(msg) from None
        raise


class TileCheckpoint(ModelCheckpoint):
    """Checkpointing of a tile model: nothing during fitting, the final weights once at the end.

    Being anomalib's ``ModelCheckpoint``, it also keeps anomalib's Engine from adding its own
    per-epoch checkpoint (hundreds of MB per tile for memory-bank models).

    Args:
        path: Final checkpoint path.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(dirpath=path.parent, filename=path.stem, save_top_k=0, save_last=False)
        self.path = path

    def save_final(self, trainer: Trainer) -> list[dict[str, Any]]:
        """Write the trained weights atomically (also for zero-shot models, which never train).

        Large tensors go to the run's shared weights (:mod:`anomalib_tiled.run.weights`), stored once
        however many tiles hold them; the checkpoint references them.

        Returns:
            Size and sha256 of each shared file the checkpoint references.
        """
        io = trainer.strategy.checkpoint_io
        sharing = SharingCheckpointIO(io, SharedWeights(self.path.parent))
        # Lightning's seam for how a checkpoint dict is written: the dict is split just before.
        trainer.strategy.checkpoint_io = sharing
        try:
            with atomic_path(self.path) as temporary:
                # Weights, hyper-parameters and anomalib's component configs; no optimizer/loop state.
                trainer.save_checkpoint(temporary, weights_only=True)
        finally:
            trainer.strategy.checkpoint_io = io
        return sharing.shared


class SharingCheckpointIO(CheckpointIO):
    """Checkpoint IO that moves large tensors to the shared weights, then saves the rest as ``inner`` does.

    Args:
        inner: The trainer's checkpoint IO (anomalib's), which writes the checkpoint itself.
        store: The run's shared weights.
    """

    def __init__(self, inner: CheckpointIO, store: SharedWeights) -> None:
        self.inner = inner
        self.store = store
        self.shared: list[dict[str, Any]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        split, self.shared = share(checkpoint, self.store)
        self.inner.save_checkpoint(split, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)


class TileEngine(Engine):
    """anomalib Engine that keeps a tile's Lightning files in one fixed folder.

    anomalib's Engine creates ``<root>/<Model>/<Dataset>/<category>/vN`` on every ``fit``; a tile
    already lives inside the ensemble's run directory, so its folder is used as it is.
    """

    def _setup_workspace(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs


class PhaseClock:
    """Wall seconds spent in each phase of a job; a phase entered again adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def lap(self, phase: str) -> None:
        """End the time spent since the last lap, counted to ``phase``."""
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.started, 3)
        self.started = now


def seed_tile(seed: int, tile_index: int) -> None:
    """Seed every generator from the run's seed and the tile position.

    A tile's result then depends only on the seed and its position, not on the tiles trained before
    it (so a resumed run equals an uninterrupted one), while tiles still draw their own random
    initialisation (e.g. Padim's feature subset): one shared draw for all tiles measurably hurt
    pixel AUROC on MVTec bottle (0.9705 vs 0.9772 at seed 42).
    """
    seed_everything(seed + tile_index, workers=True, verbose=False)


def release() -> None:
    """Return the memory of a finished tile's model and trainer (Lightning objects hold reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
