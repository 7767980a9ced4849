"""Tile datasets: the tiles at one grid position (or several) of every image of a split, from its image cache.

The tiles come from the split's decoded ``.npy`` cache, or from :class:`TileCrops`: that position's
tiles cut out of the cache beforehand, which is all a tile job needs when it runs where the run
directory is not (Ray's ``object_store`` storage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.tv_tensors import Mask

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.sources import UNKNOWN_LABEL
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.tiling import TilePosition


@dataclass
class TileCrops:
    """The tiles at one grid position of every image of a split, cut out of its cache.

    Attributes:
        images: ``(N, tile_h, tile_w, 3)`` uint8 tiles.
        masks: ``(N, tile_h, tile_w)`` uint8 mask tiles, or None without pixel ground truth.
    """

    images: np.ndarray
    masks: np.ndarray | None

    @classmethod
    def cut(cls, images: NpyFile, record: SplitRecord, position: TilePosition) -> TileCrops:
        """Read the tiles at ``position`` of every image (and mask), one image band at a time."""
        masks = record.masks
        return cls(_cut(images, position), None if masks is None else _cut(masks, position))

    @property
    def nbytes(self) -> int:
        """Bytes of the tiles (and masks)."""
        return self.images.nbytes + (0 if self.masks is None else self.masks.nbytes)


def _cut(source: NpyFile, position: TilePosition) -> np.ndarray:
    rows, cols = position.slices
    tiles = np.empty((len(source), position.height, position.width, *source.item_shape[2:]), source.dtype)
    for index in range(len(source)):
        tiles[index] = source.read_rows(index, rows.start, rows.stop)[:, cols]
    return tiles


class TileDataset(Dataset):
    """The tile at one grid position of every image of a split, read from the image cache or cut beforehand.

    Args:
        images: ``(N, H, W, 3)`` uint8 cache, or the tiles at ``position`` already cut out of it.
        record: The split's record (paths, labels, masks).
        position: Grid position to cut.
        augmentations: Optional torchvision transform applied to each tile (training only).
    """

    def __init__(
        self,
        images: NpyFile | TileCrops,
        record: SplitRecord,
        position: TilePosition,
        augmentations: Callable | None = None,
    ) -> None:
        self.images = images
        self.record = record
        # Cut tiles bring their masks: the record's mask file is not read.
        self.masks = images.masks if isinstance(images, TileCrops) else record.masks
        self.position = position
        self.augmentations = augmentations

    def __len__(self) -> int:
        return len(self.record)

    def _tile(self, source: NpyFile | np.ndarray, index: int) -> torch.Tensor:
        if isinstance(source, np.ndarray):
            return torch.from_numpy(source[index].copy())
        rows, cols = self.position.slices
        return torch.from_numpy(source.read_rows(index, rows.start, rows.stop)[:, cols].copy())

    def __getitem__(self, index: int) -> Any:
        from anomalib.data import ImageItem  # noqa: PLC0415

        images = self.images.images if isinstance(self.images, TileCrops) else self.images
        image = self._tile(images, index).permute(2, 0, 1).float().div_(255)
        label = self.record.labels[index]
        gt_mask = None
        if self.masks is not None and label != UNKNOWN_LABEL:
            gt_mask = self._tile(self.masks, index).bool()
            # A tile is anomalous only if the defect reaches into it.
            label = int(gt_mask.any())
        if self.augmentations is not None:
            if gt_mask is not None:
                image, gt_mask = self.augmentations(image, Mask(gt_mask))
            else:
                image = self.augmentations(image)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=None if label == UNKNOWN_LABEL else torch.tensor(label),
            image_path=self.record.image_paths[index],
            mask_path=self.record.mask_paths[index] or None,
        )


class GroupTileDataset(Dataset):
    """The tiles at several grid positions of every image of a split, for tile models predicted together.

    Each item is ``{"tiles": (n_positions, 3, tile_h, tile_w)}``, the crops :class:`TileDataset` gives
    for each position (the same pixels and values), read with one read of the rows they span.

    Args:
        images: ``(N, H, W, 3)`` uint8 cache.
        record: The split's record.
        positions: Grid positions to cut, all of one tile size.
    """

    def __init__(self, images: NpyFile, record: SplitRecord, positions: Sequence[TilePosition]) -> None:
        self.images = images
        self.record = record
        self.positions = list(positions)
        self.top = min(position.top for position in self.positions)
        self.bottom = max(position.top + position.height for position in self.positions)

    def __len__(self) -> int:
        return len(self.record)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        band = self.images.read_rows(index, self.top, self.bottom)
        crops = [
            band[position.top - self.top : position.top - self.top + position.height, position.slices[1]]
            for position in self.positions
        ]
        tiles = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255)
        return {"tiles": tiles}


def group_tile_loader(dataset: GroupTileDataset, batch_size: int) -> DataLoader:
    """DataLoader of a :class:`GroupTileDataset`, in order, ``batch_size`` images (each with all its tiles) a batch."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def tile_loader(dataset: TileDataset, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """DataLoader of tiles; reading crops from the cache is cheap, so no worker processes."""
    from anomalib.data import ImageBatch  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=ImageBatch.collate, generator=generator
    )
