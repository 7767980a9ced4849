"""Tile planner: fit every tile position, or predict a split with every trained tile model.

The planner decides *which* tile jobs are needed (a resumed run skips tiles whose checkpoint and
predictions are verified; an evaluation predicts only tiles whose predictions are missing) and hands
them to a runner (:mod:`anomalib_tiled.execution.runners`), which decides where they run. Tile models
that may share their feature extractor (Padim, PatchCore with a pretrained backbone) are predicted
by group jobs (:mod:`anomalib_tiled.execution.batched`), the others by one job per tile.
"""

from __future__ import annotations

import itertools
import logging

from anomalib_tiled.execution.batched import PredictGroupJob
from anomalib_tiled.execution.jobs import FitTileJob, PredictTileJob, TileContext, TileSplit
from anomalib_tiled.execution.runners.factory import runner_for
from anomalib_tiled.execution.runners.serial import Runner
from anomalib_tiled.execution.shared import may_share_extractor
from anomalib_tiled.progress import ProgressListener, Task
from anomalib_tiled.run.store import PredictionStore
from anomalib_tiled.tiling import TileGrid, TilePosition

logger = logging.getLogger(__name__)


class TilePlanner:
    """Runs the tile jobs of a run.

    Args:
        context: What every tile job shares (run, model factory, settings).
        grid: The tile grid.
        listener: Progress reporting.
        runner: Where jobs run (default: the runner of ``context.runtime.execution``).
    """

    def __init__(
        self, context: TileContext, grid: TileGrid, listener: ProgressListener, runner: Runner | None = None
    ) -> None:
        self.context = context
        self.grid = grid
        self.listener = listener
        self.runner = runner or runner_for(context.runtime)

    def fit(self, train: TileSplit, val: TileSplit | None, predicted: list[TileSplit], monitored: list[str]) -> None:
        """Fit every tile position that is not done yet.

        Args:
            train: Training split.
            val: Validation split (predictions stored while fitting), or None.
            predicted: Splits predicted right after fitting (the test split when it differs from
                validation, the held-out calibration split).
            monitored: Metrics callbacks monitor, computed on validation tiles.
        """
        stored = [*([val] if val is not None else []), *predicted]
        jobs = []
        for position in self.grid:
            if self._is_done(position, stored):
                logger.info("%s: checkpoint and predictions verified, skipping.", position.name)
                continue
            jobs.append(FitTileJob(self.context, position, train, val, predicted, monitored))
        with Task(self.listener, "Training tile models", len(self.grid)) as task:
            task.update(len(self.grid) - len(jobs))
            self.runner.run(jobs, task)

    def missing(self, store: PredictionStore, fingerprint: str) -> list[TilePosition]:
        """Tile positions without stored predictions of the split ``fingerprint``."""
        return [position for position in self.grid if not store.is_complete(position.name, fingerprint)]

    def predict(self, split: TileSplit, positions: list[TilePosition]) -> None:
        """Predict ``split`` with the trained models of ``positions``."""
        with Task(self.listener, "Predicting tiles", len(positions)) as task:
            self.runner.run(self.predict_jobs(split, positions), task)

    def predict_jobs(self, split: TileSplit, positions: list[TilePosition]) -> list[PredictTileJob | PredictGroupJob]:
        """The jobs predicting ``split``: one per tile, or, for models that may share their extractor, one per group.

        A group job compares its models' extractors by digest and batches those that are identical;
        the tiles are split into as many group jobs as the runner runs at once (one for ``serial``).
        """
        if not positions or not may_share_extractor(self.context.factory):
            return [PredictTileJob(self.context, position, split) for position in positions]
        # None: the runner starts every job at once (Ray with workers: auto), so one tile per job.
        chunks = min(len(positions), getattr(self.runner, "parallelism", 1) or len(positions))
        bounds = [index * len(positions) // chunks for index in range(chunks + 1)]
        groups = [tuple(positions[start:stop]) for start, stop in itertools.pairwise(bounds)]
        return [
            PredictGroupJob(self.context, group, split)
            if len(group) > 1
            else PredictTileJob(self.context, group[0], split)
            for group in groups
        ]

    def _is_done(self, position: TilePosition, stored: list[TileSplit]) -> bool:
        if self.context.run.verified_tile(position.name) is None:
            return False
        return all(
            split.store is not None and split.store.is_complete(position.name, split.record.fingerprint)
            for split in stored
        )
