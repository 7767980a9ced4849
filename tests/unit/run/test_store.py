"""Prediction store: tile predictions streamed to disk batch by batch, published atomically, read back."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_tiled.run.store import PredictionStore
from tests.fakes import write_tile

FINGERPRINT = "0123456789abcdef"


def _maps(count: int, seed: int = 0, size: tuple[int, int] = (4, 6)) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, (count, *size)).astype(np.float32)


def _published(store: PredictionStore, tile: str) -> set[str]:
    return {kind for kind in ("maps.npy", "scores.npy", "json") if store.file_path(tile, kind).exists()}


@given(
    batches=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    with_scores=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_batches_written_are_read_back_image_by_image(batches: list[int], seed: int, with_scores: bool) -> None:
    count = sum(batches)
    maps = _maps(count, seed)
    scores = np.random.default_rng(seed + 1).uniform(-1, 9, count).astype(np.float32) if with_scores else None
    with tempfile.TemporaryDirectory() as directory:
        store = PredictionStore(Path(directory) / "predictions" / FINGERPRINT)
        writer = store.open_tile("tile_r0_c0", count, (4, 6))
        start = 0
        for size in batches:
            batch_scores = None if scores is None else torch.from_numpy(scores[start : start + size])
            writer.write(torch.from_numpy(maps[start : start + size]), batch_scores)
            start += size
            assert writer.cursor == start
        writer.finish(FINGERPRINT)

        expected_scores = maps.max(axis=(1, 2)) if scores is None else scores  # no score: the map's maximum
        np.testing.assert_array_equal(np.load(store.file_path("tile_r0_c0", "maps.npy")), maps)
        np.testing.assert_array_equal(store.scores("tile_r0_c0"), expected_scores)
        reader = store.reader(["tile_r0_c0"])
        assert len(reader) == count
        for index in range(count):
            tile_maps, tile_scores = reader.read(index)
            assert tile_maps.shape == (1, 4, 6)
            np.testing.assert_array_equal(tile_maps[0].numpy(), maps[index])
            assert float(tile_scores[0]) == expected_scores[index]
        info = store.info("tile_r0_c0")
        assert info["count"] == count and info["fingerprint"] == FINGERPRINT
        assert info["map_min"] == pytest.approx(float(maps.min())) and info["map_max"] == pytest.approx(maps.max())
        assert info["score_min"] == pytest.approx(float(expected_scores.min()))
        assert info["score_max"] == pytest.approx(float(expected_scores.max()))


def test_nothing_is_published_before_finish(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    maps = _maps(4)
    writer = store.open_tile("tile_r0_c1", 4, (4, 6))
    writer.write(torch.from_numpy(maps[:2]), None)
    # Streamed to disk as it arrives (a partial file under a hidden name), not kept in memory.
    np.testing.assert_array_equal(np.load(tmp_path / FINGERPRINT / ".tile_r0_c1.maps.npy.partial")[:2], maps[:2])
    writer.write(torch.from_numpy(maps[2:]), None)
    assert _published(store, "tile_r0_c1") == set()
    assert not store.is_complete("tile_r0_c1", FINGERPRINT)
    writer.finish(FINGERPRINT)
    assert _published(store, "tile_r0_c1") == {"maps.npy", "scores.npy", "json"}
    assert store.is_complete("tile_r0_c1", FINGERPRINT)
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "tile_r0_c1.json",
        "tile_r0_c1.maps.npy",
        "tile_r0_c1.scores.npy",
    ]  # no partial or temporary file left behind


def test_a_partially_written_tile_is_not_complete(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    writer = store.open_tile("tile_r1_c0", 5, (4, 6))
    writer.write(torch.from_numpy(_maps(3)), None)
    with pytest.raises(RuntimeError, match="tile_r1_c0: predicted 3 of 5 images"):
        writer.finish(FINGERPRINT)
    assert _published(store, "tile_r1_c0") == set()
    assert not store.is_complete("tile_r1_c0", FINGERPRINT)


def test_rewriting_a_tile_keeps_the_old_predictions_until_finish(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    old, new = _maps(2, seed=1), _maps(2, seed=2)
    write_tile(store, "tile_r0_c0", old, FINGERPRINT)
    writer = store.open_tile("tile_r0_c0", 2, (4, 6))
    writer.write(torch.from_numpy(new), None)
    assert store.is_complete("tile_r0_c0", FINGERPRINT)
    np.testing.assert_array_equal(store.maps("tile_r0_c0").read(0, 2), old)
    writer.finish(FINGERPRINT)
    np.testing.assert_array_equal(store.maps("tile_r0_c0").read(0, 2), new)


def test_is_complete_checks_the_fingerprint_and_the_files(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    write_tile(store, "tile_r0_c0", _maps(3), FINGERPRINT)
    assert store.is_complete("tile_r0_c0", FINGERPRINT)
    assert not store.is_complete("tile_r0_c0", "fedcba9876543210")  # another split's predictions
    assert not store.is_complete("tile_r0_c1", FINGERPRINT)  # never written
    store.file_path("tile_r0_c0", "scores.npy").unlink()
    assert not store.is_complete("tile_r0_c0", FINGERPRINT)


def test_value_range_spans_the_given_tiles(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    low = np.full((2, 4, 6), 1.0, dtype=np.float32)
    low[1, 0, 0] = -2.5
    high = np.full((2, 4, 6), 3.0, dtype=np.float32)
    high[0, 3, 5] = 7.25
    write_tile(store, "tile_r0_c0", low, FINGERPRINT, scores=np.array([0.5, 0.75], dtype=np.float32))
    write_tile(store, "tile_r0_c1", high, FINGERPRINT, scores=np.array([4.0, 9.0], dtype=np.float32))
    assert store.value_range(["tile_r0_c0"]) == (-2.5, 1.0)
    assert store.value_range(["tile_r0_c0", "tile_r0_c1"]) == (-2.5, 7.25)
    assert store.value_range(["tile_r0_c0", "tile_r0_c1"], kind="score") == (0.5, 9.0)


def test_reader_stacks_tiles_in_the_order_given(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    tiles = {f"tile_r0_c{index}": _maps(3, seed=index) for index in range(3)}
    for tile, maps in tiles.items():
        write_tile(store, tile, maps, FINGERPRINT)
    order = ["tile_r0_c2", "tile_r0_c0", "tile_r0_c1"]
    maps, scores = store.reader(order).read(1)
    assert maps.shape == (3, 4, 6) and scores.shape == (3,)
    for position, tile in enumerate(order):
        np.testing.assert_array_equal(maps[position].numpy(), tiles[tile][1])
        assert float(scores[position]) == tiles[tile][1].max()


def test_model_outputs_are_brought_to_the_tile_size(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / FINGERPRINT)
    writer = store.open_tile("tile_r0_c0", 2, (4, 4))
    writer.write(torch.ones(1, 1, 4, 4), torch.tensor([0.25]))  # (B, 1, h, w) as models return it
    writer.write(torch.full((1, 2, 2), 5.0), None)  # smaller map: resized to the tile
    writer.finish(FINGERPRINT)
    maps = store.maps("tile_r0_c0").read(0, 2)
    assert maps.shape == (2, 4, 4)
    np.testing.assert_allclose(maps[1], 5.0)
    np.testing.assert_array_equal(store.scores("tile_r0_c0"), [0.25, 5.0])
    assert json.loads(store.file_path("tile_r0_c0", "json").read_text())["map_max"] == 5.0


def test_writer_refuses_missing_maps_and_extra_images(tmp_path: Path) -> None:
    writer = PredictionStore(tmp_path).open_tile("tile_r0_c0", 2, (4, 6))
    with pytest.raises(RuntimeError, match="tile_r0_c0: the model returned no anomaly_map"):
        writer.write(None, torch.ones(2))
    writer.write(torch.from_numpy(_maps(2)), None)
    with pytest.raises(RuntimeError, match="received more predictions than the split's 2 images"):
        writer.write(torch.from_numpy(_maps(1)), None)
