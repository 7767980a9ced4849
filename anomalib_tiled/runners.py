"""Runners: *where* tile jobs execute, kept apart from *what* they do (:mod:`anomalib_tiled.tile_jobs`).

A runner takes independent tile jobs and returns their results; the stages that build the jobs do
not know how they are scheduled. :class:`SerialRunner` runs them one after another in this process,
the memory of one tile model at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from anomalib_tiled.progress import Task
from anomalib_tiled.tile_jobs import TileResult, release


class TileJob(Protocol):
    """A unit of tile work (:class:`~anomalib_tiled.tile_jobs.FitTileJob`, ``PredictTileJob``)."""

    @property
    def name(self) -> str:
        """The tile position's name."""

    def run(self) -> TileResult:
        """Do the work; raise on failure."""


class Runner(Protocol):
    """Executes tile jobs and reports each finished one to a progress task."""

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job; stop at the first failure (or when the listener asks) by raising."""


class SerialRunner:
    """Runs tile jobs one after another in this process."""

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job in order; a stop request is honoured between jobs.

        Raises:
            KeyboardInterrupt: When the progress listener asks to stop.
        """
        results = []
        for job in jobs:
            if task.listener.should_stop():
                raise KeyboardInterrupt
            result = job.run()
            # The tile's model and trainer are unreachable now; return their memory before the next tile.
            release()
            results.append(result)
            task.advance(detail=f"{result.name} done in {result.seconds:.1f} s")
        if task.listener.should_stop():
            raise KeyboardInterrupt
        return results
