"""Shared weights: large tensors stored once by content, tile checkpoints reassembled exactly, files verified."""

from __future__ import annotations

import json
import multiprocessing
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_tiled.errors import RunDirectoryError
from anomalib_tiled.run.directory import RunDirectory, file_digest
from anomalib_tiled.run.weights import (
    REFERENCES_KEY,
    SHARE_MIN_BYTES,
    SharedWeights,
    join,
    share,
    shareable,
    tensor_digest,
)


def _backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.Conv2d(64, 128, 3))


def _tile_checkpoint(backbone_seed: int, tile_seed: int) -> dict[str, Any]:
    """A Lightning-like checkpoint: a backbone (seeded by ``backbone_seed``) and a tile's own statistics."""
    state = _backbone(backbone_seed).state_dict(prefix="model.backbone.")
    generator = torch.Generator().manual_seed(tile_seed)
    state["model.memory_bank"] = torch.randn(200, 128, generator=generator)
    state["model.threshold"] = torch.tensor(0.5)
    return {"epoch": 1, "state_dict": state, "hyper_parameters": {"backbone": "resnet18", "layers": ["layer1"]}}


def _assert_same(joined: dict[str, Any], original: dict[str, Any]) -> None:
    assert joined.keys() == original.keys()
    assert list(joined["state_dict"]) == list(original["state_dict"])  # same order
    assert joined["state_dict"]._metadata == original["state_dict"]._metadata  # module versions kept
    for name, tensor in original["state_dict"].items():
        assert joined["state_dict"][name].dtype == tensor.dtype and torch.equal(joined["state_dict"][name], tensor)
    assert {k: v for k, v in joined.items() if k != "state_dict"} == {
        k: v for k, v in original.items() if k != "state_dict"
    }


