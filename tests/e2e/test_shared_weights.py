"""Shared weights end to end: a pretrained backbone is stored once, loads as before, is verified, resumes.

The "pretrained" backbone is timm's ``resnet18`` with seeded random weights, put in a Hugging Face
cache of the test's own (``HF_HOME``, offline): every tile then builds the same backbone, whatever
its seed, as with real ImageNet weights. Training runs in a subprocess so that ``HF_HOME`` is read
by a fresh ``huggingface_hub``; loading never needs the cache (checkpoints hold the weights).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_tiled.cli import main
from anomalib_tiled.data.synthetic import CATEGORY
from anomalib_tiled.run.directory import RunDirectory, file_digest
from anomalib_tiled.run.weights import SharedWeights, join
from tests.conftest import REPO, base_config, interrupt_training, write_config

TILES = 4


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding seeded random weights under the name timm resolves ``resnet18`` to."""
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    repo = model.pretrained_cfg["hf_hub_id"]  # timm/resnet18.a1_in1k: the default tag
    home = tmp_path_factory.mktemp("hf")
    entry = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    safetensors.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    return home


def _environment(hf_home: Path) -> dict[str, str]:
    python_path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}


def _train(hf_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "anomalib_tiled", "train", *args]
    return subprocess.run(command, env=_environment(hf_home), capture_output=True, text=True, check=False, timeout=600)


def _pretrained_config(dataset_root: Path, tmp_path: Path, callbacks: list | None = None, **overrides: object) -> Path:
    cfg = base_config(dataset_root, tmp_path / "results", visualization={"save": False}, **overrides)
    cfg["TrainModels"]["model"]["init_args"]["pre_trained"] = True
    if callbacks:
        cfg["TrainModels"]["trainer"] = {"callbacks": callbacks}
    return write_config(tmp_path / "c.yaml", cfg)


