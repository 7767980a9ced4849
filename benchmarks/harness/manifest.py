"""What a run of ours records about itself in ``manifest.json``: stage, tile and evaluation seconds, evaluations.

The keys read (written by ``anomalib_tiled.run``): ``training_seconds`` (the whole training session),
``training_stages`` (``decode``, ``tiles``, ``statistics``: wall seconds of each), ``tiles.<name>.seconds``
(wall time of that tile's fit job, its predictions included) and ``evaluations`` (one entry per
evaluation: its folder ``dir``, ``metrics`` and wall ``seconds``, oldest first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's ``manifest.json``, or ``{}`` when it has none."""
    path = run_dir / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass(frozen=True)
class RunTimes:
    """Wall seconds a run recorded; None (or empty) where the manifest has no such entry.

    Attributes:
        training_s: The training session: set-up, every stage of :attr:`stages`, marking the run trained.
        stages: Seconds per training stage: ``decode`` (every split decoded once), ``tiles`` (every tile
            fitted and its predictions made, workers' start-up included), ``statistics``.
        tile_s: Seconds of each tile's own fit job (its predictions included), by tile name.
        evaluation_s: The latest evaluation.
    """

    training_s: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    tile_s: dict[str, float] = field(default_factory=dict)
    evaluation_s: float | None = None

    @classmethod
    def of(cls, run_dir: Path) -> RunTimes:
        """The times in ``run_dir/manifest.json``."""
        manifest = read_manifest(run_dir)
        evaluations = manifest.get("evaluations") or [{}]
        tiles = manifest.get("tiles") or {}
        return cls(
            training_s=manifest.get("training_seconds"),
            stages=dict(manifest.get("training_stages") or {}),
            tile_s={name: entry["seconds"] for name, entry in tiles.items() if "seconds" in entry},
            evaluation_s=evaluations[-1].get("seconds"),
        )


def latest_metrics_file(run_dir: Path) -> Path | None:
    """``metrics.json`` of the run's latest evaluation (the last one its manifest records), if it exists."""
    evaluations = read_manifest(run_dir).get("evaluations") or []
    if not evaluations:
        return None
    path = run_dir / evaluations[-1]["dir"] / "metrics.json"
    return path if path.is_file() else None
