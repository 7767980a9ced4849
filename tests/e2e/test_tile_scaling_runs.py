"""Tile scaling end to end: held-out normal images, learned tile scales, re-evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalib_tiled.cli import main
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.data.synthetic import CATEGORY, make_dataset
from anomalib_tiled.export import export_run
from tests.conftest import IMAGE_SIZE, base_config, write_config
from tests.e2e.test_export import assert_parity, run_based_predict


@pytest.fixture(scope="module")
def calibrated_run(dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2x2 run holding 3 of its 10 training images out, merged with z-scored tiles and top-k scores."""
    work = tmp_path_factory.mktemp("calibrated")
    config = base_config(
        dataset_root, work / "results", merge={"tile_scaling": "normal_zscore", "image_score": "topk_map"}
    )
    config["TrainModels"]["calibration_share"] = 0.3
    config["TrainModels"]["metrics"]["pixel"] = ["AUROC"]
    assert main(["train", "--config", str(write_config(work / "config.yaml", config))]) == 0
    (run,) = (work / "results" / "Padim" / "MVTecAD" / CATEGORY).glob("v*")
    return run


@pytest.mark.slow
def test_held_out_images_are_never_fitted_and_calibrate_every_tile(calibrated_run: Path) -> None:
    manifest = json.loads((calibrated_run / "manifest.json").read_text())
    train = SplitRecord.load(calibrated_run / "splits" / "train")
    held_out = SplitRecord.load(calibrated_run / "splits" / "calibration")
    assert (len(train), len(held_out)) == (7, 3)
    assert not set(train.image_paths) & set(held_out.image_paths)
    assert set(held_out.labels) == {0} and not held_out.has_masks
    assert manifest["splits"]["calibration"] == held_out.fingerprint
    stats = json.loads((calibrated_run / "stats.json").read_text())
    assert len(stats["normal"]) == 4
    assert all(scale["map_scale"] > 0 and scale["score_scale"] > 0 for scale in stats["normal"])
    metrics = json.loads((calibrated_run / "eval" / "v0" / "metrics.json").read_text())
    assert metrics["image_AUROC"] >= 0.75


@pytest.mark.slow
def test_a_run_is_re_evaluated_with_another_scaling_and_pooling(calibrated_run: Path) -> None:
    args = ["eval", "--root", str(calibrated_run), "--merge.tile_scaling", "normal_quantile"]
    assert main([*args, "--merge.image_score", "mean_tiles"]) == 0
    assert main(["eval", "--root", str(calibrated_run), "--merge.tile_scaling", "none"]) == 0
    evaluations = [calibrated_run / "eval" / f"v{index}" for index in (1, 2)]
    quantile, raw = (json.loads((folder / "stats.json").read_text()) for folder in evaluations)
    assert quantile["normal"] is not None and raw["normal"] is None
    first, *others = (json.loads((calibrated_run / "eval" / f"v{i}" / "metrics.json").read_text()) for i in range(3))
    assert all(set(other) == set(first) for other in others)


@pytest.mark.slow
def test_the_held_out_share_is_frozen(calibrated_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--root", str(calibrated_run), "--TrainModels.calibration_share", "0.5"]) == 2
    assert "TrainModels.calibration_share: the run was trained with 0.3, not 0.5" in capsys.readouterr().err


def test_scaling_without_a_held_out_share_fails_before_any_work(
    dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = base_config(dataset_root, tmp_path / "results", merge={"tile_scaling": "normal_quantile"})
    config["TrainModels"]["calibration_share"] = 0.0
    assert main(["train", "--config", str(write_config(tmp_path / "config.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "error: merge.tile_scaling: normal_quantile learns each tile's scale" in err
    assert not (tmp_path / "results").exists()


def test_holding_out_every_training_image_is_refused(
    dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = base_config(dataset_root, tmp_path / "results")
    config["TrainModels"]["calibration_share"] = 0.95
    assert main(["train", "--config", str(write_config(tmp_path / "config.yaml", config))]) == 1  # a data error
    assert "calibration_share: 0.95 of 10 training image(s) leaves none to fit on" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_an_exported_calibrated_ensemble_scales_tiles_as_predict_does(calibrated_run: Path, tmp_path: Path) -> None:
    images = make_dataset(tmp_path / "unseen", size=IMAGE_SIZE, n_train=0, n_test_good=3, n_test_defect=2, seed=5)
    reference = run_based_predict(calibrated_run, images / "test", tmp_path / "predict")
    assert_parity(export_run(calibrated_run, "onnx", output=tmp_path / "onnx"), reference)