@pytest.fixture(scope="module")
def shared_run(hf_home: Path, dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-tile Padim run whose tiles share one pretrained backbone."""
    work = tmp_path_factory.mktemp("shared")
    done = _train(hf_home, "--config", str(_pretrained_config(dataset_root, work)))
    assert done.returncode == 0, done.stderr
    (run,) = (work / "results").glob(f"Padim/MVTecAD/{CATEGORY}/v0")
    return run


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy, symlinks=True)
    return copy


def _metrics(run: Path, evaluation: str) -> dict[str, float]:
    return json.loads((run / "eval" / evaluation / "metrics.json").read_text())


def _bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _full_checkpoint(path: Path) -> dict:
    from anomalib.utils.serialization import anomalib_safe_globals

    with anomalib_safe_globals():
        return join(torch.load(path, weights_only=True), SharedWeights(path.parent), path)


def _to_old_layout(run: Path) -> None:
    """Rewrite a run as runs were before shared weights: full checkpoints, no ``weights/shared``."""
    directory = RunDirectory(run)
    for tile in directory.manifest()["tiles"]:
        checkpoint = directory.checkpoint_path(tile)
        torch.save(_full_checkpoint(checkpoint), checkpoint)
        directory.record_tile(tile, {"checkpoint": file_digest(checkpoint)})
    shutil.rmtree(run / "weights" / "shared")


def _backbone_digests(manifest: dict) -> set[str]:
    """Shared files every tile references."""
    return set.intersection(*({e["sha256"] for e in entry["shared"]} for entry in manifest["tiles"].values()))


@pytest.mark.slow
def test_a_shared_backbone_is_stored_once_and_loads_as_the_old_layout(shared_run: Path, tmp_path: Path) -> None:
    manifest = json.loads((shared_run / "manifest.json").read_text())
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == TILES
    common = _backbone_digests(manifest)
    state = _full_checkpoint(shared_run / "weights" / "tile_r0_c0.ckpt")["state_dict"]
    backbone_bytes = sum(t.numel() * t.element_size() for name, t in state.items() if "feature_extractor" in name)
    assert len(common) >= 13  # every backbone conv of layer1-3

    old = _copy(shared_run, tmp_path, "old")
    _to_old_layout(old)
    full = [path.stat().st_size for path in (old / "weights").glob("*.ckpt")]
    # One backbone plus each tile's own weights (its full checkpoint less the backbone).
    expected = backbone_bytes + sum(size - backbone_bytes for size in full)
    assert _bytes(shared_run / "weights") == pytest.approx(expected, rel=0.10)
    assert _bytes(shared_run / "weights") < 0.4 * _bytes(old / "weights")

    new = _copy(shared_run, tmp_path, "new")
    for run in (new, old):
        shutil.rmtree(run / "predictions")  # eval loads every checkpoint again
        assert main(["eval", "--root", str(run)]) == 0
    trained = _metrics(shared_run, "v0")  # the tile models in memory, right after fitting
    assert _metrics(new, "v1") == trained
    assert _metrics(old, "v1") == trained


@pytest.mark.slow
def test_a_corrupt_or_missing_shared_file_is_named_and_resume_retrains_its_tiles(
    shared_run: Path, hf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _copy(shared_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    digest = min(_backbone_digests(manifest))
    shared = run / "weights" / "shared" / f"{digest}.safetensors"
    original = shared.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF  # same size, other bytes
    shared.write_bytes(bytes(data))
    shutil.rmtree(run / "predictions")  # force eval to load the checkpoints
    assert main(["eval", "--root", str(run)]) == 1
    fix = f"retrain the tiles that use it with 'anomalib tiled train --resume {run}'"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {shared}: shared weights file is corrupt (size/sha256 differ from manifest.json); delete it and {fix}"
    ]

    shared.unlink()
    assert main(["eval", "--root", str(run)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {shared}: shared weights file is missing; {fix}"]

    trained_before = (run / "run.log").read_text().count(" trained in ")
    done = _train(hf_home, "--resume", str(run), "--evaluate", "false")
    assert done.returncode == 0, done.stderr
    assert (run / "run.log").read_text().count(" trained in ") == trained_before + TILES
    assert shared.read_bytes() == original  # every tile using it was retrained, and wrote it again
    assert main(["eval", "--root", str(run)]) == 0
    assert _metrics(run, "v1") == _metrics(shared_run, "v0")


@pytest.mark.slow
def test_an_interrupted_run_with_shared_weights_resumes_under_another_runner(
    shared_run: Path, hf_home: Path, dataset_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pause = {"class_path": "tests.e2e.test_reliability.PauseAfterFit", "init_args": {"seconds": 4.0}}
    config = _pretrained_config(dataset_root, tmp_path, [pause], execution={"runner": "processes", "workers": 2})
    for name, value in _environment(hf_home).items():
        monkeypatch.setenv(name, value)
    manifest_path, _ = interrupt_training(config, tmp_path / "results")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "interrupted" and 1 <= len(manifest["tiles"]) < TILES
    kept = {tile: entry["checkpoint"]["sha256"] for tile, entry in manifest["tiles"].items()}

    run = manifest_path.parent
    done = _train(hf_home, "--resume", str(run), "--execution.runner", "serial")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == TILES
    assert all(manifest["tiles"][tile]["checkpoint"]["sha256"] == digest for tile, digest in kept.items())
    # The resumed tiles found the backbone the first session wrote, and nothing unreferenced is left.
    referenced = {e["sha256"] for entry in manifest["tiles"].values() for e in entry["shared"]}
    assert {path.stem for path in (run / "weights" / "shared").iterdir()} == referenced
    assert _backbone_digests(manifest) == _backbone_digests(json.loads((shared_run / "manifest.json").read_text()))
    assert _metrics(run, "v0") == pytest.approx(_metrics(shared_run, "v0"), abs=1e-6)


@pytest.mark.slow
def test_random_init_backbones_stay_per_tile(trained_run: Path) -> None:
    """``pre_trained: false`` seeds every tile's backbone differently: nothing large is shared."""
    manifest = json.loads((trained_run / "manifest.json").read_text())
    files = [{e["sha256"] for e in entry["shared"]} for entry in manifest["tiles"].values()]
    assert all(files) and sum(len(f) for f in files) == len(set.union(*files))  # no file used by two tiles
    weights = [_full_checkpoint(trained_run / "weights" / f"{tile}.ckpt")["state_dict"] for tile in manifest["tiles"]]
    name = next(name for name in weights[0] if name.endswith("layer3.0.conv1.weight"))
    assert all(not torch.equal(weights[0][name], other[name]) for other in weights[1:])
