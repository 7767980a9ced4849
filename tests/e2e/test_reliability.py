"""Reliability: bad inputs fail fast with one line, interrupted runs resume, runs never lie."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from anomalib_tiled.cli import main
from anomalib_tiled.data.synthetic import CATEGORY, make_dataset
from tests.conftest import IMAGE_SIZE, base_config, interrupt_training, write_config


class PauseAfterFit(Callback):
    """Slows each tile down so a test can interrupt training between tiles (results are unchanged)."""

    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = seconds

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        time.sleep(self.seconds)


def _copy_dataset(dataset_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(dataset_root, copy)
    return copy


def _fail(tmp_path: Path, capsys: pytest.CaptureFixture, cfg: dict, *args: str) -> tuple[int, str]:
    status = main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg)), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return status, errors[0]


def _assert_nothing_complete(results: Path) -> None:
    """No run under ``results`` claims to be trained, and no evaluation wrote metrics."""
    for manifest in results.rglob("manifest.json"):
        assert json.loads(manifest.read_text())["status"] != "trained"
    assert not list(results.rglob("metrics.json"))


# -- data problems ---------------------------------------------------------------------------------


def test_empty_data_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    status, line = _fail(tmp_path, capsys, base_config(tmp_path / "empty", tmp_path / "results"))
    assert status == 1 and "data:" in line and "could not be set up" in line
    assert not (tmp_path / "results").exists()


def test_category_without_training_images(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_dataset(dataset_root, tmp_path)
    shutil.rmtree(data / CATEGORY / "train")
    status, line = _fail(tmp_path, capsys, base_config(data, tmp_path / "results"))
    assert status == 1 and "no training images found" in line and "train/good" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str) -> None:
    data = _copy_dataset(dataset_root, tmp_path)
    broken = data / CATEGORY / "train" / "good" / "003.png"
    content = broken.read_bytes()
    broken.write_bytes(b"not an image at all" if damage == "garbage" else content[: len(content) // 3])
    status, line = _fail(tmp_path, capsys, base_config(data, tmp_path / "results"))
    assert status == 1 and str(broken) in line and "cannot read image" in line
    _assert_nothing_complete(tmp_path / "results")


def test_mask_of_the_wrong_size_names_both_files(
    dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _copy_dataset(dataset_root, tmp_path)
    mask = data / CATEGORY / "ground_truth" / "blob" / "001_mask.png"
    Image.open(mask).resize((IMAGE_SIZE // 2, IMAGE_SIZE // 2)).save(mask)
    status, line = _fail(tmp_path, capsys, base_config(data, tmp_path / "results"))
    assert status == 1 and str(mask) in line and "test/blob/001.png" in line and "64x64" in line
    _assert_nothing_complete(tmp_path / "results")


def test_test_split_without_anomalies_when_auroc_is_requested(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    make_dataset(data, size=IMAGE_SIZE, n_train=4, n_test_good=3, n_test_defect=0)
    status, line = _fail(tmp_path, capsys, base_config(data, tmp_path / "results"))
    assert status == 1 and "no anomalous images" in line and "AUROC" in line
    assert not (tmp_path / "results").exists()


def test_image_normalisation_without_validation_split(
    dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = base_config(dataset_root, tmp_path / "results")
    cfg["data"]["init_args"]["val_split_mode"] = "none"
    status, line = _fail(tmp_path, capsys, cfg)
    assert status == 2 and "no validation split" in line and "val_split_mode" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_without_validation_split_a_manual_threshold_and_no_normalisation_work(
    dataset_root: Path, tmp_path: Path
) -> None:
    cfg = base_config(dataset_root, tmp_path / "results", normalization_stage="none", visualization={"save": False})
    cfg["data"]["init_args"]["val_split_mode"] = "none"
    cfg["thresholding"] = {
        "method": {"class_path": "ManualThreshold", "init_args": {"default_value": 3.0}},
        "stage": "image",
    }
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = next((tmp_path / "results").glob("*/*/*/v0"))
    stats = json.loads((run / "stats.json").read_text())
    assert stats["split"] is None and stats["tile"] is None  # nothing learned: no validation split
    assert stats["image"]["image_threshold"] == stats["image"]["pixel_threshold"] == 3.0
    rows = list(csv.DictReader((run / "eval" / "v0" / "predictions.csv").open()))
    assert len(rows) == 12
    # Raw merged scores against the raw manual threshold.
    assert [row["pred_label"] for row in rows] == [str(int(float(row["pred_score"]) > 3.0)) for row in rows]
    assert set(json.loads((run / "eval" / "v0" / "metrics.json").read_text())) == {
        "image_AUROC",
        "image_F1Score",
        "pixel_AUROC",
        "pixel_F1Score",
    }


def test_output_directory_not_writable(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status, line = _fail(tmp_path, capsys, base_config(dataset_root, blocker / "results"))
    assert status == 1 and "default_root_dir: cannot write to" in line


def test_init_args_the_model_rejects(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = base_config(dataset_root, tmp_path / "results")
    cfg["TrainModels"]["model"]["init_args"]["backbone"] = "no_such_backbone"
    status, line = _fail(tmp_path, capsys, cfg)
    assert status == 2 and line.startswith("error: TrainModels.model.init_args: Padim cannot be built")
    assert not (tmp_path / "results").exists()


def test_model_post_processor_is_refused(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = base_config(dataset_root, tmp_path / "results")
    cfg["TrainModels"]["model"]["init_args"]["post_processor"] = {
        "class_path": "anomalib.post_processing.PostProcessor"
    }
    status, line = _fail(tmp_path, capsys, cfg)
    assert status == 2 and "post_processor: not supported in a tiled ensemble" in line


# -- run directories -------------------------------------------------------------------------------


def test_eval_on_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--root", str(tmp_path)]) == 1
    assert "is not a tiled-ensemble run" in capsys.readouterr().err
    assert main(["eval", "--root", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, symlinks=True)
    return copy


@pytest.mark.slow
def test_eval_on_a_run_with_a_missing_checkpoint(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (run_copy / "weights" / "tile_r0_c1.ckpt").unlink()
    assert main(["eval", "--root", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "tile_r0_c1.ckpt: tile checkpoint is missing" in err and "--resume" in err


@pytest.mark.slow
def test_eval_on_a_run_with_a_truncated_checkpoint(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = run_copy / "weights" / "tile_r1_c0.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert main(["eval", "--root", str(run_copy)]) == 1
    assert "tile_r1_c0.ckpt: tile checkpoint is corrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_contents_are_verified_before_loading(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = run_copy / "weights" / "tile_r0_c0.ckpt"
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes
    checkpoint.write_bytes(bytes(data))
    shutil.rmtree(run_copy / "predictions")  # force eval to load the checkpoints
    assert main(["eval", "--root", str(run_copy)]) == 1
    assert "tile_r0_c0.ckpt: tile checkpoint is corrupt (size/sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_an_unfinished_run(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", "--root", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "is unfinished (status: interrupted)" in err and f"--resume {run_copy}" in err
    assert main(["predict", "--root", str(run_copy), "--data", str(run_copy)]) == 1
    assert "is unfinished" in capsys.readouterr().err


class _Exploit:
    """Pickles into a call that writes a marker file: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.slow
