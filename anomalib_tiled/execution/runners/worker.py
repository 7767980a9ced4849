"""The worker side of a runner: run one tile job and report what happened.

:func:`execute` turns a job into an :class:`Outcome` (its result, or its exception with the
traceback as text, and this package's log records) that can travel back to the process that owns
the run. :func:`main` runs a ``processes`` worker and :func:`ray_execute` is the body of a Ray
task. Importing this module imports no torch: a worker imports it only with its first job.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_tiled.run.log import PACKAGE_LOGGER

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from anomalib_tiled.execution.jobs import TileResult
    from anomalib_tiled.execution.transport import Parcel, RunFile


@dataclass
class Outcome:
    """What came back from one attempt at a tile job.

    Attributes:
        result: The job's result, when it succeeded.
        error: The exception it raised.
        traceback: The worker's traceback of ``error`` as text (tracebacks do not travel).
        lost: Why the worker died before answering (killed, node lost), when it did.
        attempts: Attempts this outcome stands for (Ray retries lost tasks itself).
        records: This package's log records from the worker, for the run's log.
        files: The files a job detached from the run directory wrote (``execution.ray.storage:
            object_store``), for the process that owns the run to write there.
    """

    result: TileResult | None = None
    error: BaseException | None = None
    traceback: str = ""
    lost: str | None = None
    attempts: int = 1
    records: list[logging.LogRecord] = field(default_factory=list)
    files: list[RunFile] = field(default_factory=list)


@dataclass
class WorkerSetup:
    """What a worker copies from the process that owns the run, so it is as quiet as that process.

    Attributes:
        levels: Levels of the loggers that have one (Lightning's, quieted by the application).
        warning_filters: The warning filters.
    """

    levels: dict[str, int]
    warning_filters: list[Any]

    @classmethod
    def of_this_process(cls) -> WorkerSetup:
        """The logging levels and warning filters of this process."""
        loggers = logging.root.manager.loggerDict.items()
        levels = {
            name: item.level
            for name, item in loggers
            if isinstance(item, logging.Logger) and item.level and not name.startswith(PACKAGE_LOGGER)
        }
        # A filter for a warning class only this process knows (a script's own) cannot travel.
        return cls(levels, [item for item in warnings.filters if _survives_pickling(item)])

    def apply(self) -> None:
        """Set them in this worker (after the job's imports: importing Lightning resets its loggers)."""
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        warnings.filters[:] = self.warning_filters


def execute(job: Any, *, remote: bool) -> Outcome:
    """Run one tile job; its exception becomes part of the outcome instead of propagating.

    Args:
        job: A tile job (``run()`` returns a ``TileResult``).
        remote: Whether the outcome travels to another process: then the exception must survive
            pickling, its traceback is kept as text and this package's log records are collected.
    """
    from anomalib_tiled.execution.jobs import release  # noqa: PLC0415 - a worker imports torch with its first job

    with _collected_records(enabled=remote) as records:
        try:
            outcome = Outcome(result=job.run())
        except Exception as error:  # noqa: BLE001 - the runner decides what a failed tile means
            outcome = failure(error) if remote else Outcome(error=error)
        finally:
            # The tile's model and trainer are unreachable now; return their memory before the next tile.
            release()
    outcome.records = records
    return outcome


def main() -> None:
    """Entry point of a ``processes`` worker process (started by :class:`.processes.WorkerPool`).

    The parent talks to it over its standard input and output; what libraries print goes to stderr.
    """
    from multiprocessing.connection import Connection  # noqa: PLC0415

    reader = Connection(os.dup(0), writable=False)
    writer = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    serve(reader, writer)


def serve(reader: Connection, writer: Connection) -> None:
    """Loop of a ``processes`` worker: receive a job, send its outcome, until told to stop.

    The first message is the parent's ``sys.path`` and :class:`WorkerSetup`; then come jobs, and
    ``None`` (or a closed pipe) ends the loop. Device and threads come with the environment.
    """
    try:
        path, setup = reader.recv()
    except EOFError:
        return
    # The parent's modules (its script's folder, the user's callbacks) are importable here too.
    sys.path[:] = [*path, *(entry for entry in sys.path if entry not in path)]
    setup.apply()  # before a job's imports warn
    while (job := _next_job(reader, writer)) is not None:
        setup.apply()
        writer.send(execute(job, remote=True))


def _next_job(reader: Connection, writer: Connection) -> Any:
    """The next job that can be rebuilt here; None at the end (``None`` sent, or the pipe closed)."""
    while True:
        try:
            return reader.recv()
        except EOFError:  # noqa: PERF203 - once per job: nothing to gain outside the loop
            return None
        except Exception as error:  # noqa: BLE001 - e.g. a callback class only the parent's __main__ has
            writer.send(failure(error))


def ray_execute(job: Any, threads: int, setup: WorkerSetup, parcel: Parcel | None = None) -> Outcome:
    """Body of a Ray tile task (Ray has already set ``CUDA_VISIBLE_DEVICES`` from its GPU share).

    Args:
        job: The tile job.
        threads: Torch threads.
        setup: Logging levels and warning filters of the process that owns the run.
        parcel: With ``execution.ray.storage: object_store``, what the job reads: it then runs in a
            private temporary folder and its outcome carries the files it wrote there.
    """
    import ray  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    setup.apply()
    node = ray.get_runtime_context().get_node_id()
    job = replace(job, context=replace(job.context, where=f"Ray node {node[:12]} ({ray.util.get_node_ip_address()})"))
    if parcel is None:
        return execute(job, remote=True)
    from anomalib_tiled.execution.transport import collect, unpack  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="anomalib-tiled-job-") as folder:
        root = Path(folder)
        outcome = execute(unpack(job, parcel, root), remote=True)
        if outcome.result is not None:
            outcome.files = collect(root, parcel)
    return outcome


def failure(error: Exception) -> Outcome:
    """The outcome of a job that raised ``error``, ready to travel to another process."""
    return Outcome(error=_portable(error), traceback="".join(traceback.format_exception(error)))


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a RuntimeError with its type and message."""
    return error if _survives_pickling(error) else RuntimeError(f"{type(error).__name__}: {error}")


def _survives_pickling(item: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(item))  # noqa: S301 - our own bytes, a moment ago
    except Exception:  # noqa: BLE001 - any pickling failure means the same
        return False
    return True


class _RecordList(logging.Handler):
    """Keeps records in a list, with their message and exception rendered so they pickle."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)


@contextmanager
def _collected_records(*, enabled: bool) -> Iterator[list[logging.LogRecord]]:
    if not enabled:
        yield []
        return
    handler = _RecordList()
    package = logging.getLogger(PACKAGE_LOGGER)
    saved_level, saved_propagate = package.level, package.propagate
    package.setLevel(logging.INFO)
    # The owner of the run logs them; here they would only reach stderr twice.
    package.propagate = False
    package.addHandler(handler)
    try:
        yield handler.records
    finally:
        package.removeHandler(handler)
        package.setLevel(saved_level)
        package.propagate = saved_propagate
