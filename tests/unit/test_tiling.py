"""Tile grid geometry: coverage, snapping, round trips and seam bands for arbitrary sizes and strides."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_tiled.tiling import Blending, TileGrid, tile_starts


@st.composite
def grids(draw: st.DrawFn) -> TileGrid:
    """Any valid grid: tile <= image, 1 <= stride <= tile, per axis."""
    sizes = []
    for _ in range(2):
        length = draw(st.integers(1, 120))
        tile = draw(st.integers(1, length))
        stride = draw(st.integers(1, tile))
        sizes.append((length, tile, stride))
    (h, th, sh), (w, tw, sw) = sizes
    return TileGrid((h, w), (th, tw), (sh, sw))


@given(grids())
@settings(max_examples=200, deadline=None)
def test_tiles_cover_every_pixel_inside_the_image(grid: TileGrid) -> None:
    coverage = torch.zeros(grid.image_size, dtype=torch.int32)
    for position in grid:
        assert position.top >= 0 and position.left >= 0
        assert position.top + position.height <= grid.image_size[0]
        assert position.left + position.width <= grid.image_size[1]
        rows, cols = position.slices
        coverage[rows, cols] += 1
    assert int(coverage.min()) >= 1


@given(st.integers(1, 500), st.data())
def test_last_tile_is_snapped_to_the_edge_not_padded(length: int, data: st.DataObject) -> None:
    tile = data.draw(st.integers(1, length))
    stride = data.draw(st.integers(1, tile))
    starts = tile_starts(length, tile, stride)
    assert starts[0] == 0
    assert starts[-1] == length - tile
    assert list(starts) == sorted(set(starts))
    # Regular steps everywhere but (possibly) the snapped last one.
    assert all(b - a == stride for a, b in itertools.pairwise(starts[:-1]))


@given(grids(), st.sampled_from(list(Blending)), st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_untile_of_tile_reproduces_the_input(grid: TileGrid, blending: Blending, seed: int) -> None:
    images = torch.rand(2, 3, *grid.image_size, generator=torch.Generator().manual_seed(seed))  # reproducible
    tiles = grid.tile(images)
    assert tiles.shape == (2, 3, len(grid), *grid.tile_size)
    # float32 sums over up to ~3600 overlapping tiles (tile 60, stride 1) drift by up to ~5e-5.
    torch.testing.assert_close(grid.untile(tiles, blending), images, rtol=1e-4, atol=1e-4)


def test_overlaps_are_averaged_uniformly_by_default() -> None:
    grid = TileGrid.create(4, 2, 1)
    tiles = torch.stack([torch.full((2, 2), float(p.index)) for p in grid])
    merged = grid.untile(tiles)
    # The centre pixel (1, 1) is covered by tiles 0, 1, 3 and 4 of the 3x3 grid.
    assert merged[1, 1].item() == pytest.approx((0 + 1 + 3 + 4) / 4)


@given(grids(), st.floats(0.01, 1.0))
@settings(max_examples=150, deadline=None)
def test_seam_bands_sit_on_every_interior_tile_border(grid: TileGrid, width: float) -> None:
    mask = grid.seam_mask(width)
    (height, image_width), (tile_h, tile_w) = grid.image_size, grid.tile_size
    row_edges = {e for p in grid for e in (p.top, p.top + p.height) if 0 < e < height}
    col_edges = {e for p in grid for e in (p.left, p.left + p.width) if 0 < e < image_width}
    for edge in row_edges:
        # Pixels on both sides of every horizontal seam are smoothed, all along the row.
        assert bool(mask[edge].all()) and bool(mask[edge - 1].all())
    for edge in col_edges:
        assert bool(mask[:, edge].all()) and bool(mask[:, edge - 1].all())
    band_h, band_w = max(2, round(width * tile_h)), max(2, round(width * tile_w))
    rows = torch.arange(height)
    cols = torch.arange(image_width)
    near_row = torch.zeros(height, dtype=torch.bool)
    for edge in row_edges:
        near_row |= (rows >= edge - band_h // 2 - 1) & (rows < edge + band_h - band_h // 2 + 1)
    near_col = torch.zeros(image_width, dtype=torch.bool)
    for edge in col_edges:
        near_col |= (cols >= edge - band_w // 2 - 1) & (cols < edge + band_w - band_w // 2 + 1)
    # Nothing far from a seam is smoothed.
    assert not bool((mask & ~(near_row[:, None] | near_col[None, :])).any())


def test_seams_of_a_stride_that_does_not_divide_the_tile() -> None:
    # 100 px, tile 40, stride 30: tiles at 0, 30, 60; ends at 40, 70 (and 100 = image edge).
    grid = TileGrid.create((100, 100), 40, 30)
    assert grid.row_starts == (0, 30, 60)
    mask = grid.seam_mask(0.1)
    for edge in (30, 40, 60, 70):
        assert bool(mask[edge].all()) and bool(mask[edge - 1].all())
    assert not bool(mask[50].all())  # between seams: only the vertical seams cross this row
    assert not bool(mask[0].all()) and not bool(mask[99].all())


@pytest.mark.parametrize(
    ("image", "tile", "stride", "message"),
    [
        (64, 128, None, "larger than the image"),
        (128, 64, 65, "larger than the tile"),
        (128, 64, 0, "must be > 0"),
        (128, 64, -3, "must be > 0"),
        (128, 0, None, "must be > 0"),
    ],
)
def test_invalid_geometry_is_refused_with_the_key(image: int, tile: int, stride: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        TileGrid.create(image, tile, stride)
    assert str(error.value).startswith("tiling.")


@pytest.mark.parametrize("value", ["64", 6.5, [64], [64, 64, 64], True])
def test_tile_size_must_be_an_int_or_a_pair(value: object) -> None:
    with pytest.raises(ValueError, match="expected an int or \\[height, width\\]"):
        TileGrid.create(128, value)  # type: ignore[arg-type]