def test_checkpoints_are_loaded_without_running_pickled_code(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from anomalib_tiled.run.directory import RunDirectory, file_digest

    marker = tmp_path / "marker"
    checkpoint = run_copy / "weights" / "tile_r0_c0.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    state["payload"] = _Exploit(marker)
    with checkpoint.open("wb") as handle:
        torch.save(state, handle, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    # A tampered run directory with a consistent manifest: only safe loading protects us.
    run = RunDirectory(run_copy)
    run.record_tile("tile_r0_c0", {"checkpoint": file_digest(checkpoint)})
    shutil.rmtree(run_copy / "predictions")
    assert main(["eval", "--root", str(run_copy)]) == 1
    assert not marker.exists()
    assert "error:" in capsys.readouterr().err


# -- interruption and resume -----------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_during_training_keeps_finished_tiles_and_resume_matches_an_uninterrupted_run(
    dataset_root: Path,
    trained_run: Path,
    tmp_path: Path,
) -> None:
    cfg = base_config(dataset_root, tmp_path / "results")
    cfg["TrainModels"] = {
        **cfg["TrainModels"],
        "trainer": {
            "callbacks": [{"class_path": "tests.e2e.test_reliability.PauseAfterFit", "init_args": {"seconds": 3.0}}]
        },
    }
    config = write_config(tmp_path / "c.yaml", cfg)
    manifest_path, stderr = interrupt_training(config, tmp_path / "results")
    run = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "interrupted"
    assert 1 <= len(manifest["tiles"]) < 4
    assert "resume with 'anomalib tiled train --resume" in stderr.strip().splitlines()[-1]
    assert not (run / "eval").exists()
    kept = {tile: entry["checkpoint"]["sha256"] for tile, entry in manifest["tiles"].items()}

    assert main(["train", "--resume", str(run)]) == 0
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == 4
    for tile, digest in kept.items():  # finished tiles were kept, not retrained
        assert manifest["tiles"][tile]["checkpoint"]["sha256"] == digest
    resumed = json.loads((run / "eval" / "v0" / "metrics.json").read_text())
    uninterrupted = json.loads((trained_run / "eval" / "v0" / "metrics.json").read_text())
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)


