"""The ``processes`` runner: tile jobs in local worker processes, each pinned to one device.

Each worker is a fresh interpreter (``python -c "...runners.worker import main"``: no CUDA state or
locks inherited, and unlike ``multiprocessing``'s spawn it never re-runs the caller's script). Its
environment pins it before anything is imported: ``CUDA_VISIBLE_DEVICES`` names its one GPU and
``OMP_NUM_THREADS`` its threads (:func:`~anomalib_tiled.execution.runners.placement.worker_environment`). Jobs and
outcomes travel as pickles over its standard input and output. A worker takes the next tile as
soon as it is free; one that dies mid-tile (killed, out of memory) is replaced and its tile handed
out again, and the owner of the run records each tile as it finishes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType

from anomalib_tiled.execution.jobs import TileResult
from anomalib_tiled.execution.runners.placement import Slot, worker_environment
from anomalib_tiled.execution.runners.serial import TileJob, drive
from anomalib_tiled.execution.runners.worker import Outcome, WorkerSetup
from anomalib_tiled.progress import Task

STOP_SECONDS = 30.0
"""How long idle workers get to exit before they are killed."""

# Appended, not prepended: an installed package wins, and nothing can shadow the standard library.
WORKER_CODE = (
    f"import sys; sys.path.append({str(Path(__file__).resolve().parent.parent)!r}); "
    "from anomalib_tiled.execution.runners.worker import main; main()"
)
"""What a worker runs: it finds this package where this process does, installed or not."""


class ProcessRunner:
    """Runs tile jobs in local worker processes.

    Args:
        slots: One per worker: its device and threads.
        max_retries: Times a tile whose worker died is run again.
    """

    def __init__(self, slots: Sequence[Slot], max_retries: int) -> None:
        self.slots = list(slots)
        self.max_retries = max_retries

    @property
    def parallelism(self) -> int:
        """Jobs it runs at once: one per worker."""
        return len(self.slots)

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job in the pool (no more workers than jobs) (see :func:`.serial.drive`)."""
        if not jobs:
            return []
        with WorkerPool(self.slots[: len(jobs)], WorkerSetup.of_this_process()) as pool:
            return drive(pool, [job.pinned() for job in jobs], task, self.max_retries)


@dataclass
class _Worker:
    slot: Slot
    process: subprocess.Popen
    writer: Connection
    reader: Connection
    job: TileJob | None = None


class WorkerPool:
    """Worker processes, one per slot, each running one job at a time.

    Args:
        slots: The workers' devices and threads.
        setup: What the workers copy from this process (logging levels, warning filters).
    """

    def __init__(self, slots: Sequence[Slot], setup: WorkerSetup) -> None:
        self.slots = slots
        self.setup = setup
        self.workers: list[_Worker] = []

    @property
    def capacity(self) -> int:
        """One job per worker."""
        return len(self.slots)

    def __enter__(self) -> WorkerPool:  # noqa: PYI034 - final in practice; Self needs Python 3.11
        # All at once: each worker spends seconds importing torch and anomalib with its first job.
        self.workers = [self._start(slot) for slot in self.slots]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            for worker in self.workers:
                with contextlib.suppress(OSError):
                    worker.writer.send(None)
            for worker in self.workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(STOP_SECONDS)
        self.cancel()

    def submit(self, job: TileJob) -> None:
        """Hand ``job`` to an idle worker (a new one if it died while idle)."""
        worker = next(worker for worker in self.workers if worker.job is None)
        try:
            worker.writer.send(job)
        except OSError:
            self._replace(worker)
            worker.writer.send(job)
        worker.job = job

    def wait(self, timeout: float) -> list[tuple[TileJob, Outcome]]:
        """Outcomes of the jobs whose worker answered or died within ``timeout`` seconds."""
        busy = {worker.reader: worker for worker in self.workers if worker.job is not None}
        ended = []
        for reader in wait(list(busy), timeout):
            worker = busy[reader]
            assert worker.job is not None
            ended.append((worker.job, self._outcome(worker)))
            worker.job = None
        return ended

    def cancel(self) -> None:
        """Kill every worker still running (a tile it was training stays not done)."""
        for worker in self.workers:
            _stop(worker)

    def _outcome(self, worker: _Worker) -> Outcome:
        with contextlib.suppress(EOFError, OSError):
            return worker.reader.recv()
        # End of file: the worker died before answering.
        lost = f"its worker process died ({_exit_reason(worker.process.wait())})"
        self._replace(worker)
        return Outcome(lost=lost)

    def _replace(self, worker: _Worker) -> None:
        _stop(worker)
        fresh = self._start(worker.slot)
        worker.process, worker.writer, worker.reader = fresh.process, fresh.writer, fresh.reader

    def _start(self, slot: Slot) -> _Worker:
        to_worker, writer_fd = os.pipe()
        reader_fd, from_worker = os.pipe()
        process = subprocess.Popen(  # noqa: S603 - this interpreter, our own code
            [sys.executable, "-c", WORKER_CODE],
            stdin=to_worker,
            stdout=from_worker,
            env=worker_environment(slot, os.environ),
            # Its own session: Ctrl-C in a terminal reaches only this process, which then ends the workers.
            start_new_session=True,
        )
        os.close(to_worker)
        os.close(from_worker)
        worker = _Worker(slot, process, Connection(writer_fd, readable=False), Connection(reader_fd, writable=False))
        worker.writer.send((sys.path, self.setup))
        return worker


def _stop(worker: _Worker) -> None:
    if worker.process.poll() is None:
        worker.process.kill()
    worker.process.wait()
    worker.writer.close()
    worker.reader.close()


def _exit_reason(returncode: int) -> str:
    """``killed by SIGKILL`` or ``exit code 1``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
