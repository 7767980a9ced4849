"""Progress reporting: the library says what it is doing, the application decides how to show it.

Stages report through a :class:`ProgressListener`; the default one shows nothing. The command line
passes one that draws rich progress bars on a terminal and plain lines elsewhere (see
:mod:`anomalib_tiled.cli.console`). A listener can also ask the work to stop at the next tile
boundary (:meth:`ProgressListener.should_stop`), the way a Lightning callback sets
``trainer.should_stop``.
"""

from __future__ import annotations


class ProgressListener:
    """Receives progress of the stages of a run; every method is optional (no-op by default)."""

    def task_started(self, name: str, total: int) -> None:
        """A task of ``total`` steps (images, tiles) starts."""

    def task_advanced(self, name: str, completed: int, detail: str = "") -> None:
        """``completed`` steps of task ``name`` are done; ``detail`` says what was just finished."""

    def task_finished(self, name: str) -> None:
        """Task ``name`` is done."""

    def message(self, text: str) -> None:
        """Something the user should know (where results went, ...)."""

    def should_stop(self) -> bool:
        """Whether the user asked to stop (checked between tiles)."""
        return False


class Task:
    """One task reported to a listener; a context manager that always reports its end.

    Args:
        listener: Who is told.
        name: Task description (``Training tile models``...).
        total: Number of steps.
    """

    def __init__(self, listener: ProgressListener, name: str, total: int) -> None:
        self.listener = listener
        self.name = name
        self.total = total
        self.completed = 0

    def __enter__(self) -> Task:  # noqa: PYI034 - final in practice; Self needs Python 3.11
        self.listener.task_started(self.name, self.total)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.task_finished(self.name)

    def advance(self, steps: int = 1, detail: str = "") -> None:
        """Report ``steps`` more steps done."""
        self.update(self.completed + steps, detail)

    def update(self, completed: int, detail: str = "") -> None:
        """Report ``completed`` steps done."""
        self.completed = completed
        self.listener.task_advanced(self.name, completed, detail)
