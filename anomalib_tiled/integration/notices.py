"""Known third-party notices that say nothing about a ``tiled`` command, filtered only while one runs.

anomalib's CLI imports every model at start-up, which emits deprecation warnings of timm and of
anomalib's own modules, then logs that OpenVINO is missing and that pipelines are experimental —
twice, through two handlers. Those exact lines are dropped in processes running ``anomalib tiled``
(and in ``anomalib-tiled``/``python -m anomalib_tiled``); any other warning or log record still shows,
and other anomalib commands are untouched.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated"),
    (FutureWarning, r"The anomalib\.models\.components\.dinov2 package is deprecated"),
    # Lightning's notes on memory-bank models (no optimizer, frozen backbone in eval mode).
    (UserWarning, r"`LightningModule\.configure_optimizers` returned `None`"),
    (UserWarning, r"Found .* module\(s\) in eval mode"),
    (Warning, r"`isinstance\(treespec, LeafSpec\)`"),
)
KNOWN_LOG_LINES = {
    "anomalib.cli.utils.openvino": "OpenVINO is possibly not installed",
    "anomalib.cli.pipelines": "This feature is experimental",
    # Tile models are handed to Engine.predict in memory, never through a checkpoint path.
    "anomalib.engine.engine": "ckpt_path is not provided",
}


def is_tiled_command(argv: list[str]) -> bool:
    """Whether this process is ``anomalib tiled ...``."""
    return len(argv) > 1 and argv[1] == "tiled" and argv[0].rsplit("/", 1)[-1].startswith("anomalib")


def filter_warnings() -> None:
    """Ignore the known warnings (call inside ``warnings.catch_warnings()`` to scope it)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def filter_log_lines() -> list[tuple[logging.Logger, logging.Filter]]:
    """Drop the known log lines at their loggers, so no handler prints them; returns what was added."""
    added = [(logging.getLogger(name), _DropStartingWith(start)) for name, start in KNOWN_LOG_LINES.items()]
    for logger, line_filter in added:
        logger.addFilter(line_filter)
    return added


class _DropStartingWith(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)
