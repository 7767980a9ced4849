"""End to end on generated high-resolution images with small defects: CLI, Python API and models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.models import Padim
from PIL import Image

from anomalib_tiled import TiledEnsembleEngine
from anomalib_tiled.cli import main
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.data.synthetic import CATEGORY
from tests.conftest import IMAGE_SIZE, TILE_SIZE, base_config, write_config

pytestmark = pytest.mark.slow  # every test here trains tile models (or reads the session's trained run)

# The synthetic defects are obvious at full resolution; a working ensemble finds them.
MIN_IMAGE_AUROC = 0.9
MIN_PIXEL_AUROC = 0.9


def _metrics(eval_dir: Path) -> dict[str, float]:
    return json.loads((eval_dir / "metrics.json").read_text())


def _checkpoint(run: Path, tile: str) -> dict:
    """A tile's Lightning checkpoint (its ``epoch`` and ``global_step`` say how long it trained)."""
    return torch.load(run / "weights" / f"{tile}.ckpt", weights_only=True, map_location="cpu")


def test_train_writes_a_complete_run_and_metrics_above_thresholds(trained_run: Path) -> None:
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert manifest["status"] == "trained"
    assert sorted(manifest["tiles"]) == ["tile_r0_c0", "tile_r0_c1", "tile_r1_c0", "tile_r1_c1"]
    for tile in manifest["tiles"]:
        assert (trained_run / "weights" / f"{tile}.ckpt").stat().st_size == manifest["tiles"][tile]["checkpoint"][
            "size"
        ]
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["tiling"]["image_size"] == [IMAGE_SIZE, IMAGE_SIZE]
    eval_dir = trained_run / "eval" / "v0"
    metrics = _metrics(eval_dir)
    assert metrics["image_AUROC"] >= MIN_IMAGE_AUROC
    assert metrics["pixel_AUROC"] >= MIN_PIXEL_AUROC
    assert set(metrics) == {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}
    rows = list(csv.reader((eval_dir / "metrics.csv").read_text().splitlines()))
    assert rows[0] == ["metric", "value"] and {r[0] for r in rows[1:]} == set(metrics)
    predictions = list(csv.DictReader((eval_dir / "predictions.csv").open()))
    assert len(predictions) == 12
    assert {p["gt_label"] for p in predictions} == {"0", "1"}
    assert all(p["pred_label"] in {"0", "1"} for p in predictions)
    picture = Image.open(eval_dir / predictions[0]["result_image"])
    assert picture.size == (2 * IMAGE_SIZE, IMAGE_SIZE)  # two panels at native resolution
    # Image caches are gone; checkpoints, records and tile predictions stay.
    assert not (trained_run / "cache").exists()


def test_eval_with_root_alone_reproduces_the_metrics_in_a_new_folder(trained_run: Path) -> None:
    assert main(["eval", "--root", str(trained_run)]) == 0
    evaluations = sorted(p.name for p in (trained_run / "eval").glob("v*"))
    assert len(evaluations) >= 2
    assert _metrics(trained_run / "eval" / evaluations[-1]) == pytest.approx(_metrics(trained_run / "eval" / "v0"))


