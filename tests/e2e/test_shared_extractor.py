"""Tile models with one pretrained feature extractor: batched prediction and export equal the per-tile path.

The pretrained backbone comes from a local Hugging Face cache written here: seeded random weights
under the name timm resolves ``resnet18`` with ``pre_trained: true`` to, read offline. Every tile
model of such a run then has the same extractor, so ``eval``, ``predict`` and ``export`` run it once
per batch; the per-tile path is what the planner does when sharing is switched off.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anomalib_tiled.cli import main
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.data.synthetic import make_dataset
from anomalib_tiled.execution import batched, planner
from anomalib_tiled.execution.batched import PredictGroupJob
from anomalib_tiled.execution.jobs import PredictTileJob
from anomalib_tiled.execution.shared import SeparateTiles
from anomalib_tiled.export import export_run, exporter
from anomalib_tiled.export import graph as export_graph
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.run.store import run_store
from anomalib_tiled.run.weights import SharedWeights, join
from tests.conftest import IMAGE_SIZE, TILE_SIZE, base_config, write_config
from tests.e2e.test_export import assert_parity, run_based_predict

TOLERANCE = 1e-5
TIMM_NAME = "resnet18.a1_in1k"  # what timm loads for backbone resnet18, pre_trained: true

MODELS = {
    "Padim": {"backbone": "resnet18", "pre_trained": True, "n_features": 20},
    "Patchcore": {"backbone": "resnet18", "pre_trained": True, "num_neighbors": 3, "coreset_sampling_ratio": 0.5},
}


def write_pretrained_cache(home: Path) -> Path:
    """A Hugging Face cache at ``home`` holding seeded random ``resnet18`` weights as timm's pretrained ones."""
    import timm
    from safetensors.torch import save_file

    repo = home / "hub" / f"models--timm--{TIMM_NAME}"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(state, str(repo / "snapshots" / revision / "model.safetensors"))
    return home


