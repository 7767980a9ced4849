"""Datasets of the accuracy benchmark (benchmarks/harness/accuracy_data.py): layout, masks, seams, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.harness.accuracy_data import (
    DEFECTS,
    N_TEST_GOOD,
    N_TEST_PER_DEFECT,
    N_TRAIN,
    DatasetUnavailableError,
    build,
    single_size,
)

pytest.importorskip("skimage")


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("accuracy-data")


@pytest.mark.parametrize("name", ["textures", "border", "nonsquare", "synthetic"])
def test_layout_counts_and_masks(data_dir: Path, name: str) -> None:
    data = build(name, data_dir, seed=3)
    category = data.root / data.category
    height, width = data.image_size
    assert len(list((category / "train" / "good").glob("*.png"))) == N_TRAIN
    assert len(list((category / "test" / "good").glob("*.png"))) == N_TEST_GOOD
    defects = sorted(p.name for p in (category / "test").iterdir() if p.name != "good")
    assert sum(len(list((category / "test" / d).glob("*.png"))) for d in defects) == 2 * N_TEST_PER_DEFECT
    for image in sorted((category / "test").glob("*/*.png")):
        assert _pixels(image).shape[:2] == (height, width), image
        mask = category / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        if image.parent.name == "good":
            assert not mask.exists()
        else:
            values = _pixels(mask)
            assert values.shape == (height, width), mask
            assert values.any(), f"{mask} is empty"
            assert set(np.unique(values)) <= {0, 255}


def test_texture_defects_are_the_named_kinds(data_dir: Path) -> None:
    data = build("textures", data_dir, seed=3)
    assert sorted(p.name for p in (data.root / data.category / "test").iterdir()) == sorted(["good", *DEFECTS])


def test_border_defects_straddle_a_tile_border(data_dir: Path) -> None:
    data = build("border", data_dir, seed=3)
    seam = data.tile_size  # 2x2 tiles of 128: the seams are x=128 and y=128
    for mask in sorted((data.root / data.category / "ground_truth").glob("*/*.png")):
        ys, xs = np.nonzero(_pixels(mask))
        across_x = xs.min() < seam <= xs.max()
        across_y = ys.min() < seam <= ys.max()
        assert across_x or across_y, f"{mask} does not cross a tile border"


def test_nonsquare_geometry_snaps_to_a_2x3_grid(data_dir: Path) -> None:
    data = build("nonsquare", data_dir, seed=3)
    (height, width), tile, stride = data.image_size, data.tile_size, data.stride
    assert height != width
    assert ((height - tile) % stride, (width - tile) % stride) == (0, 0)
    assert ((height - tile) // stride + 1, (width - tile) // stride + 1) == (2, 3)
    assert data.single_size == (96, 128)
    assert single_size((256, 256), 128) == (128, 128)


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    first = build("textures", tmp_path / "a", seed=1)
    again = build("textures", tmp_path / "b", seed=1)
    other = build("textures", tmp_path / "c", seed=2)
    relative = sorted(p.relative_to(first.root) for p in first.root.rglob("*.png"))
    assert relative == sorted(p.relative_to(again.root) for p in again.root.rglob("*.png"))
    assert all(np.array_equal(_pixels(first.root / p), _pixels(again.root / p)) for p in relative)
    assert not all(np.array_equal(_pixels(first.root / p), _pixels(other.root / p)) for p in relative)


def test_build_reuses_a_finished_dataset(tmp_path: Path) -> None:
    data = build("border", tmp_path, seed=0)
    marker = data.root / data.category / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    assert build("border", tmp_path, seed=0) == data
    assert marker.stat().st_mtime_ns == stamp


def test_bottle_without_shared_data_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="shared MVTec AD data not found"):
        build("bottle", tmp_path, shared=tmp_path / "no-shared")


def test_unknown_dataset_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        build("nope", tmp_path)
