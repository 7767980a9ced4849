"""Batched prediction: the tile models of several positions predict a split together.

:class:`PredictGroupJob` is the prediction job of a group of tile positions (``eval``, ``predict``).
It loads their models one at a time through :meth:`ModelFactory.load`, keeping one copy of an
extractor identical to one already loaded (:func:`~anomalib_tiled.execution.shared.share_extractor`),
groups them by digest (:func:`~anomalib_tiled.execution.shared.group_by_extractor`) and predicts each
shared group with one Lightning ``Trainer.predict``: every batch of images is read once, each tile
model's own pre-processing runs where its ``PreProcessor`` callback would, the extractor runs once
on all tiles of the batch, then each tile's head. Models that share nothing are predicted by
:func:`~anomalib_tiled.execution.jobs.predict_tile`, one at a time, as in :class:`PredictTileJob`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from anomalib.data import InferenceBatch
from anomalib.models import AnomalibModule
from lightning.pytorch import LightningModule, Trainer

from anomalib_tiled.data.tiles import GroupTileDataset, group_tile_loader
from anomalib_tiled.execution.jobs import TileContext, TileResult, TileSplit, predict_tile
from anomalib_tiled.execution.shared import SharedExtractorTiles, group_by_extractor, share_extractor
from anomalib_tiled.run.store import GroupPredictionWriter
from anomalib_tiled.tiling import TilePosition

logger = logging.getLogger(__name__)


class SharedExtractorPredictor(LightningModule):
    """The Lightning module of a shared group: ``predict_step`` returns one prediction per tile position.

    Args:
        tiles: The group's tile models, sharing one extractor.
    """

    def __init__(self, tiles: SharedExtractorTiles) -> None:
        super().__init__()
        self.tiles = tiles

    def on_predict_batch_start(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Each tile model's pre-processing (``PreProcessor.transform``), where its callback applies it per tile.

        Lightning runs this hook on the device, outside the step's precision context, as it runs the
        ``PreProcessor`` callbacks of a single tile model.
        """
        del batch_idx, dataloader_idx
        tiles = batch["tiles"]
        transforms = [model.pre_processor.transform if model.pre_processor else None for model in self.tiles.tiles]
        batch["inputs"] = [
            tiles[:, j].contiguous() if transform is None else transform(tiles[:, j].contiguous())
            for j, transform in enumerate(transforms)
        ]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[InferenceBatch]:
        """The tile models' predictions of the batch, in the order of the group's positions."""
        del batch_idx
        return self.tiles.predict(batch["inputs"])


def predict_shared(
    context: TileContext, models: Sequence[AnomalibModule], positions: Sequence[TilePosition], split: TileSplit
) -> None:
    """Predict a split with tile models sharing one extractor; the split's store keeps each tile's outputs.

    Each step holds ``split.batch_size`` images with all their tiles: the extractor's batch is
    ``batch_size x len(positions)`` tiles.

    Args:
        context: What every tile job shares (trainer settings, device).
        models: Tile models of one shared :class:`~anomalib_tiled.execution.shared.ExtractorGroup`.
        positions: Their tile positions.
        split: The split to predict.
    """
    assert split.store is not None, "a split whose predictions are stored needs a store"
    positions = list(positions)
    writer = GroupPredictionWriter(split.store, positions, len(split.record), split.record.fingerprint)
    # The trainer of a tile's engine, with the model's own trainer arguments over it as anomalib's Engine puts them.
    arguments = {**context.trainer_arguments(positions[0], fitting=False), **models[0].trainer_arguments}
    trainer = Trainer(callbacks=[writer], default_root_dir=context.tile_dir(positions[0]), **arguments)
    module = SharedExtractorPredictor(SharedExtractorTiles(models))
    loader = group_tile_loader(GroupTileDataset(split.images, split.record, positions), split.batch_size)
    trainer.predict(module, dataloaders=loader, return_predictions=False)


@dataclass
class PredictGroupJob:
    """Predict one split with the trained models of several tile positions, batched where they share an extractor.

    Attributes:
        context: What every tile job of the run shares.
        positions: The tile positions, in grid order.
        split: The split to predict.
    """

    context: TileContext
    positions: tuple[TilePosition, ...]
    split: TileSplit

    @property
    def name(self) -> str:
        """The first and last tile positions' names and the number of tiles."""
        return f"{self.positions[0].name}..{self.positions[-1].name} ({len(self.positions)} tiles)"

    def pinned(self) -> PredictGroupJob:
        """A copy for a worker pinned to one device (see :meth:`TileContext.pinned`)."""
        return replace(self, context=self.context.pinned())

    def run(self) -> TileResult:
        """Load the verified checkpoints and store every tile's predictions."""
        started = time.perf_counter()
        models = self._load()
        for group in group_by_extractor(models):
            members = [self.positions[index] for index in group.indices]
            if group.shared:
                predict_shared(self.context, [models[index] for index in group.indices], members, self.split)
                logger.info("%s: %d tiles predicted with one shared feature extractor.", members[0].name, len(members))
                continue
            for index, position in zip(group.indices, members, strict=True):
                predict_tile(self.context, models[index], position, self.split)
        return TileResult(self.name, time.perf_counter() - started, tiles=len(self.positions))

    def finish(self, result: TileResult) -> None:
        """Nothing to record: the store marks each tile's predictions complete itself."""
        del result

    def _load(self) -> list[AnomalibModule]:
        """The tile models, one at a time, each keeping an identical extractor loaded before it instead of its own."""
        extractors: dict[str, Any] = {}
        models = []
        for position in self.positions:
            checkpoint = self.context.run.verify_checkpoint(position.name)
            model = self.context.factory.load(checkpoint, (position.height, position.width))
            share_extractor(model, extractors)
            models.append(model)
        return models