@pytest.mark.slow
def test_resume_retrains_a_tile_whose_checkpoint_is_corrupt(run_copy: Path) -> None:
    checkpoint = run_copy / "weights" / "tile_r1_c1.ckpt"
    checkpoint.write_bytes(b"")
    assert main(["train", "--resume", str(run_copy), "--evaluate", "false"]) == 0
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["status"] == "trained"
    assert checkpoint.stat().st_size == manifest["tiles"]["tile_r1_c1"]["checkpoint"]["size"] > 0


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_and_marks_it_failed(
    dataset_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from anomalib_tiled.merge import merging

    def broken_merge(*args: object, **kwargs: object) -> None:
        raise RuntimeError("merge exploded")

    monkeypatch.setattr(merging.TileMerger, "merge", broken_merge)
    status, line = _fail(tmp_path, capsys, base_config(dataset_root, tmp_path / "results"))
    assert status == 1 and "RuntimeError: merge exploded" in line
    run = next((tmp_path / "results").glob("*/*/*/v0"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert "merge exploded" in (run / "run.log").read_text()  # the traceback is in the run's log
    _assert_nothing_complete(tmp_path / "results")


def test_resume_of_a_missing_run_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--resume", str(tmp_path / "gone")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --resume: {tmp_path / 'gone'} does not exist")


@pytest.mark.slow
def test_predict_keeps_the_runs_visualization_settings_unless_overridden(
    run_copy: Path,
    dataset_root: Path,
    tmp_path: Path,
) -> None:
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("save: true", "save: false"))
    images = str(dataset_root / CATEGORY / "test" / "good")
    assert main(["predict", "--root", str(run_copy), "--data", images, "--output", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / "images").exists()
    override = ["--visualization.save", "true"]
    assert main(["predict", "--root", str(run_copy), "--data", images, "--output", str(tmp_path / "b"), *override]) == 0
    assert len(list((tmp_path / "b" / "images").glob("*.png"))) == 4
    # Tile predictions of unlabeled images are not kept in the run.
    kept = {p.name for p in (run_copy / "predictions").iterdir()}
    trained = set(json.loads((run_copy / "manifest.json").read_text())["splits"].values())
    assert kept <= trained
