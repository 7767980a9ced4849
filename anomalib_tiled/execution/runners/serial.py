"""The runner protocol, the loop every runner shares, and the serial runner.

Runners decide *where* tile jobs execute, kept apart from *what* they do (:mod:`anomalib_tiled.execution.jobs`).

A runner takes independent tile jobs and returns their results; the stages that build the jobs do
not know how they are scheduled. Three runners share one loop, :func:`drive`, and differ only in
their :class:`Backend`:

* :class:`SerialRunner` runs them one after another in this process (one tile model in memory);
* :class:`~anomalib_tiled.execution.runners.processes.ProcessRunner` in local worker processes, one device each;
* :class:`~anomalib_tiled.execution.runners.ray.RayRunner` as Ray tasks, on this machine or a cluster.

Whatever the runner, a finished job is recorded (:meth:`TileJob.finish`) here, in the process that
owns the run, as its result arrives: the manifest has one writer, and a tile counts as done only
with its verified checkpoint. A job that raises stops the other work and fails the run; a job whose
worker died is run again, up to ``execution.max_retries`` times.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence
from typing import NoReturn, Protocol

from anomalib_tiled.errors import TiledEnsembleError, TileJobError
from anomalib_tiled.execution.jobs import TileResult
from anomalib_tiled.execution.runners.worker import Outcome, execute
from anomalib_tiled.progress import Task

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often a waiting runner checks whether the listener asks to stop."""


class TileJob(Protocol):
    """A unit of tile work (:class:`~anomalib_tiled.execution.jobs.FitTileJob`, ``PredictTileJob``)."""

    @property
    def name(self) -> str:
        """The tile position's name."""

    def run(self) -> TileResult:
        """Do the work, wherever the runner executes it; raise on failure."""

    def finish(self, result: TileResult) -> None:
        """Record the result; runs in the process that owns the run."""

    def pinned(self) -> TileJob:
        """The job for a worker that sees only its own device."""


class Runner(Protocol):
    """Executes tile jobs and reports each finished one to a progress task.

    A runner may also say how many jobs it runs at once (``parallelism``, 1 when absent): the
    planner splits a group of tiles predicted together into that many jobs.
    """

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job; stop at the first failure (or when the listener asks) by raising."""


class Backend(Protocol):
    """Where :func:`drive` starts jobs: this process, worker processes or Ray tasks."""

    @property
    def capacity(self) -> int:
        """Jobs it runs at once."""

    def submit(self, job: TileJob) -> None:
        """Start a job."""

    def wait(self, timeout: float) -> list[tuple[TileJob, Outcome]]:
        """Jobs that ended within ``timeout`` seconds (possibly none), with their outcomes."""

    def cancel(self) -> None:
        """Stop every running job (their tiles stay not done)."""


def drive(backend: Backend, jobs: Sequence[TileJob], task: Task, max_retries: int) -> list[TileResult]:
    """Run ``jobs`` on ``backend``: keep it busy, record results as they arrive, retry lost jobs.

    Args:
        backend: Where jobs run.
        jobs: The tile jobs.
        task: Progress task advanced by the tiles of each finished job.
        max_retries: Times a job whose worker died is run again.

    Returns:
        The results, in the order the jobs finished.

    Raises:
        KeyboardInterrupt: When the listener asks to stop (running jobs are cancelled).
        TileJobError: When a job raised, or its worker died more than ``max_retries`` times.
    """
    queue, running, attempts, results = deque(jobs), 0, Counter[str](), []
    try:
        while queue or running:
            _check_stop(task)
            while queue and running < backend.capacity:
                backend.submit(queue.popleft())
                running += 1
            for job, outcome in backend.wait(POLL_SECONDS):
                running -= 1
                _log_records(outcome)
                if outcome.lost is not None:
                    attempts[job.name] += outcome.attempts
                    _retry_or_fail(job, outcome.lost, attempts[job.name], max_retries)
                    queue.appendleft(job)
                    continue
                if outcome.error is not None:
                    _fail(job.name, outcome)
                assert outcome.result is not None
                job.finish(outcome.result)
                results.append(outcome.result)
                task.advance(outcome.result.tiles, detail=_detail(outcome.result, running, sum(attempts.values())))
        _check_stop(task)
    except BaseException:
        backend.cancel()
        raise
    return results


class InProcess:
    """Backend running one job at a time in this process, when asked for its outcome."""

    capacity = 1

    def __init__(self) -> None:
        self.pending: deque[TileJob] = deque()

    def submit(self, job: TileJob) -> None:
        self.pending.append(job)

    def wait(self, timeout: float) -> list[tuple[TileJob, Outcome]]:
        del timeout
        job = self.pending.popleft()
        return [(job, execute(job, remote=False))]

    def cancel(self) -> None:
        self.pending.clear()


class SerialRunner:
    """Runs tile jobs one after another in this process."""

    parallelism = 1
    """Jobs it runs at once (the planner hands it one batched prediction job per group of tiles)."""

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job in order; a stop request is honoured between jobs.

        Raises:
            KeyboardInterrupt: When the progress listener asks to stop.
            TileJobError: When a job raises.
        """
        return drive(InProcess(), jobs, task, max_retries=0)


def _check_stop(task: Task) -> None:
    if task.listener.should_stop():
        raise KeyboardInterrupt


def _log_records(outcome: Outcome) -> None:
    """The worker's log records, into this process's handlers (the run's ``run.log``)."""
    for record in outcome.records:
        logging.getLogger(record.name).handle(record)


def _retry_or_fail(job: TileJob, lost: str, attempts: int, max_retries: int) -> None:
    if attempts > max_retries:
        msg = (
            f"{job.name} failed: {lost}, {attempts} time(s) (execution.max_retries: {max_retries}); "
            "check the workers' memory and logs, then resume the run with --resume"
        )
        raise TileJobError(msg)
    logger.warning("%s: %s; running it again (retry %d of %d).", job.name, lost, attempts, max_retries)


def _fail(name: str, outcome: Outcome) -> NoReturn:
    error = outcome.error
    assert error is not None
    if outcome.traceback:
        # Kept as the cause, so the run's log shows where in the worker it failed.
        error.__cause__ = RemoteTraceback(outcome.traceback)
    if isinstance(error, TiledEnsembleError):
        raise error  # already one line naming the input and the fix
    detail = " ".join(str(error).split())
    msg = f"{name} failed: {type(error).__name__}: {detail} (the traceback is in the run's run.log)"
    raise TileJobError(msg) from error


def _detail(result: TileResult, running: int, retried: int) -> str:
    detail = f"{result.name} done in {result.seconds:.1f} s"
    if running:
        detail += f", {running} running"
    if retried:
        detail += f", {retried} retried"
    return detail


class RemoteTraceback(Exception):  # noqa: N818 - named after what it shows, like concurrent.futures'
    """The traceback of an exception raised in a worker, as text."""

    def __str__(self) -> str:
        return f"\n\n{self.args[0]}"
