"""Tile jobs without the run directory: what a job reads travels to it, the files it wrote travel back.

With ``execution.ray.storage: object_store`` the workers see neither the data nor the run
directory. The process that owns the run packs each job a :class:`Parcel` (:func:`pack`): the run
files the job reads (``reads()``: a prediction job's checkpoint, its shared weights files and the
manifest they are verified against) and, for each split the job reads, only the job's tiles cut
out of the split's image cache. The worker writes the files into a private folder laid out like the
run directory, runs the job there (:func:`unpack`) and sends back every file the job wrote under it
(:func:`collect`), whatever they are (checkpoints, stored predictions, shared weights files,
loggers' files), each with its size and sha256, except those the run already holds intact (a
frozen backbone's shared files, once a tile recorded them). The owner checks each file against its
digest and writes it into the run directory (:func:`deliver`), before the job's ``finish`` records
it: the run still has one writer.

A job travels if it is a dataclass with a ``context`` (:class:`~anomalib_tiled.execution.jobs.TileContext`),
one tile ``position`` and :class:`~anomalib_tiled.execution.jobs.TileSplit` fields (or lists of
them); its splits are found and moved by their type, whatever the job's class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.tiles import TileCrops
from anomalib_tiled.errors import RunDirectoryError
from anomalib_tiled.execution.jobs import TileJobBase, TileSplit
from anomalib_tiled.run.directory import RunDirectory, atomic_path
from anomalib_tiled.run.store import PredictionStore


@dataclass(frozen=True)
class RunFile:
    """One file of a run directory, in memory.

    Attributes:
        path: Its path relative to the run directory (POSIX separators).
        data: Its bytes.
        digest: Its size and sha256 where it was read (as ``file_digest`` records them).
    """

    path: str
    data: bytes
    digest: dict[str, Any]

    @classmethod
    def read(cls, root: Path, path: Path) -> RunFile:
        """The file ``path`` of the run directory ``root``."""
        data = path.read_bytes()
        return cls(path.relative_to(root).as_posix(), data, bytes_digest(data))


@dataclass
class Parcel:
    """What a tile job detached from the run directory gets.

    Attributes:
        files: The run files the job reads besides its splits (``TileJobBase.reads``).
        crops: The job's tiles of each split it reads, in the order of :func:`job_splits`.
        present: Files the run directory already holds intact (relative path -> size and sha256):
            the job's identical copies are not sent back.
    """

    files: list[RunFile] = field(default_factory=list)
    crops: list[TileCrops] = field(default_factory=list)
    present: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the files and tiles."""
        return sum(len(item.data) for item in self.files) + sum(crops.nbytes for crops in self.crops)


def bytes_digest(data: bytes) -> dict[str, Any]:
    """Size and sha256 of ``data``, in the form of ``run.directory.file_digest``."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def pack(job: TileJobBase, present: dict[str, dict[str, Any]] | None = None) -> Parcel:
    """The parcel of ``job``, read in the process that owns the run: one tile position's share only.

    Args:
        job: A tile job of one position.
        present: Files the run already holds intact (see :attr:`Parcel.present`).
    """
    root = job.context.run.root
    files = [RunFile.read(root, path) for path in job.reads()]
    crops = []
    for split in job_splits(job):
        assert isinstance(split.images, NpyFile), "a job is packed from the run's image cache"
        crops.append(TileCrops.cut(split.images, split.record, job.position))
    return Parcel(files, crops, dict(present or {}))


def unpack(job: TileJobBase, parcel: Parcel, root: Path) -> TileJobBase:
    """``job`` working in the empty folder ``root`` (in the worker): the parcel's files written there."""
    for item in parcel.files:
        target = _inside(root, item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(item.data)
    return detach(job, root, parcel.crops)


def job_splits(job: TileJobBase) -> list[TileSplit]:
    """The splits ``job`` reads: its :class:`TileSplit` fields (and lists of them), in field order."""
    found: list[TileSplit] = []
    _map_splits(job, lambda split: found.append(split) or split)
    return found


def detach(job: TileJobBase, root: Path, crops: list[TileCrops]) -> TileJobBase:
    """``job`` working in ``root`` instead of its run directory, reading ``crops`` (one per :func:`job_splits`).

    Its prediction stores move to the same place under ``root``; a split record's folder stays as
    it is (``predict`` keeps it in its output folder) since it is not read: masks come with the crops.

    Raises:
        RunDirectoryError: If a prediction store is outside the run directory.
    """
    run, remaining = job.context.run.root, iter(crops)

    def moved(split: TileSplit) -> TileSplit:
        store = None if split.store is None else PredictionStore(_moved(split.store.directory, run, root))
        return replace(split, images=next(remaining), store=store)

    detached = _map_splits(job, moved)
    return replace(detached, context=replace(job.context, run=RunDirectory(root)))


def _map_splits(job: TileJobBase, change: Callable[[TileSplit], TileSplit]) -> TileJobBase:
    def value(item: Any) -> Any:
        if isinstance(item, TileSplit):
            return change(item)
        return [value(element) for element in item] if isinstance(item, list) else item

    return replace(job, **{item.name: value(getattr(job, item.name)) for item in fields(job) if item.name != "context"})


def _moved(path: Path, run: Path, root: Path) -> Path:
    try:
        return root / Path(path).relative_to(run)
    except ValueError:
        msg = (
            f"{path}: outside the run directory {run}, so it cannot travel to a tile job; "
            "use execution.ray.storage: shared"
        )
        raise RunDirectoryError(msg) from None


def collect(root: Path, parcel: Parcel) -> list[RunFile]:
    """Every file the job wrote under ``root`` (in the worker), in the order it finished them.

    A marker written last (a tile's prediction ``.json``) stays last; the parcel's own files come
    back only if the job changed them.
    """
    held = {**parcel.present, **{item.path: item.digest for item in parcel.files}}
    paths = sorted((path for path in root.rglob("*") if path.is_file()), key=lambda p: (p.stat().st_mtime_ns, p))
    written = (RunFile.read(root, path) for path in paths)
    return [item for item in written if held.get(item.path) != item.digest]


def deliver(root: Path, files: list[RunFile]) -> int:
    """Check the files a job sent back and write them into the run directory ``root``, atomically, in order.

    Returns:
        The bytes written.

    Raises:
        RunDirectoryError: If a file's bytes do not match the digest its worker computed, or its
            path leaves the run directory.
    """
    for item in files:
        target = _inside(root, item.path)
        if bytes_digest(item.data) != item.digest:
            msg = (
                f"{target}: the file a tile job sent back does not match its size/sha256 (damaged in transfer); "
                "run the command again (train: --resume)"
            )
            raise RunDirectoryError(msg)
        with atomic_path(target) as temporary:
            temporary.write_bytes(item.data)
    return sum(len(item.data) for item in files)


def _inside(root: Path, relative: str) -> Path:
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        msg = f"{relative}: not a path inside the run directory {root}; the tile job's files cannot be written"
        raise RunDirectoryError(msg)
    return root.joinpath(*path.parts)
