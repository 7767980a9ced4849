"""The run's ``run.log``: this package's log records, tracebacks included, copied into the run.

Signal handlers and the console belong to the application (the CLI), not to this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

PACKAGE_LOGGER = "anomalib_tiled"


class RunLog:
    """While active, this package's records (INFO and up) are appended to ``run.log``.

    Records still propagate as usual; what reaches a console is the application's logging
    configuration. Tracebacks of failures go to the file only.

    Args:
        path: The run's ``run.log``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handler: logging.FileHandler | None = None
        self.saved_level = logging.NOTSET

    def __enter__(self) -> RunLog:  # noqa: PYI034 - final in practice; Self needs Python 3.11
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        package = logging.getLogger(PACKAGE_LOGGER)
        self.saved_level = package.level
        if package.getEffectiveLevel() > logging.INFO:
            package.setLevel(logging.INFO)
        package.addHandler(self.handler)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.handler is not None
        if exc is not None:
            # Straight to the file: the application reports the failure its own way.
            record = logging.getLogger(PACKAGE_LOGGER).makeRecord(
                PACKAGE_LOGGER, logging.ERROR, __file__, 0, "Stopped by an error", (), (exc_type, exc, tb)
            )
            self.handler.handle(record)
        package = logging.getLogger(PACKAGE_LOGGER)
        package.removeHandler(self.handler)
        package.setLevel(self.saved_level)
        self.handler.close()
