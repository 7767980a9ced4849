"""Configuration: the guide's and upstream's formats, overrides, and one-line errors before any work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from anomalib_tiled.cli import main
from anomalib_tiled.cli.arguments import parse_args
from anomalib_tiled.config.format import settings_from_namespace, spec_from_namespace
from anomalib_tiled.data.synthetic import make_dataset
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.settings import NormalizationStage, SeamSmoothingConfig, ThresholdStage
from tests.conftest import base_config, write_config

# The tiled-ensemble guide's config, as printed in the guide (anomalib 1.x names and keys included).
GUIDE_CONFIG = """\
seed: 42
accelerator: "gpu"
default_root_dir: "results"

tiling:
  tile_size: [128, 128]
  stride: 128

normalization_stage: image # on what stage to apply normalization: tile, image, none
thresholding:
  method: F1AdaptiveThreshold # refer to documentation for thresholding methods
  stage: image # stage at which we apply threshold: tile, image

data:
  class_path: anomalib.data.MVTec
  init_args:
    root: ./datasets/MVTec
    category: bottle
    train_batch_size: 32
    eval_batch_size: 32
    num_workers: 8
    task: segmentation
    transform: null
    train_transform: null
    eval_transform: null
    test_split_mode: from_dir
    test_split_ratio: 0.2
    val_split_mode: same_as_test
    val_split_ratio: 0.5
    image_size: [256, 256]

SeamSmoothing:
  apply: True # if this is applied, area around tile seams are is smoothed
  sigma: 2 # sigma of gaussian filter used to smooth this area
  width: 0.1 # width factor, multiplied by tile dimension gives the region width around seam which will be smoothed

TrainModels:
  model:
    class_path: Padim

  metrics:
    pixel: AUROC
    image: AUROC
"""


def _guide_config(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "ens_config.yaml"
    path.write_text(GUIDE_CONFIG.replace("./datasets/MVTec", str(root)), encoding="utf-8")
    return path


def test_guide_config_is_read_into_the_canonical_settings(tmp_path: Path) -> None:
    cfg, _ = parse_args("train", ["--config", str(_guide_config(tmp_path, tmp_path)), "--accelerator", "cpu"])
    settings = settings_from_namespace(cfg)
    assert settings.grid.image_size == (256, 256)
    assert settings.grid.tile_size == (128, 128)
    assert settings.grid.stride == (128, 128)
    assert len(settings.grid) == 4
    assert settings.postprocessing.normalization_stage == NormalizationStage.IMAGE
    assert settings.postprocessing.thresholding.stage == ThresholdStage.IMAGE
    assert settings.postprocessing.thresholding.method == "F1AdaptiveThreshold"
    assert settings.postprocessing.seam_smoothing.apply and settings.postprocessing.seam_smoothing.sigma == 2
    assert settings.postprocessing.metrics.pixel == ["AUROC"] and settings.postprocessing.metrics.image == ["AUROC"]
    data = spec_from_namespace(cfg.data)
    assert data["class_path"] == "anomalib.data.MVTecAD"
    assert data["init_args"]["category"] == "bottle"
    assert not {"task", "transform", "image_size", "train_transform", "eval_transform"} & set(data["init_args"])
    assert spec_from_namespace(cfg.TrainModels.model)["class_path"] == "anomalib.models.Padim"


@pytest.mark.slow
def test_guide_config_trains_with_only_the_data_root_changed(tmp_path: Path) -> None:
    """The guide's config runs unchanged but for the data root (and a CPU with a random backbone here)."""
    make_dataset(tmp_path / "data", size=256, n_train=6, n_test_good=2, n_test_defect=2, seed=1, category="bottle")
    guide = _guide_config(tmp_path, tmp_path / "data")
    overrides = ["--accelerator", "cpu", "--TrainModels.model.init_args.pre_trained", "false"]
    overrides += ["--default_root_dir", str(tmp_path / "results"), "--visualization.save", "false"]
    if torch.cuda.is_available():
        overrides = overrides[2:]
    assert main(["train", "--config", str(guide), *overrides]) == 0
    run = tmp_path / "results" / "Padim" / "MVTecAD" / "bottle" / "v0"
    metrics = yaml.safe_load((run / "eval" / "v0" / "metrics.json").read_text())
    assert set(metrics) == {"image_AUROC", "pixel_AUROC"}
    # 2 good and 2x2 anomalous test images with obvious defects, found even with a random backbone.
    assert metrics["image_AUROC"] >= 0.9 and metrics["pixel_AUROC"] >= 0.9, metrics
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["tiling"] == {"tile_size": [128, 128], "stride": [128, 128], "image_size": [256, 256]}
    assert config["SeamSmoothing"] == {"apply": True, "sigma": 2.0, "width": 0.1}


