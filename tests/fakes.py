"""Small builders shared by the unit tests: prediction stores, split records and image files, no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.run.store import PredictionStore


def write_tile(
    store: PredictionStore,
    tile: str,
    maps: np.ndarray,
    fingerprint: str,
    scores: np.ndarray | None = None,
    batch: int = 2,
) -> None:
    """Write one tile's ``(N, h, w)`` maps (and scores) through a :class:`TileWriter`, ``batch`` images at a time."""
    writer = store.open_tile(tile, len(maps), tuple(maps.shape[1:]))
    for start in range(0, len(maps), batch):
        chunk_scores = None if scores is None else torch.as_tensor(scores[start : start + batch])
        writer.write(torch.as_tensor(maps[start : start + batch]), chunk_scores)
    writer.finish(fingerprint)


def make_record(directory: Path, labels: list[int], masks: np.ndarray | None = None) -> SplitRecord:
    """A saved split of ``len(labels)`` images named ``img<i>.png``, with ``masks.npy`` if ``masks`` is given."""
    directory.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        NpyFile.create(directory / "masks.npy", masks.shape, np.uint8).write(0, masks.astype(np.uint8))
    paths = [f"img{index}.png" for index in range(len(labels))]
    record = SplitRecord(directory, paths, [""] * len(labels), list(labels), masks is not None)
    record.save()
    return record


def write_png(path: Path, pixels: np.ndarray) -> str:
    """Save ``(H, W, 3)`` or ``(H, W)`` uint8 pixels as a PNG; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)
