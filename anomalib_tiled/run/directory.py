"""Run directory: layout, manifest and atomic writes.

A run lives in ``<default_root_dir>/<Model>/<Dataset>/<category>/vN`` (anomalib's convention) with a
``latest`` link beside it::

    vN/
      config.yaml           fully resolved config; ``eval``/``predict`` need nothing else
      manifest.json         run state: per-tile checkpoints (size + sha256), status, evaluations
      weights/<tile>.ckpt   one Lightning checkpoint per tile position
      splits/<split>/       image paths, labels and masks of each split at the tiled image size
                            (``splits/<fingerprint>/`` for test sets evaluated later)
      predictions/<fp>/     raw tile predictions (``.npy``) per split content fingerprint, streamed
                            to disk; identical splits (test = validation) share them
      tiles/<tile>/         the tile's Lightning working folder (loggers write there)
      cache/                decoded images while training or predicting (removed afterwards)
      stats.json            normalisation / threshold statistics learned on validation
      eval/vN/              one folder per evaluation: metrics, predictions.csv, images/
      predict/vN/           one folder per ``predict`` call
      run.log               full log, tracebacks included

Every file a later stage trusts is written to a temporary name and renamed, so a crash never leaves
a truncated file under its final name, and ``manifest.json`` says whether the run is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from anomalib_tiled.errors import RunDirectoryError

MANIFEST_FORMAT = 1


class RunStatus:
    """Values of ``manifest.json``'s ``status``."""

    TRAINING = "training"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    TRAINED = "trained"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as recorded in the manifest."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _versions(parent: Path) -> list[int]:
    if not parent.is_dir():
        return []
    return [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))]


def latest_version(parent: Path) -> Path | None:
    """``parent/vN`` with the largest N, or None when there is none."""
    versions = _versions(parent)
    return parent / f"v{max(versions)}" if versions else None


def next_version_dir(parent: Path) -> Path:
    """Create and return ``parent/vN`` with the next free N, and point ``parent/latest`` at it."""
    parent.mkdir(parents=True, exist_ok=True)
    version = parent / f"v{max(_versions(parent), default=-1) + 1}"
    version.mkdir()
    latest = parent / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(version.name, target_is_directory=True)
    return version


