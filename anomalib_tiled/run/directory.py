"""Run directory: layout, manifest and atomic writes.

A run lives in ``<default_root_dir>/<Model>/<Dataset>/<category>/vN`` (anomalib's convention) with a
``latest`` link beside it::

    vN/
      config.yaml           fully resolved config; ``eval``/``predict`` need nothing else
      manifest.json         run state: per-tile checkpoints and the shared files each references
                            (size + sha256), status, evaluations
      weights/<tile>.ckpt   one Lightning checkpoint per tile position, its large tensors replaced by
                            references to shared files
      weights/shared/       <sha256>.safetensors: one tensor of at least 64 KiB each, named by its
                            content, stored once however many tiles hold it (a frozen pretrained
                            backbone is one set of files; a tile's own weights are files of its own)
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
a truncated file under its final name, and ``manifest.json`` says whether the run is complete. A
tile counts as done only while its checkpoint and every shared file its manifest entry lists match
their recorded size and sha256: a resumed run retrains the tiles that use a missing or corrupt
shared file (rewriting it), as it retrains a tile whose checkpoint is corrupt.
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

SHARED_DIR = "shared"
"""Folder of the shared weights files, inside the run's ``weights`` folder (see :mod:`anomalib_tiled.run.weights`)."""


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


def shared_file(weights_dir: Path, digest: str) -> Path:
    """File of the shared tensor whose sha256 is ``digest``, in a run's ``weights`` folder."""
    return weights_dir / SHARED_DIR / f"{digest}.safetensors"


def shared_file_error(path: Path, problem: str, root: Path) -> RunDirectoryError:
    """The one-line error of a shared weights file that is missing or corrupt.

    Args:
        path: The shared file.
        problem: ``"missing"``, or what is corrupt about it (in parentheses in the message).
        root: The run's ``vN`` folder.
    """
    fix = f"retrain the tiles that use it with 'anomalib tiled train --resume {root}'"
    if problem == "missing":
        return RunDirectoryError(f"{path}: shared weights file is missing; {fix}")
    return RunDirectoryError(f"{path}: shared weights file is corrupt ({problem}); delete it and {fix}")


def _matches(path: Path, recorded: dict[str, Any] | None) -> bool:
    """Whether ``path`` is a file of the recorded size and sha256."""
    if recorded is None or not path.is_file() or path.stat().st_size != recorded["size"]:
        return False
    return file_digest(path) == recorded


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

    def shared_path(self, digest: str) -> Path:
        """Shared weights file of the tensor whose sha256 is ``digest``."""
        return shared_file(self.root / "weights", digest)

    def shared_files(self, tile_name: str) -> list[tuple[Path, dict[str, Any]]]:
        """The shared files a finished tile's checkpoint references, with their recorded size and sha256.

        Tiles of runs older than the shared store reference none.
        """
        entry = self.manifest()["tiles"].get(tile_name) or {}
        return [(self.shared_path(shared["sha256"]), shared) for shared in entry.get("shared", [])]

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
        """The manifest entry of a finished tile whose checkpoint and shared files match their digests, else None."""
        entry = self.manifest()["tiles"].get(tile_name)
        if not entry or not _matches(self.checkpoint_path(tile_name), entry["checkpoint"]):
            return None
        return entry if all(_matches(path, recorded) for path, recorded in self.shared_files(tile_name)) else None

    def prune_shared(self) -> list[Path]:
        """Delete the files of ``weights/shared/`` that no tile of the manifest references.

        They are left by tile jobs that were killed or retrained with other results (and temporary
        files of killed writers). Only call it while no tile job runs, with every tile recorded: a
        file a recorded tile references is never deleted.

        Returns:
            The deleted files.
        """
        directory = self.root / "weights" / SHARED_DIR
        if not directory.is_dir():
            return []
        referenced = {path for tile in self.manifest()["tiles"] for path, _ in self.shared_files(tile)}
        removed = [path for path in directory.iterdir() if path.is_file() and path not in referenced]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def check_checkpoints(self) -> None:
        """Quick integrity check of every tile checkpoint and shared file: present and of the recorded size.

        The full sha256 is checked by :meth:`verify_checkpoint` whenever a checkpoint is loaded.

        Raises:
            RunDirectoryError: Naming the first missing or truncated checkpoint or shared file.
        """
        for tile_name in self.manifest()["tiles"]:
            self._check_checkpoint(tile_name, full=False)

    def verify_checkpoint(self, tile_name: str) -> Path:
        """Path of a tile checkpoint after checking its and its shared files' size and sha256 against the manifest.

        Raises:
            RunDirectoryError: If the checkpoint or a shared file it references is missing or does
                not match its recorded digest.
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
        for path, shared in self.shared_files(tile_name):
            self._check_shared(path, shared, full=full)
        return checkpoint

    def _check_shared(self, path: Path, recorded: dict[str, Any], *, full: bool) -> None:
        if not path.is_file():
            raise shared_file_error(path, "missing", self.root)
        if path.stat().st_size != recorded["size"]:
            raise shared_file_error(path, "its size differs from manifest.json", self.root)
        if full and file_digest(path) != recorded:
            raise shared_file_error(path, "size/sha256 differ from manifest.json", self.root)