def _save(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def test_identical_tensors_are_stored_once_and_tiles_reassemble_exactly(tmp_path: Path) -> None:
    store = SharedWeights(tmp_path / "weights")
    tiles = [_tile_checkpoint(backbone_seed=0, tile_seed=tile) for tile in range(3)]
    shared = []
    for index, checkpoint in enumerate(tiles):
        split, files = share(checkpoint, store)
        shared.append({entry["sha256"] for entry in files})
        assert set(split[REFERENCES_KEY]["tensors"]) == {
            "model.backbone.0.weight",
            "model.backbone.2.weight",
            "model.memory_bank",
        }
        assert "model.backbone.1.weight" in split["state_dict"]  # small tensors stay in the checkpoint
        _save(split, tmp_path / "weights" / f"tile{index}.ckpt")
    # Two backbone tensors in common, one memory bank each.
    assert len(shared[0] & shared[1] & shared[2]) == 2 and len(set.union(*shared)) == 2 + 3
    assert len(list((tmp_path / "weights" / "shared").iterdir())) == 5
    for index, checkpoint in enumerate(tiles):
        path = tmp_path / "weights" / f"tile{index}.ckpt"
        loaded = torch.load(path, weights_only=True)
        _assert_same(join(loaded, store, path), checkpoint)


def test_differing_tensors_are_never_shared(tmp_path: Path) -> None:
    """Random-init backbones seeded per tile: every large tensor is the tile's own."""
    store = SharedWeights(tmp_path / "weights")
    _, first = share(_tile_checkpoint(backbone_seed=1, tile_seed=1), store)
    _, second = share(_tile_checkpoint(backbone_seed=2, tile_seed=2), store)
    assert not {entry["sha256"] for entry in first} & {entry["sha256"] for entry in second}


def test_the_digest_is_of_dtype_shape_and_bytes_not_of_names() -> None:
    tensor = torch.arange(SHARE_MIN_BYTES, dtype=torch.float32)
    assert tensor_digest(tensor) == tensor_digest(tensor.clone())
    assert tensor_digest(tensor) != tensor_digest(tensor.to(torch.float64))
    assert tensor_digest(tensor) != tensor_digest(tensor.reshape(2, -1))
    changed = tensor.clone()
    changed[-1] += 1
    assert tensor_digest(tensor) != tensor_digest(changed)
    assert tensor_digest(tensor.reshape(256, -1).t()) == tensor_digest(tensor.reshape(256, -1).t().contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_shared_files_are_safetensors_and_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    tensor = (torch.randn(300, 257) * 100).to(dtype)
    entry = SharedWeights(tmp_path).put(tensor)
    path = SharedWeights(tmp_path).path(entry["sha256"])
    assert file_digest(path) == entry  # the name is the file's sha256
    assert torch.equal(safetensors.load_file(path)["tensor"], tensor)
    assert torch.equal(SharedWeights(tmp_path).get(entry["sha256"]), tensor)


def test_small_and_unusual_tensors_stay_in_the_checkpoint() -> None:
    assert not shareable(torch.zeros(SHARE_MIN_BYTES // 4 - 1))
    assert shareable(torch.zeros(SHARE_MIN_BYTES // 4))
    assert not shareable(torch.zeros(SHARE_MIN_BYTES, dtype=torch.complex64))
    assert not shareable(torch.zeros(SHARE_MIN_BYTES, device="meta"))
    assert not shareable("not a tensor")


def test_a_checkpoint_without_large_tensors_is_unchanged(tmp_path: Path) -> None:
    checkpoint = {"state_dict": OrderedDict(bias=torch.zeros(4)), "epoch": 0}
    split, files = share(checkpoint, SharedWeights(tmp_path))
    assert files == [] and REFERENCES_KEY not in split
    assert join(split, SharedWeights(tmp_path), tmp_path / "x.ckpt") == split  # old checkpoints load as they are


def test_an_existing_intact_file_is_kept_and_a_corrupt_one_rewritten(tmp_path: Path) -> None:
    store = SharedWeights(tmp_path)
    tensor = torch.randn(SHARE_MIN_BYTES)
    entry = store.put(tensor)
    path = store.path(entry["sha256"])
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert store.put(tensor.clone()) == entry
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before  # present and verified: not written again
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.put(tensor) == entry
    assert file_digest(path) == entry
    assert [p.name for p in tmp_path.joinpath("shared").iterdir()] == [path.name]  # no temporary left


def _put_many(directory: str, seed: int) -> list[str]:
    torch.manual_seed(seed)
    tensors = [torch.randn(SHARE_MIN_BYTES) for _ in range(8)]
    store = SharedWeights(Path(directory))
    return [store.put(tensor)["sha256"] for _ in range(5) for tensor in tensors]


def test_concurrent_writers_of_the_same_tensors_leave_one_complete_file_each(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        digests = pool.starmap(_put_many, [(str(tmp_path), 0)] * 4)
    assert all(result == digests[0] for result in digests)
    files = sorted(tmp_path.joinpath("shared").iterdir())
    assert len(files) == 8 and all(file_digest(file)["sha256"] == file.stem for file in files)


# -- the run directory verifies shared files --------------------------------------------------------


def _run_with_shared_tiles(tmp_path: Path) -> tuple[RunDirectory, list[Path]]:
    """A run directory of two tiles sharing a backbone, recorded in the manifest as a fit records them."""
    run = RunDirectory.create(tmp_path, "Model", "Data", "")
    store = SharedWeights(run.root / "weights")
    for index, tile in enumerate(("tile_r0_c0", "tile_r0_c1")):
        split, files = share(_tile_checkpoint(backbone_seed=0, tile_seed=index), store)
        _save(split, run.checkpoint_path(tile))
        run.record_tile(tile, {"checkpoint": file_digest(run.checkpoint_path(tile)), "shared": files})
    common = {path for path, _ in run.shared_files("tile_r0_c0")} & {path for path, _ in run.shared_files("tile_r0_c1")}
    return run, sorted(common)


def test_verified_tiles_need_intact_shared_files(tmp_path: Path) -> None:
    run, common = _run_with_shared_tiles(tmp_path)
    assert run.verified_tile("tile_r0_c0") is not None and run.verified_tile("tile_r0_c1") is not None
    run.check_checkpoints()
    assert run.verify_checkpoint("tile_r0_c0") == run.checkpoint_path("tile_r0_c0")
    data = bytearray(common[0].read_bytes())
    data[-1] ^= 0xFF
    common[0].write_bytes(bytes(data))
    run.check_checkpoints()  # same size: only the full check sees it
    assert run.verified_tile("tile_r0_c0") is None and run.verified_tile("tile_r0_c1") is None
    with pytest.raises(RunDirectoryError) as error:
        run.verify_checkpoint("tile_r0_c1")
    assert str(error.value) == (
        f"{common[0]}: shared weights file is corrupt (size/sha256 differ from manifest.json); delete it and "
        f"retrain the tiles that use it with 'anomalib tiled train --resume {run.root}'"
    )


def test_missing_or_truncated_shared_files_are_named(tmp_path: Path) -> None:
    run, common = _run_with_shared_tiles(tmp_path)
    common[0].write_bytes(common[0].read_bytes()[:100])
    with pytest.raises(RunDirectoryError, match=r"shared weights file is corrupt \(its size differs") as error:
        run.check_checkpoints()
    assert str(error.value).startswith(f"{common[0]}: ")
    common[0].unlink()
    for check in (run.check_checkpoints, lambda: run.verify_checkpoint("tile_r0_c0")):
        with pytest.raises(RunDirectoryError) as error:
            check()
        assert str(error.value) == (
            f"{common[0]}: shared weights file is missing; "
            f"retrain the tiles that use it with 'anomalib tiled train --resume {run.root}'"
        )
    assert "\n" not in str(error.value)
    with pytest.raises(RunDirectoryError, match="shared weights file is missing"):
        join(
            torch.load(run.checkpoint_path("tile_r0_c0"), weights_only=True),
            SharedWeights(run.root / "weights"),
            run.root,
        )


def test_a_shared_file_that_is_not_one_is_named_when_loading(tmp_path: Path) -> None:
    run, common = _run_with_shared_tiles(tmp_path)
    common[0].write_bytes(b"\xff" * 64)
    checkpoint = torch.load(run.checkpoint_path("tile_r0_c0"), weights_only=True)
    with pytest.raises(RunDirectoryError, match="shared weights file is corrupt \\(not a shared weights file\\)"):
        join(checkpoint, SharedWeights(run.root / "weights"), run.checkpoint_path("tile_r0_c0"))


def test_tiles_of_older_runs_reference_no_shared_files(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path, "Model", "Data", "")
    _save(_tile_checkpoint(0, 0), run.checkpoint_path("tile_r0_c0"))
    run.record_tile("tile_r0_c0", {"checkpoint": file_digest(run.checkpoint_path("tile_r0_c0"))})
    assert run.shared_files("tile_r0_c0") == []
    assert run.verified_tile("tile_r0_c0") is not None
    run.check_checkpoints()


def test_pruning_keeps_every_file_a_tile_references(tmp_path: Path) -> None:
    run, common = _run_with_shared_tiles(tmp_path)
    shared = run.root / "weights" / "shared"
    orphan = SharedWeights(run.root / "weights").path(
        SharedWeights(run.root / "weights").put(torch.ones(SHARE_MIN_BYTES))["sha256"]
    )
    stale = shared / ".abc.safetensors.x.tmp"
    stale.write_bytes(b"partial")
    referenced = {path for tile in ("tile_r0_c0", "tile_r0_c1") for path, _ in run.shared_files(tile)}
    # A retrained tile referencing other files leaves the old ones that the other tile still uses.
    manifest = json.loads(run.manifest_path.read_text())
    manifest["tiles"]["tile_r0_c0"]["shared"] = manifest["tiles"]["tile_r0_c0"]["shared"][:1]
    run.write_manifest(manifest)
    kept = {path for tile in ("tile_r0_c0", "tile_r0_c1") for path, _ in run.shared_files(tile)}
    assert set(run.prune_shared()) == {orphan, stale} | (referenced - kept)
    assert set(shared.iterdir()) == kept and set(common) <= kept
