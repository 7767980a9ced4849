"""The command line's console: progress, logging, warnings and signals, owned by the CLI alone.

The library reports through :class:`~anomalib_tiled.progress.ProgressListener`; here that becomes
rich progress bars on a terminal, or one plain line per finished tile (with time and ETA) when the
output is a file or a CI log, where third-party progress bars are turned off. :func:`command_environment`
sets logging, warning filters, progress bars and signal handlers up for one command and puts everything
back afterwards.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from anomalib_tiled.integration.notices import filter_log_lines, filter_warnings
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.run.log import PACKAGE_LOGGER

# Tasks whose every step is a tile model: reported line by line when not on a terminal.
TILE_TASKS = ("Training tile models", "Predicting tiles")

QUIET_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
    "anomalib",
)


@dataclass
class _TaskState:
    bar: TaskID | None
    total: int
    started: float = field(default_factory=time.perf_counter)
    skipped: int = 0


class ConsoleProgress(ProgressListener):
    """Shows progress on the console; remembers a stop request (Ctrl-C, SIGTERM) until the next tile.

    Args:
        console: Where to print (stderr).
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.stop_requested = threading.Event()
        self.bars: Progress | None = None
        self.tasks: dict[str, _TaskState] = {}

    def task_started(self, name: str, total: int) -> None:
        bar = None
        if self.console.is_terminal:
            if self.bars is None:
                columns = (
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[detail]}"),
                )
                self.bars = Progress(*columns, console=self.console)
                self.bars.start()
            bar = self.bars.add_task(name, total=total, detail="")
        self.tasks[name] = _TaskState(bar, total)

    def task_advanced(self, name: str, completed: int, detail: str = "") -> None:
        task = self.tasks[name]
        if self.bars is not None and task.bar is not None:
            # The last finished tile, and how many are running or were retried.
            self.bars.update(task.bar, completed=completed, detail=detail)
        elif not detail:
            # Steps done before any work (verified tiles of a resumed run) do not count towards the ETA.
            task.skipped = completed
        elif name in TILE_TASKS:
            elapsed = time.perf_counter() - task.started
            eta = elapsed / max(completed - task.skipped, 1) * (task.total - completed)
            line = f"[{completed}/{task.total}] {detail}; elapsed {elapsed:.0f} s, ETA {eta:.0f} s"
            self.console.print(line, highlight=False)

    def task_finished(self, name: str) -> None:
        task = self.tasks.pop(name)
        if self.bars is not None and task.bar is not None:
            self.bars.remove_task(task.bar)
            if not self.tasks:
                self.bars.stop()
                self.bars = None
        elif name not in TILE_TASKS:
            self.console.print(f"{name}: done in {time.perf_counter() - task.started:.1f} s", highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def should_stop(self) -> bool:
        return self.stop_requested.is_set()


@contextmanager
def command_environment(progress: ConsoleProgress) -> Iterator[None]:
    """Logging, warning filters and signal handlers of one ``tiled`` command, restored afterwards.

    This package's warnings and errors reach the console as one line each (tracebacks go to the
    run's ``run.log``); Lightning's per-tile banners, known-harmless notices and, off a terminal,
    third-party progress bars are filtered only while the command runs, so other anomalib commands
    in the same process are untouched.
    """
    console_handler = logging.StreamHandler()
    console_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console_handler.setLevel(logging.WARNING)
    # Failures reach the console as the CLI's one line; their tracebacks belong in run.log.
    console_handler.addFilter(lambda record: not record.exc_info)
    package = logging.getLogger(PACKAGE_LOGGER)
    saved_propagate = package.propagate
    package.propagate = False
    package.addHandler(console_handler)
    quieted = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings(), _signals(progress), _progress_bars_off(not progress.console.is_terminal):
        filter_warnings()
        line_filters = filter_log_lines()
        try:
            yield
        finally:
            for logger, line_filter in line_filters:
                logger.removeFilter(line_filter)
            package.removeHandler(console_handler)
            package.propagate = saved_propagate
            for name, level in quieted.items():
                logging.getLogger(name).setLevel(level)


def quiet_libraries() -> None:
    """Keep Lightning's per-tile banners (devices, tips) off the console; call after importing Lightning."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _progress_bars_off(enabled: bool) -> Iterator[None]:
    """The bars of tqdm (anomalib's coreset sampler draws one per tile) off while ``enabled``, then restored.

    In a file or a pipe every update of a bar would be one more line of the log. ``TQDM_DISABLE`` is
    tqdm's own switch, but tqdm reads it only when imported: the variable reaches the worker processes
    started meanwhile, and the tqdm of this process, imported first so that it never reads it, gets
    the same default through its ``__init__``. A bar that sets ``disable`` itself keeps its choice.
    """
    if not enabled:
        yield
        return
    from tqdm import std  # noqa: PLC0415 - only off a terminal

    saved_init = vars(std.tqdm)["__init__"]
    saved_variable = os.environ.get("TQDM_DISABLE")
    std.tqdm.__init__ = functools.partialmethod(saved_init, disable=True)  # type: ignore[method-assign]
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        std.tqdm.__init__ = saved_init  # type: ignore[method-assign]
        if saved_variable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_variable


@contextmanager
def _signals(progress: ConsoleProgress) -> Iterator[None]:
    """SIGINT and SIGTERM become KeyboardInterrupt, and are remembered.

    An interrupt that lands in a ``__del__`` (garbage collection of a finished tile) is swallowed by
    Python; the remembered request stops the work at the next tile boundary.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum: int, frame: Any) -> NoReturn:
        del signum, frame
        progress.stop_requested.set()
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