class RunDirectory:
    """Paths and manifest of one run.

    Args:
        root: The run's ``vN`` folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def create(cls, default_root_dir: Path, model: str, dataset: str, category: str) -> RunDirectory:
        """Create a new versioned run below ``default_root_dir`` and write its initial manifest."""
        parent = Path(default_root_dir) / model / dataset
        if category:
            parent /= category
        run = cls(next_version_dir(parent))
        run.write_manifest(
            {
                "format": MANIFEST_FORMAT,
                "status": RunStatus.TRAINING,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tiles": {},
                "evaluations": [],
            },
        )
        return run

    @classmethod
    def open(cls, root: Path | str, *, require_trained: bool = True, option: str = "--root") -> RunDirectory:
        """Open an existing run, checking it is one and (by default) that training finished.

        Args:
            root: The run's ``vN`` folder, or the folder holding its ``latest`` link.
            require_trained: Also require a finished run with intact checkpoints.
            option: Command-line option named in error messages.

        Raises:
            RunDirectoryError: If ``root`` is not a run, or an unfinished one.
        """
        if not str(root).strip():
            msg = f"{option}: empty path; pass the run directory printed by 'anomalib tiled train'"
            raise RunDirectoryError(msg)
        root = Path(root)
        if root.name == "latest" or ((root / "latest").is_dir() and not (root / "manifest.json").exists()):
            root = (root / "latest").resolve() if (root / "latest").is_dir() else root.resolve()
        run = cls(root)
        if not root.is_dir():
            msg = f"{option}: {root} does not exist; pass the run directory printed by 'anomalib tiled train'"
            raise RunDirectoryError(msg)
        if not run.manifest_path.is_file() or not run.config_path.is_file():
            msg = (
                f"{option}: {root} is not a tiled-ensemble run (no manifest.json/config.yaml); "
                "pass the vN directory printed by 'anomalib tiled train'"
            )
            raise RunDirectoryError(msg)
        if require_trained:
            if run.manifest()["status"] != RunStatus.TRAINED:
                msg = (
                    f"{option}: the run in {root} is unfinished (status: {run.manifest()['status']}); "
                    f"finish it with 'anomalib tiled train --resume {root}'"
                )
                raise RunDirectoryError(msg)
            run.check_checkpoints()
        return run

    @property
    def manifest_path(self) -> Path:
        """``manifest.json``."""
        return self.root / "manifest.json"

    @property
    def config_path(self) -> Path:
        """``config.yaml``."""
        return self.root / "config.yaml"

    @property
    def stats_path(self) -> Path:
        """``stats.json``."""
        return self.root / "stats.json"

    @property
    def log_path(self) -> Path:
        """``run.log``."""
        return self.root / "run.log"

    def checkpoint_path(self, tile_name: str) -> Path:
        """Checkpoint of one tile position."""
        return self.root / "weights" / f"{tile_name}.ckpt"

    def split_dir(self, split: str) -> Path:
        """Paths, labels and masks of a split."""
        return self.root / "splits" / split

    def predictions_dir(self, split: str) -> Path:
        """Raw tile predictions of a split."""
        return self.root / "predictions" / split

    def new_output_dir(self, kind: str) -> Path:
        """New ``eval/vN`` or ``predict/vN`` folder."""
        return next_version_dir(self.root / kind)

    def manifest(self) -> dict[str, Any]:
        """The manifest as a dict.

        Raises:
            RunDirectoryError: If it cannot be read.
        """
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            msg = f"{self.manifest_path}: unreadable run manifest ({error}); the run is corrupt, train it again"
            raise RunDirectoryError(msg) from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest atomically."""
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def update_manifest(self, **changes: Any) -> dict[str, Any]:
        """Apply top-level changes to the manifest and write it."""
        manifest = self.manifest()
        manifest.update(changes)
        self.write_manifest(manifest)
        return manifest

    def record_tile(self, tile_name: str, entry: dict[str, Any]) -> None:
        """Mark a tile finished, with its checkpoint digest and prediction files."""
        manifest = self.manifest()
        manifest["tiles"][tile_name] = entry
        self.write_manifest(manifest)

    def verified_tile(self, tile_name: str) -> dict[str, Any] | None:
        """The manifest entry of a finished tile whose checkpoint still matches its digest, else None."""
        entry = self.manifest()["tiles"].get(tile_name)
        checkpoint = self.checkpoint_path(tile_name)
        if not entry or not checkpoint.is_file() or checkpoint.stat().st_size != entry["checkpoint"]["size"]:
            return None
        return entry if file_digest(checkpoint) == entry["checkpoint"] else None

    def check_checkpoints(self) -> None:
        """Quick integrity check of every tile checkpoint: present and of the recorded size.

        The full sha256 is checked by :meth:`verify_checkpoint` whenever a checkpoint is loaded.

        Raises:
            RunDirectoryError: Naming the first missing or truncated checkpoint.
        """
        for tile_name in self.manifest()["tiles"]:
            self._check_checkpoint(tile_name, full=False)

    def verify_checkpoint(self, tile_name: str) -> Path:
        """Path of a tile checkpoint after checking its size and sha256 against the manifest.

        Raises:
            RunDirectoryError: If the checkpoint is missing or does not match its recorded digest.
        """
        return self._check_checkpoint(tile_name, full=True)

    def _check_checkpoint(self, tile_name: str, *, full: bool) -> Path:
        checkpoint = self.checkpoint_path(tile_name)
        entry = self.manifest()["tiles"].get(tile_name)
        fix = f"retrain it with 'anomalib tiled train --resume {self.root}'"
        if not checkpoint.is_file():
            msg = f"{checkpoint}: tile checkpoint is missing; {fix}"
            raise RunDirectoryError(msg)
        recorded = entry["checkpoint"] if entry else None
        if recorded is None or checkpoint.stat().st_size != recorded["size"]:
            msg = f"{checkpoint}: tile checkpoint is corrupt (its size differs from manifest.json); delete it and {fix}"
            raise RunDirectoryError(msg)
        if full and file_digest(checkpoint) != recorded:
            msg = (
                f"{checkpoint}: tile checkpoint is corrupt (size/sha256 differ from manifest.json); delete it and {fix}"
            )
            raise RunDirectoryError(msg)
        return checkpoint
