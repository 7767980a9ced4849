"""Tile grid: where each tile sits in an image, and how tiles go back together.

Pure geometry on tensors, no Lightning. A grid is fully described by the image size, the tile
size and the stride, so cutting and merging carry no hidden per-call state.

When the tiles do not divide the image, the last tile of a row or column is *snapped* to the image
edge (it overlaps its neighbour more) instead of zero-padding the image: padded black strips are
out of distribution for the tile models and show up as false anomalies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch

Size = tuple[int, int]


class Blending(str, Enum):
    """How overlapping tile predictions are weighted when merged."""

    MEAN = "mean"
    HANN = "hann"
    GAUSSIAN = "gaussian"


def to_pair(value: int | Sequence[int], name: str) -> Size:
    """Turn an int or a two-element sequence into an ``(height, width)`` pair.

    Args:
        value: ``n`` or ``[h, w]``.
        name: Key name used in the error message.

    Returns:
        The ``(height, width)`` pair.

    Raises:
        ValueError: If ``value`` is neither an int nor a pair of ints.
    """

    def is_int(item: object) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    if is_int(value):
        return (int(value), int(value))  # type: ignore[arg-type]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(map(is_int, value)):
        return (int(value[0]), int(value[1]))
    msg = f"{name}: expected an int or [height, width], got {value!r}"
    raise ValueError(msg)


def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start offsets of tiles along one axis, the last one snapped to the edge.

    Args:
        length: Image length along the axis.
        tile: Tile length along the axis (``<= length``).
        stride: Step between tile starts (``1 <= stride <= tile``).

    Returns:
        Sorted, unique start offsets; together the tiles cover ``[0, length)``.
    """
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TilePosition:
    """One tile of the grid.

    Attributes:
        index: Position in row-major order, also the index of its model.
        row: Grid row.
        col: Grid column.
        top: First pixel row in the image.
        left: First pixel column in the image.
        height: Tile height.
        width: Tile width.
    """

    index: int
    row: int
    col: int
    top: int
    left: int
    height: int
    width: int

    @property
    def name(self) -> str:
        """Stable name used for checkpoints and prediction files."""
        return f"tile_r{self.row}_c{self.col}"

    @property
    def slices(self) -> tuple[slice, slice]:
        """Row and column slices of this tile in the image."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class TileGrid:
    """Geometry of a tiled image.

    Args:
        image_size: ``(height, width)`` of the image the grid covers.
        tile_size: ``(height, width)`` of one tile.
        stride: ``(vertical, horizontal)`` step between tiles.

    Raises:
        ValueError: If a tile is larger than the image or the stride is not in ``[1, tile]``.

    Example:
        >>> grid = TileGrid((512, 512), (256, 256), (256, 256))
        >>> len(grid)
        4
    """

    image_size: Size
    tile_size: Size
    stride: Size

    def __post_init__(self) -> None:
        for axis, (length, tile, step) in enumerate(zip(self.image_size, self.tile_size, self.stride, strict=True)):
            label = "height" if axis == 0 else "width"
            if tile <= 0:
                msg = f"tiling.tile_size: tile {label} must be > 0, got {tile}"
                raise ValueError(msg)
            if tile > length:
                msg = (
                    f"tiling.tile_size: tile {label} {tile} is larger than the image {label} {length}; "
                    f"use a tile_size <= {length} or a larger image_size"
                )
                raise ValueError(msg)
            if step <= 0:
                msg = f"tiling.stride: stride must be > 0, got {step}; use a stride between 1 and the tile size {tile}"
                raise ValueError(msg)
            if step > tile:
                msg = (
                    f"tiling.stride: stride {step} is larger than the tile {label} {tile}, which leaves pixels "
                    f"no tile covers; use a stride <= {tile}"
                )
                raise ValueError(msg)

    @classmethod
    def create(
        cls,
        image_size: int | Sequence[int],
        tile_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
    ) -> TileGrid:
        """Build a grid from ints or pairs; ``stride`` defaults to the tile size (no overlap)."""
        tile = to_pair(tile_size, "tiling.tile_size")
        return cls(
            image_size=to_pair(image_size, "tiling.image_size"),
            tile_size=tile,
            stride=tile if stride is None else to_pair(stride, "tiling.stride"),
        )

    @cached_property
    def row_starts(self) -> tuple[int, ...]:
        """Top offsets of the tile rows."""
        return tile_starts(self.image_size[0], self.tile_size[0], self.stride[0])

    @cached_property
    def col_starts(self) -> tuple[int, ...]:
        """Left offsets of the tile columns."""
        return tile_starts(self.image_size[1], self.tile_size[1], self.stride[1])

    @property
    def shape(self) -> Size:
        """Number of tile ``(rows, columns)``."""
        return len(self.row_starts), len(self.col_starts)

    @cached_property
    def positions(self) -> tuple[TilePosition, ...]:
        """All tiles in row-major order."""
        height, width = self.tile_size
        return tuple(
            TilePosition(r * len(self.col_starts) + c, r, c, top, left, height, width)
            for r, top in enumerate(self.row_starts)
            for c, left in enumerate(self.col_starts)
        )

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):  # noqa: ANN204 - iterator of TilePosition
        return iter(self.positions)

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """Cut a batch into tiles.

        Args:
            images: ``(..., H, W)`` tensor with ``(H, W) == image_size``.

        Returns:
            ``(..., n_tiles, tile_h, tile_w)`` tensor in the order of :attr:`positions`.
        """
        self._check_size(images)
        return torch.stack([images[..., p.slices[0], p.slices[1]] for p in self.positions], dim=-3)

    def untile(self, tiles: torch.Tensor, blending: Blending | str = Blending.MEAN) -> torch.Tensor:
        """Merge tiles back into images, blending where they overlap.

        Args:
            tiles: ``(..., n_tiles, tile_h, tile_w)`` tensor as returned by :meth:`tile`.
            blending: Weighting of overlapping pixels.

        Returns:
            ``(..., H, W)`` tensor.
        """
        window = self.window(blending).to(tiles.device, tiles.dtype)
        merged = tiles.new_zeros((*tiles.shape[:-3], *self.image_size))
        for position in self.positions:
            rows, cols = position.slices
            merged[..., rows, cols] += tiles[..., position.index, :, :] * window
        return merged / self.weight_sum(blending).to(tiles.device, tiles.dtype)

    def window(self, blending: Blending | str = Blending.MEAN) -> torch.Tensor:
        """Per-pixel weight of a tile prediction, ``(tile_h, tile_w)``, strictly positive."""
        return _window(self.tile_size, Blending(blending))

    def weight_sum(self, blending: Blending | str = Blending.MEAN) -> torch.Tensor:
        """Sum of the windows of all tiles covering each pixel, ``(H, W)``."""
        return _weight_sum(self, Blending(blending))

    def seam_mask(self, width: float) -> torch.Tensor:
        """Boolean ``(H, W)`` mask of the bands around every tile border inside the image.

        Each band is centred on a tile edge (tile starts and tile ends alike, whatever the stride) and
        is ``width * tile`` pixels wide (at least the two pixels touching the border), ``tile`` being
        the tile height for horizontal seams and the tile width for vertical ones.

        Args:
            width: Band width as a fraction of the tile size.

        Returns:
            The seam mask.
        """
        return _seam_mask(self, float(width))

    def _check_size(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != self.image_size:
            msg = f"expected images of size {self.image_size}, got {tuple(images.shape[-2:])}"
            raise ValueError(msg)


@functools.cache
def _window(tile_size: Size, blending: Blending) -> torch.Tensor:
    # Cached like the weight sums, so that exported graphs hold the window as a constant.
    if blending == Blending.MEAN:
        return torch.ones(tile_size)
    axes = []
    for length in tile_size:
        # Centres of pixels in (0, 1): the window never reaches zero, so every pixel keeps a weight.
        position = (torch.arange(length, dtype=torch.float64) + 0.5) / length
        if blending == Blending.HANN:
            axes.append(torch.sin(math.pi * position) ** 2)
        else:
            axes.append(torch.exp(-0.5 * ((position - 0.5) / 0.25) ** 2))
    return torch.outer(axes[0], axes[1]).float()


_WEIGHT_CACHE: dict[tuple[TileGrid, Blending], torch.Tensor] = {}
_SEAM_CACHE: dict[tuple[TileGrid, float], torch.Tensor] = {}


def _weight_sum(grid: TileGrid, blending: Blending) -> torch.Tensor:
    key = (grid, blending)
    if key not in _WEIGHT_CACHE:
        window = _window(grid.tile_size, blending)
        total = torch.zeros(grid.image_size)
        for position in grid.positions:
            rows, cols = position.slices
            total[rows, cols] += window
        _WEIGHT_CACHE[key] = total
    return _WEIGHT_CACHE[key]


def _band(length: int, edges: set[int], half_before: int, half_after: int) -> torch.Tensor:
    band = torch.zeros(length, dtype=torch.bool)
    for edge in edges:
        band[max(edge - half_before, 0) : min(edge + half_after, length)] = True
    return band


def _seam_mask(grid: TileGrid, width: float) -> torch.Tensor:
    key = (grid, width)
    if key not in _SEAM_CACHE:
        bands = []
        for length, tile, starts in (
            (grid.image_size[0], grid.tile_size[0], grid.row_starts),
            (grid.image_size[1], grid.tile_size[1], grid.col_starts),
        ):
            # Interior borders only: the image edge itself is no seam.
            edges = {e for start in starts for e in (start, start + tile) if 0 < e < length}
            # At least the two pixels touching the border, one on each side.
            band_width = max(2, round(width * tile))
            bands.append(_band(length, edges, band_width // 2, band_width - band_width // 2))
        rows, cols = bands
        _SEAM_CACHE[key] = rows[:, None] | cols[None, :]
    return _SEAM_CACHE[key]