def test_upstream_format_is_accepted(tmp_path: Path) -> None:
    upstream = {
        "seed": 1,
        "accelerator": "cpu",
        "default_root_dir": "results",
        "tiling": {"image_size": [100, 100], "tile_size": [50, 50], "stride": 25},
        "normalization_stage": "tile",
        "thresholding_stage": "tile",
        "data": {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": str(tmp_path), "category": "bottle"}},
        "SeamSmoothing": {"apply": False, "sigma": 2, "width": 0.1},
        "TrainModels": {"model": {"class_path": "Padim"}},
    }
    cfg, _ = parse_args("train", ["--config", str(write_config(tmp_path / "up.yaml", upstream))])
    settings = settings_from_namespace(cfg)
    assert settings.grid.shape == (3, 3)
    assert settings.postprocessing.thresholding.stage == ThresholdStage.TILE
    assert settings.postprocessing.normalization_stage == NormalizationStage.TILE


def test_both_image_sizes_given_tiling_wins_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    both = base_config(tmp_path, tmp_path)
    both["tiling"]["image_size"] = [96, 96]
    with caplog.at_level(logging.WARNING):
        cfg, _ = parse_args("train", ["--config", str(write_config(tmp_path / "c.yaml", both))])
    assert settings_from_namespace(cfg).grid.image_size == (96, 96)
    assert "using tiling.image_size" in caplog.text


def test_both_threshold_stages_given_thresholding_stage_key_loses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    both = base_config(tmp_path, tmp_path, thresholding_stage="tile")
    with caplog.at_level(logging.WARNING):
        cfg, _ = parse_args("train", ["--config", str(write_config(tmp_path / "c.yaml", both))])
    assert settings_from_namespace(cfg).postprocessing.thresholding.stage == ThresholdStage.IMAGE
    assert "using thresholding.stage" in caplog.text


def test_command_line_overrides_any_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", base_config(tmp_path, tmp_path))
    cfg, _ = parse_args(
        "train",
        ["--config", str(path), "--tiling.stride", "32", "--TrainModels.model.init_args.backbone", "resnet34"],
    )
    assert settings_from_namespace(cfg).grid.stride == (32, 32)
    assert cfg.TrainModels.model.init_args.backbone == "resnet34"


def test_print_config_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "c.yaml", base_config(tmp_path, tmp_path))
    assert main(["train", "--config", str(path), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tiling"]["image_size"] == [128, 128]
    assert printed["data"]["class_path"] == "anomalib.data.MVTecAD"


def test_help_lists_options_with_descriptions(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--tiling.tile_size" in text and "--SeamSmoothing.apply" in text and "Tile size seen by each model" in text
    assert main(["--help"]) == 0
    assert {"train", "eval", "predict"} <= set(capsys.readouterr().out.split())


def _error(tmp_path: Path, capsys: pytest.CaptureFixture, cfg: dict, *args: str) -> tuple[int, str]:
    status = main(["train", "--config", str(write_config(tmp_path / "bad.yaml", cfg)), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return status, err[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"tiling": {"tile_size": 256, "image_size": 128}},
            "tiling.tile_size: tile height 256 is larger than the image height 128",
        ),
        ({"tiling": {"tile_size": 64, "stride": 80}}, "tiling.stride: stride 80 is larger than the tile height 64"),
        ({"tiling": {"tile_size": 64, "stride": 0}}, "tiling.stride: stride must be > 0, got 0"),
        ({"tiling": {"tile_size": 64, "stride": -8}}, "tiling.stride: stride must be > 0, got -8"),
        ({"tiling": {"tile_size": "big"}}, "tiling.tile_size"),
        ({"tiling": {"tile_size": [64, 64, 64]}}, "tiling.tile_size"),
        ({"normalization_stage": "tiles"}, "normalization_stage"),
        ({"thresholding": {"method": "F1AdaptiveThreshold", "stage": "images"}}, "thresholding.stage"),
        ({"thresholding": {"method": "F1AdaptiveTreshold"}}, "did you mean 'F1AdaptiveThreshold'"),
        ({"TrainModels": {"model": {"class_path": "Padm"}}}, "did you mean 'Padim'"),
        (
            {"TrainModels": {"model": {"class_path": "Padim", "init_args": {"n_feature": 10}}}},
            "did you mean 'n_features'",
        ),
        (
            {"TrainModels": {"model": {"class_path": "Padim"}, "metrics": {"image": ["AUROCC"]}}},
            "TrainModels.metrics.image[0]: unknown class 'AUROCC' (did you mean 'AUROC'?)",
        ),
        (
            {
                "TrainModels": {
                    "model": {"class_path": "Padim"},
                    "trainer": {"callbacks": [{"class_path": "EarlyStoping"}]},
                }
            },
            "did you mean 'EarlyStopping'",
        ),
        ({"tilng": {"tile_size": 64}}, "tilng.tile_size: unknown config key (did you mean 'tiling.tile_size'?)"),
        ({"TrainModels": {"model": {"class_path": "Padim"}, "trainer": {"max_epoch": 3}}}, "did you mean 'max_epochs'"),
        ({"accelerator": "tpu"}, "accelerator: unknown value 'tpu'"),
        (
            {"thresholding": {"method": {"class_path": "ManualThreshold", "init_args": {"value": 0.5}}}},
            "thresholding.method: ManualThreshold cannot be built with {'value': 0.5}",
        ),
        (
            {
                "TrainModels": {
                    "model": {"class_path": "Padim"},
                    "trainer": {
                        "callbacks": [
                            {"class_path": "EarlyStopping", "init_args": {"monitor": "pixel_AUROC", "mode": "maxx"}},
                        ],
                    },
                },
            },
            "TrainModels.trainer.callbacks[0]: EarlyStopping rejected its arguments",
        ),
    ],
)
def test_invalid_config_gives_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    change: dict,
    expected: str,
) -> None:
    cfg = base_config(tmp_path, tmp_path / "results")
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and key != "TrainModels" else value
    status, line = _error(tmp_path, capsys, cfg)
    assert status == 2
    assert line.startswith("error: ")
    assert expected in line
    assert not (tmp_path / "results").exists()  # nothing written before validation passed


def test_yaml_syntax_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 42\ntiling:\n  tile_size: [64, 64\n  stride: 64\n", encoding="utf-8")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "YAML syntax error at line 4, column 9: expected ',' or ']'" in err
    assert len(err.splitlines()) == 1


def test_unknown_override_suggests_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = base_config(tmp_path, tmp_path / "results")
    status, line = _error(tmp_path, capsys, cfg, "--tiling.strid", "32")
    assert status == 2 and "did you mean 'tiling.stride'" in line


def test_gpu_requested_on_a_machine_without_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status, line = _error(tmp_path, capsys, base_config(tmp_path, tmp_path / "results", accelerator="gpu"))
    assert status == 2 and "no CUDA GPU is available" in line and "accelerator: cpu" in line


def test_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = base_config(tmp_path / "nowhere", tmp_path / "results")
    status, line = _error(tmp_path, capsys, cfg)
    assert status == 1 and "does not exist" in line and "data.init_args.root" in line
    assert not (tmp_path / "results").exists()


def test_settings_reject_bad_smoothing() -> None:
    with pytest.raises(ConfigError, match=r"SeamSmoothing\.width: must be in \(0, 1\]"):
        SeamSmoothingConfig(apply=True, width=3)
