"""Errors users can fix themselves.

Every stage raises :class:`TiledEnsembleError` (or a subclass) with a one-line message that names the
bad input and how to fix it. The CLI prints that line and exits non-zero without a traceback; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TiledEnsembleError(Exception):
    """An error caused by the user's input, config, data or run directory."""


class ConfigError(TiledEnsembleError, ValueError):
    """The configuration is invalid."""


class DataError(TiledEnsembleError):
    """The dataset cannot be used (missing, empty, corrupt files, size mismatches)."""


class RunDirectoryError(TiledEnsembleError):
    """A run directory is missing, incomplete or corrupt."""


class TileJobError(TiledEnsembleError):
    """A tile job raised or its worker kept dying; the message names the tile and the cause."""


class ClusterError(TiledEnsembleError):
    """The Ray cluster was lost (its head stopped answering); the tiles finished so far are kept."""


class ExportError(TiledEnsembleError):
    """A run cannot be exported, or an exported artifact cannot be run."""


class RunInterruptedError(TiledEnsembleError):
    """Training was interrupted; finished tiles are kept and the run can be resumed."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Suffix suggesting the closest candidate to a misspelled ``name``, or an empty string."""
    candidates = list(candidates)
    lowered = {candidate.lower(): candidate for candidate in candidates}
    if name.lower() in lowered:
        return f" (did you mean '{lowered[name.lower()]}'?)"
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
