"""Tile jobs apart from the run directory: tile crops, parcels, the files a job wrote and their delivery; head watch."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.data.tiles import TileCrops, TileDataset
from anomalib_tiled.errors import ClusterError, ConfigError, RunDirectoryError
from anomalib_tiled.execution.jobs import PredictTileJob, TileContext, TileSplit
from anomalib_tiled.execution.runners.ray import HeadWatch
from anomalib_tiled.execution.transport import RunFile, collect, deliver, detach, job_splits, pack, unpack
from anomalib_tiled.run.directory import RunDirectory, file_digest
from anomalib_tiled.run.store import PredictionStore
from anomalib_tiled.settings import RuntimeSettings, TrainingSettings
from anomalib_tiled.tiling import TileGrid

GRID = TileGrid((8, 12), (4, 6), (4, 6))
POSITION = list(GRID)[3]  # bottom right: rows 4:8, columns 6:12


def _split(root: Path, count: int = 3) -> TileSplit:
    """A split of ``count`` random 8x12 images with masks, its cache and store in the run ``root``."""
    rng = np.random.default_rng(0)
    (root / "cache").mkdir(parents=True)
    images = NpyFile.create(root / "cache" / "x.images.npy", (count, 8, 12, 3), np.uint8)
    images.write(0, rng.integers(0, 255, (count, 8, 12, 3)))
    directory = root / "splits" / "test"
    directory.mkdir(parents=True)
    NpyFile.create(directory / "masks.npy", (count, 8, 12), np.uint8).write(0, rng.integers(0, 2, (count, 8, 12)))
    record = SplitRecord(directory, [f"{i}.png" for i in range(count)], [""] * count, [0, 1, 1][:count], True)
    return TileSplit(record, images, 2, PredictionStore(root / "predictions" / "fp"))


def _job(root: Path) -> PredictTileJob:
    run = RunDirectory(root)
    run.checkpoint_path(POSITION.name).parent.mkdir(parents=True)
    run.checkpoint_path(POSITION.name).write_bytes(b"weights")
    run.write_manifest({"tiles": {POSITION.name: {"checkpoint": file_digest(run.checkpoint_path(POSITION.name))}}})
    context = TileContext(run, None, TrainingSettings(GRID), RuntimeSettings())  # type: ignore[arg-type]
    return PredictTileJob(context, POSITION, _split(root))


def _write(root: Path, content: str) -> tuple[Path, Path]:
    path = root / "weights" / "shared" / f"{content}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode())
    return root, path


def test_cut_tiles_give_the_same_tile_items_as_the_cache(tmp_path: Path) -> None:
    split = _split(tmp_path)
    assert isinstance(split.images, NpyFile)
    crops = TileCrops.cut(split.images, split.record, POSITION)
    full = np.load(split.images.path)
    assert crops.images.shape == (3, 4, 6, 3) and np.array_equal(crops.images, full[:, 4:8, 6:12])
    assert crops.masks is not None and crops.nbytes == 3 * 4 * 6 * 4
    crops.images.flags.writeable = False  # as they arrive from Ray's object store
    from_cut = TileDataset(crops, split.record, POSITION)
    assert len(from_cut) == 3
    for index in range(3):
        from_cache, from_crops = TileDataset(split.images, split.record, POSITION)[index], from_cut[index]
        assert torch.equal(from_cache.image, from_crops.image) and torch.equal(from_cache.gt_mask, from_crops.gt_mask)
        assert from_cache.gt_label == from_crops.gt_label


def test_a_job_travels_with_its_files_and_tiles_and_its_written_files_come_back(tmp_path: Path) -> None:
    job = _job(tmp_path / "run")
    assert job_splits(job) == [job.split]
    present = {"weights/shared/frozen.safetensors": RunFile.read(*_write(tmp_path / "held", "frozen")).digest}
    parcel = pack(job, present)
    assert [item.path for item in parcel.files] == ["manifest.json", f"weights/{POSITION.name}.ckpt"]
    assert len(parcel.crops) == 1 and parcel.nbytes == sum(len(f.data) for f in parcel.files) + 3 * 4 * 6 * 4

    private = tmp_path / "worker"
    private.mkdir()
    detached = unpack(job, parcel, private)
    assert detached.context.run.root == private and detached.name == job.name
    assert detached.context.run.verify_checkpoint(POSITION.name) == private / "weights" / f"{POSITION.name}.ckpt"
    assert isinstance(detached.split.images, TileCrops)
    assert detached.split.store is not None and detached.split.store.directory == private / "predictions" / "fp"
    assert isinstance(job.split.images, NpyFile)  # the job itself is unchanged

    # What the job writes, in order: its maps, then the marker that says they are complete.
    store = detached.split.store
    store.directory.mkdir(parents=True)
    store.file_path(POSITION.name, "maps.npy").write_bytes(b"maps")
    time.sleep(0.01)
    store.file_path(POSITION.name, "json").write_text("{}")
    _write(private, "frozen")  # a shared weights file the run holds already: not sent back
    files = collect(private, parcel)
    assert [item.path for item in files] == [
        f"predictions/fp/{POSITION.name}.maps.npy",
        f"predictions/fp/{POSITION.name}.json",
    ]
    assert deliver(tmp_path / "run", files) == len(b"maps") + len(b"{}")
    assert job.split.store is not None and job.split.store.file_path(POSITION.name, "maps.npy").read_bytes() == b"maps"


def test_a_damaged_or_escaping_file_is_not_written(tmp_path: Path) -> None:
    good = RunFile("weights/a.ckpt", b"abc", {"size": 3, "sha256": "0" * 64})
    with pytest.raises(
        RunDirectoryError, match=r"a.ckpt: the file a tile job sent back does not match its size/sha256"
    ):
        deliver(tmp_path, [good])
    assert not (tmp_path / "weights" / "a.ckpt").exists()
    (tmp_path / "x").write_bytes(b"abc")
    escaping = RunFile("../x", b"abc", file_digest(tmp_path / "x"))
    with pytest.raises(RunDirectoryError, match=r"^\.\./x: not a path inside the run directory"):
        deliver(tmp_path / "run", [escaping])


def test_a_store_outside_the_run_cannot_travel(tmp_path: Path) -> None:
    job = _job(tmp_path / "run")
    job.split.store = PredictionStore(tmp_path / "elsewhere")
    with pytest.raises(
        RunDirectoryError, match=r"elsewhere: outside the run directory .* use execution.ray.storage: shared"
    ):
        detach(job, tmp_path / "worker", pack(job).crops)


def test_storage_is_checked() -> None:
    with pytest.raises(
        ConfigError, match=r"^execution.ray.storage: unknown value 'object-store' \(did you mean 'object_store'\?\)"
    ):
        RuntimeSettings(execution={"ray": {"storage": "object-store"}})
    assert RuntimeSettings().execution.ray.storage == "shared"


def test_a_head_that_stops_answering_fails_after_the_grace(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    watch = HeadWatch(address, grace=0.0)
    assert watch.answering()
    watch.check(tmp_path)
    server.close()
    watch.probed = -1e9  # probe again now
    assert not watch.answering()
    message = rf"^execution.ray.address: the Ray cluster's head \({address}\) has not answered"
    with pytest.raises(ClusterError, match=message) as error:
        watch.check(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert HeadWatch(None).answering()