def test_eval_can_change_post_processing_but_not_the_trained_geometry(
    trained_run: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    changes = ["--normalization_stage", "none", "--visualization.save", "false"]
    # Metrics are post-processing too; the streaming AUPRO costs this evaluation next to nothing.
    changes += ["--TrainModels.metrics.pixel", "[AUROC, AUPRO]"]
    assert main(["eval", "--root", str(trained_run), *changes]) == 0
    latest = max((trained_run / "eval").glob("v*"), key=lambda p: int(p.name[1:]))
    metrics = _metrics(latest)
    assert set(metrics) == {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO"}
    assert metrics["pixel_AUROC"] >= MIN_PIXEL_AUROC
    assert 0.5 < metrics["pixel_AUPRO"] <= 1.0
    assert not (latest / "images").exists()
    capsys.readouterr()
    assert main(["eval", "--root", str(trained_run), "--tiling.stride", "32"]) == 2
    assert "tiling: the run was trained with" in capsys.readouterr().err


def test_predict_on_a_folder_of_unlabeled_images(trained_run: Path, dataset_root: Path, tmp_path: Path) -> None:
    images = dataset_root / CATEGORY / "test" / "blob"
    output = tmp_path / "predictions"
    assert main(["predict", "--root", str(trained_run), "--data", str(images), "--output", str(output)]) == 0
    rows = list(csv.DictReader((output / "predictions.csv").open()))
    assert len(rows) == len(list(images.glob("*.png")))
    for row in rows:
        anomaly_map = np.load(output / row["anomaly_map"])
        assert anomaly_map.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert 0.0 <= anomaly_map.min() <= anomaly_map.max() <= 1.0  # normalised like the run's evaluation
        assert row["pred_label"] == str(int(float(row["pred_score"]) > 0.5))  # image threshold at 0.5
        assert Image.open(output / row["result_image"]).size == (2 * IMAGE_SIZE, IMAGE_SIZE)
        assert row["gt_label"] == ""
    # Anomalous images mostly get anomalous labels.
    assert sum(row["pred_label"] == "1" for row in rows) >= len(rows) // 2


def test_predict_accepts_a_glob_and_refuses_an_empty_match(
    trained_run: Path, dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pattern = str(dataset_root / CATEGORY / "test" / "good" / "00[01].png")
    assert main(["predict", "--root", str(trained_run), "--data", pattern, "--output", str(tmp_path / "p")]) == 0
    assert len((tmp_path / "p" / "predictions.csv").read_text().splitlines()) == 3
    capsys.readouterr()
    status = main(["predict", "--root", str(trained_run), "--data", str(tmp_path / "none" / "*.png")])
    assert status == 1
    assert "no images match" in capsys.readouterr().err


def test_python_api_matches_the_cli_and_is_deterministic(dataset_root: Path, trained_run: Path, tmp_path: Path) -> None:
    engine = TiledEnsembleEngine(
        image_size=IMAGE_SIZE,
        tile_size=TILE_SIZE,
        seam_smoothing=config_smoothing(),
        normalization_stage="image",
        accelerator="cpu",
        default_root_dir=tmp_path,
        visualization=None,
    )
    datamodule = MVTecAD(root=dataset_root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0)
    results = engine.train(model=Padim(backbone="resnet18", pre_trained=False, n_features=20), datamodule=datamodule)
    assert isinstance(results, list) and len(results) == 1
    # Same seed, same data, same settings as the CLI run: same numbers.
    assert results[0] == pytest.approx(_metrics(trained_run / "eval" / "v0"), abs=1e-6)
    predictions = engine.predict(data_path=dataset_root / CATEGORY / "test" / "scratch")
    assert len(predictions) == 4
    assert predictions[0].anomaly_map.shape == (IMAGE_SIZE, IMAGE_SIZE)
    reloaded = TiledEnsembleEngine.from_run(engine.run.root)
    assert reloaded.test()[0] == pytest.approx(results[0], abs=1e-6)


def config_smoothing() -> object:
    from anomalib_tiled.settings import SeamSmoothingConfig

    return SeamSmoothingConfig(apply=True, sigma=1.5, width=0.1)


@pytest.mark.parametrize(
    ("model", "trainer"),
    [
        (
            {
                "class_path": "Patchcore",
                "init_args": {"backbone": "resnet18", "pre_trained": False, "coreset_sampling_ratio": 0.05},
            },
            {},
        ),
        (
            {"class_path": "Fastflow", "init_args": {"backbone": "resnet18", "pre_trained": False, "flow_steps": 2}},
            {"max_epochs": 1, "logger": {"class_path": "CSVLogger"}},
        ),
    ],
    ids=["patchcore", "fastflow"],
)
def test_other_models_train_and_evaluate(dataset_root: Path, tmp_path: Path, model: dict, trainer: dict) -> None:
    cfg = base_config(dataset_root, tmp_path / "results", visualization={"save": False})
    cfg["TrainModels"] = {**cfg["TrainModels"], "model": model, "trainer": trainer}
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = next((tmp_path / "results").glob("*/MVTecAD/*/v0"))
    metrics = _metrics(run / "eval" / "v0")
    assert set(metrics) == {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}
    # Random backbones still find the obvious synthetic defects (both models score 1.0 / >= 0.95 here).
    assert metrics["image_AUROC"] >= MIN_IMAGE_AUROC and metrics["pixel_AUROC"] >= MIN_PIXEL_AUROC
    for tile in ("tile_r0_c0", "tile_r0_c1", "tile_r1_c0", "tile_r1_c1"):
        # The trainer arguments reach every tile model: one epoch each.
        assert _checkpoint(run, tile)["epoch"] == trainer.get("max_epochs", 1)
    if "logger" in trainer:
        # A configured logger logs every tile model into that tile's folder of the run.
        logs = sorted(run.glob("tiles/tile_r*_c*/lightning_logs/version_0/metrics.csv"))
        assert [log.parents[2].name for log in logs] == ["tile_r0_c0", "tile_r0_c1", "tile_r1_c0", "tile_r1_c1"]
        for log in logs:
            rows = list(csv.DictReader(log.open()))
            assert [float(row["train_loss_epoch"]) for row in rows if row.get("train_loss_epoch")]


def test_fastflow_with_early_stopping_on_pixel_auroc(dataset_root: Path, tmp_path: Path) -> None:
    """The guide's FastFlow example: EarlyStopping monitors pixel_AUROC, which each tile model computes.

    ``min_delta: 1.0`` asks for an AUROC gain no epoch can make, so with ``patience: 1`` every tile stops
    after its second validation: deterministically, and long before ``max_epochs``. A tile that did not
    compute pixel_AUROC would fail (the monitor is missing) or stop after one epoch (NaN is not finite).
    """
    max_epochs, patience = 20, 1
    cfg = base_config(dataset_root, tmp_path / "results", visualization={"save": False})
    cfg["TrainModels"] = {
        "model": {
            "class_path": "Fastflow",
            "init_args": {"backbone": "resnet18", "pre_trained": False, "flow_steps": 2},
        },
        "metrics": {"pixel": "AUROC", "image": "AUROC"},
        "trainer": {
            "max_epochs": max_epochs,
            "logger": {"class_path": "CSVLogger"},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                    "init_args": {"patience": patience, "monitor": "pixel_AUROC", "mode": "max", "min_delta": 1.0},
                },
            ],
        },
    }
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = next((tmp_path / "results").glob("Fastflow/MVTecAD/*/v0"))
    fitted = len(SplitRecord.load(run / "splits" / "train"))  # 8: 2 of the 10 are held out to calibrate
    steps_per_epoch = -(-fitted // 4)  # batches of 4
    for tile in json.loads((run / "manifest.json").read_text())["tiles"]:
        checkpoint = _checkpoint(run, tile)
        assert checkpoint["epoch"] == patience + 1 < max_epochs, tile
        assert checkpoint["global_step"] == (patience + 1) * steps_per_epoch, tile
        log = run / "tiles" / tile / "lightning_logs" / "version_0" / "metrics.csv"
        monitored = [float(row["pixel_AUROC"]) for row in csv.DictReader(log.open()) if row["pixel_AUROC"]]
        assert len(monitored) == patience + 1 and all(MIN_PIXEL_AUROC <= value <= 1 for value in monitored), tile
    assert _metrics(run / "eval" / "v0")["pixel_AUROC"] >= MIN_PIXEL_AUROC


def test_early_stopping_on_a_metric_no_tile_model_logs(
    dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = base_config(dataset_root, tmp_path / "results")
    cfg["TrainModels"] = {
        **cfg["TrainModels"],
        "trainer": {
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "pixel_AUROCC"}}
            ]
        },
    }
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "monitor 'pixel_AUROCC'" in err and "did you mean 'AUROC'" in err
    assert not (tmp_path / "results").exists()


def test_overlapping_tiles_with_windowed_blending(dataset_root: Path, tmp_path: Path) -> None:
    cfg = base_config(dataset_root, tmp_path / "results", visualization={"save": False})
    cfg["tiling"] = {"tile_size": TILE_SIZE, "stride": 40}  # 3x3, snapped last tile, stride not dividing the tile
    cfg["merge"] = {"blending": "hann", "image_score": "max_map"}
    cfg["normalization_stage"] = "tile"
    cfg["thresholding"] = {"method": "F1AdaptiveThreshold", "stage": "tile"}
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = next((tmp_path / "results").glob("Padim/MVTecAD/*/v0"))
    assert len(json.loads((run / "manifest.json").read_text())["tiles"]) == 9
    stats = json.loads((run / "stats.json").read_text())
    assert len(stats["tile"]) == 9 and stats["image"] is None
    assert _metrics(run / "eval" / "v0")["pixel_AUROC"] >= MIN_PIXEL_AUROC