@pytest.fixture(scope="module")
def pretrained_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The local cache, in use (offline) while the module's tests run."""
    import huggingface_hub.constants

    home = write_pretrained_cache(tmp_path_factory.mktemp("hf-home"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads its cache folder when imported: point the imported module at ours too.
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield home


def train(dataset_root: Path, work: Path, model: str, stride: int = TILE_SIZE) -> Path:
    """Train (and evaluate) a run of ``model`` with the pretrained backbone; returns the run directory."""
    cfg = base_config(dataset_root, work / "results", visualization={"save": False})
    cfg["tiling"] = {"tile_size": TILE_SIZE, "stride": stride}
    cfg["TrainModels"] = {**cfg["TrainModels"], "model": {"class_path": model, "init_args": MODELS[model]}}
    assert main(["train", "--config", str(write_config(work / "config.yaml", cfg))]) == 0
    return next((work / "results").glob("*/MVTecAD/*/v0"))


@pytest.fixture(scope="module")
def shared_runs(pretrained_cache: Path, dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SharedRuns:
    """Runs trained on first use: Padim on a 2x2 grid, PatchCore on an overlapping 3x3 grid."""
    del pretrained_cache
    return SharedRuns(dataset_root, tmp_path_factory)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images no run has seen (as in the export tests: thresholds sit on no image's score)."""
    root = tmp_path_factory.mktemp("unseen")
    return make_dataset(root, size=IMAGE_SIZE, n_train=0, n_test_good=6, n_test_defect=4, seed=11) / "test"


class SharedRuns:
    """One trained run per model, trained when a test first asks for it."""

    def __init__(self, dataset_root: Path, factory: pytest.TempPathFactory) -> None:
        self.strides = {"Padim": TILE_SIZE, "Patchcore": TILE_SIZE // 2}
        self.dataset_root = dataset_root
        self.factory = factory
        self.runs: dict[str, Path] = {}

    def __getitem__(self, model: str) -> Path:
        if model not in self.runs:
            work = self.factory.mktemp(f"{model.lower()}_shared")
            self.runs[model] = train(self.dataset_root, work, model, self.strides[model])
        return self.runs[model]


class JobLog:
    """Which prediction jobs ran, the tiles of each shared group, and the tiles a group job predicted alone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.jobs: list[str] = []
        self.shared: list[int] = []
        self.alone = 0
        for job in (PredictGroupJob, PredictTileJob):
            monkeypatch.setattr(job, "run", self._logged(job.run, job.__name__))
        predict_shared, predict_tile = batched.predict_shared, batched.predict_tile

        def logged_tile(*args: Any) -> None:
            self.alone += 1
            predict_tile(*args)

        monkeypatch.setattr(batched, "predict_tile", logged_tile)

        def logged_shared(context: Any, models: Any, positions: Any, split: Any) -> None:
            self.shared.append(len(positions))
            predict_shared(context, models, positions, split)

        monkeypatch.setattr(batched, "predict_shared", logged_shared)

    def _logged(self, run: Any, name: str) -> Any:
        def logged(job: Any) -> Any:
            self.jobs.append(name)
            return run(job)

        return logged


def fingerprint_of_test(run: Path) -> str:
    """Fingerprint of the run's test split."""
    return SplitRecord.load(RunDirectory.open(run).split_dir("test")).fingerprint


def evaluate_again(run: Path) -> tuple[dict[str, float], list[dict[str, str]], dict[str, tuple]]:
    """Drop the test split's stored tile predictions, evaluate, and return metrics, predictions.csv and tiles."""
    store = run_store(RunDirectory.open(run), fingerprint_of_test(run))
    shutil.rmtree(store.directory)
    assert main(["eval", "--root", str(run)]) == 0
    output = max((run / "eval").glob("v*"), key=lambda path: int(path.name[1:]))
    metrics = json.loads((output / "metrics.json").read_text())
    rows = list(csv.DictReader((output / "predictions.csv").open()))
    tiles = {path.name.split(".")[0]: None for path in store.directory.glob("*.json")}
    stored = {tile: (np.array(store.maps(tile).read(0, len(rows))), store.scores(tile)) for tile in tiles}
    return metrics, rows, stored


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_batched_eval_equals_the_per_tile_path(
    shared_runs: SharedRuns, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = shared_runs[model]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner, "may_share_extractor", lambda spec: False)
        log = JobLog(patch)
        expected = evaluate_again(run)
    assert set(log.jobs) == {"PredictTileJob"} and not log.shared
    log = JobLog(monkeypatch)
    got = evaluate_again(run)
    # serial: one job for every tile, one batched extractor for all of them.
    n_tiles = len(expected[2])
    assert log.jobs == ["PredictGroupJob"] and log.shared == [n_tiles]
    metrics, rows, stored = got
    assert metrics.keys() == expected[0].keys()
    for name, value in metrics.items():
        assert abs(value - expected[0][name]) <= TOLERANCE, name
    assert [(r["image_path"], r["pred_label"]) for r in rows] == [
        (r["image_path"], r["pred_label"]) for r in expected[1]
    ]
    for got_row, want_row in zip(rows, expected[1], strict=True):
        assert abs(float(got_row["pred_score"]) - float(want_row["pred_score"])) <= TOLERANCE
    assert stored.keys() == expected[2].keys()
    for tile, (maps, scores) in stored.items():
        want_maps, want_scores = expected[2][tile]
        assert np.abs(maps - want_maps).max() <= TOLERANCE, tile
        assert np.abs(scores - want_scores).max() <= TOLERANCE, tile


@pytest.mark.slow
def test_exported_shared_extractor_matches_run_based_predict_and_is_stored_once(
    shared_runs: SharedRuns,
    unseen: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = shared_runs["Padim"]
    log = JobLog(monkeypatch)
    reference = run_based_predict(run, unseen, tmp_path / "predict")
    assert log.jobs == ["PredictGroupJob"] and log.shared == [4]
    extractor, heads = weight_bytes(run)
    for export_format in ("torch", "onnx", "openvino"):
        artifact = export_run(run, export_format, output=tmp_path / export_format)
        assert_parity(artifact, reference)
        # One extractor and four heads, and the graph around them: less than a second extractor copy.
        assert extractor + heads <= file_size(artifact) < 2 * extractor + heads, export_format
    with pytest.MonkeyPatch.context() as patch:
        # The same graph with one extractor copy per tile model, as before extractors were shared.
        patch.setattr(exporter, "share_extractor", lambda model, extractors: None)
        patch.setattr(export_graph, "tile_units", lambda models: [((0, 1, 2, 3), SeparateTiles(models))])
        separate = export_run(run, "torch", output=tmp_path / "separate")
    # Three extractor copies fewer (and the graph nodes that ran them).
    assert file_size(separate) - file_size(tmp_path / "torch") >= 3 * extractor


def file_size(artifact: Path) -> int:
    """Bytes of an artifact's model file(s)."""
    return sum(path.stat().st_size for path in artifact.iterdir() if path.name != "metadata.json")


def weight_bytes(run: Path) -> tuple[int, int]:
    """Bytes of one tile model's feature extractor, and of every tile model's weights besides it."""
    extractor, heads = 0, 0
    for checkpoint in (run / "weights").glob("*.ckpt"):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = join(saved, SharedWeights(checkpoint.parent), checkpoint)["state_dict"]  # shared tensors put back
        sizes = {name: value.numel() * value.element_size() for name, value in state.items()}
        extractor = sum(size for name, size in sizes.items() if name.startswith("model.feature_extractor."))
        heads += sum(size for name, size in sizes.items() if not name.startswith("model.feature_extractor."))
    return extractor, heads


@pytest.mark.slow
def test_random_init_runs_keep_the_per_tile_path(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``pre_trained: false``: per-tile random extractors; predictions are those of the per-tile path."""
    log = JobLog(monkeypatch)
    expected = evaluate_again(trained_run)
    assert set(log.jobs) == {"PredictTileJob"}
    # A group job given these tiles anyway compares digests, finds none alike and predicts tile by tile.
    monkeypatch.setattr(planner, "may_share_extractor", lambda spec: True)
    log.jobs.clear()
    got = evaluate_again(trained_run)
    assert log.jobs == ["PredictGroupJob"] and not log.shared and log.alone == len(got[2])
    assert got[0] == expected[0]
    for tile, (maps, scores) in got[2].items():
        assert np.array_equal(maps, expected[2][tile][0]) and np.array_equal(scores, expected[2][tile][1])


@pytest.mark.slow
def test_the_processes_runner_predicts_one_batched_group_per_worker(shared_runs: SharedRuns, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(shared_runs["Padim"], run, symlinks=True)
    shutil.rmtree(run_store(RunDirectory.open(run), fingerprint_of_test(run)).directory)
    assert main(["eval", "--root", str(run), "--execution.runner", "processes", "--execution.workers", "2"]) == 0
    # The workers' log records reach the run's log: two groups of two tiles, each batched.
    assert (run / "run.log").read_text().count("2 tiles predicted with one shared feature extractor") == 2
    trained, again = (json.loads((run / "eval" / v / "metrics.json").read_text()) for v in ("v0", "v1"))
    assert again.keys() == trained.keys()
    assert all(abs(again[name] - trained[name]) <= TOLERANCE for name in trained)
