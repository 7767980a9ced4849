"""Settings are plain values; validation checks the environment just before work; a run freezes its training keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from anomalib_tiled.config.checks import (
    check_metric_inputs,
    check_runtime,
    check_statistics_source,
    check_trainer,
    check_training_splits,
    check_writable,
)
from anomalib_tiled.errors import ConfigError, DataError, RunDirectoryError
from anomalib_tiled.execution.models import ModelFactory
from anomalib_tiled.run.config import RunConfig, check_frozen, read_run_config, write_run_config
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.settings import (
    EnsembleSettings,
    MergeConfig,
    MetricsConfig,
    PostProcessingSettings,
    RuntimeSettings,
    SeamSmoothingConfig,
    ThresholdingConfig,
    TrainingSettings,
    VisualizationConfig,
)
from anomalib_tiled.tiling import TileGrid

MODEL = {"class_path": "Padim", "init_args": {"backbone": "resnet18", "n_features": 20}}


def _no_hardware_probe(*args: object) -> bool:
    raise AssertionError("settings must not probe the hardware")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, as far as torch can tell, has neither CUDA nor MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _settings(**changes: object) -> EnsembleSettings:
    """Settings of a 2x2 run; ``changes`` replace fields of the training, post-processing or runtime part."""
    settings = EnsembleSettings(TrainingSettings(TileGrid.create(128, 64), seed=42, trainer={"max_epochs": 1}))
    for part in ("training", "postprocessing", "runtime"):
        fields = {f.name for f in dataclasses.fields(getattr(settings, part))}
        own = {key: value for key, value in changes.items() if key in fields}
        if own:
            settings = dataclasses.replace(settings, **{part: dataclasses.replace(getattr(settings, part), **own)})
    return settings


# -- settings and the environment ------------------------------------------------------------------


def test_settings_construct_without_probing_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", _no_hardware_probe)
    monkeypatch.setattr(torch.backends.mps, "is_available", _no_hardware_probe)
    settings = _settings(accelerator="gpu", devices=[1], default_root_dir="/nonexistent/results")
    assert settings.runtime == RuntimeSettings("gpu", [1], Path("/nonexistent/results"))
    assert RuntimeSettings(accelerator="tpu").accelerator == "tpu"  # judged by validation, not here


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_check_runtime_refuses_a_gpu_this_machine_lacks(no_cuda: None, accelerator: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_runtime(RuntimeSettings(accelerator=accelerator))
    assert str(error.value) == (
        f"accelerator: '{accelerator}' requested but no CUDA GPU is available on this machine "
        "(torch.cuda.is_available() is False); use accelerator: cpu or auto"
    )


def test_check_runtime_refuses_mps_this_machine_lacks(no_cuda: None) -> None:
    with pytest.raises(ConfigError, match=r"^accelerator: 'mps' requested but Apple MPS is not available"):
        check_runtime(RuntimeSettings(accelerator="mps"))


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        (
            RuntimeSettings("quantum"),
            "accelerator: unknown value 'quantum'; use one of ['auto', 'cpu', 'gpu', 'cuda', 'mps']",
        ),
        (RuntimeSettings("CPU"), "accelerator: unknown value 'CPU' (did you mean 'cpu'?)"),
        (RuntimeSettings("cpu", devices=2), "devices: 2 is not supported; each tile model runs on one device"),
        (RuntimeSettings("cpu", devices=[0, 1]), "devices: [0, 1] is not supported"),
    ],
)
def test_check_runtime_names_the_bad_key(no_cuda: None, runtime: RuntimeSettings, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_runtime(runtime)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("devices", [None, 1, "1", "auto", [3]])
def test_check_runtime_accepts_cpu_and_one_device(no_cuda: None, devices: object) -> None:
    check_runtime(RuntimeSettings("cpu", devices=devices))
    check_runtime(RuntimeSettings("auto", devices=devices))


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        (
            {"max_epoch": 3},
            "TrainModels.trainer.max_epoch: not a Lightning Trainer argument (did you mean 'max_epochs'?)",
        ),
        ({"accelerator": "cpu"}, "TrainModels.trainer.accelerator: set it at the top level of the config"),
        ({"default_root_dir": "x"}, "TrainModels.trainer.default_root_dir: set it at the top level"),
        ({"devices": 2}, "TrainModels.trainer.devices: 2 is not supported"),
    ],
)
def test_check_trainer_names_the_key(trainer: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_trainer(trainer)
    assert str(error.value).startswith(message)
    check_trainer({"max_epochs": 3, "devices": [0], "enable_checkpointing": False})


def test_check_writable_names_the_blocking_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirectoryError, match=f"^default_root_dir: cannot write to {blocker};"):
        check_writable(blocker / "results" / "deeper")
    check_writable(tmp_path / "not" / "yet" / "there")


def test_split_checks_follow_what_post_processing_learns() -> None:
    learned = PostProcessingSettings()
    manual = PostProcessingSettings(
        normalization_stage="none",
        thresholding=ThresholdingConfig({"class_path": "ManualThreshold", "init_args": {"default_value": 1.0}}),
    )
    without_val = {"train": object(), "test": object()}
    with pytest.raises(ConfigError, match=r"data\.init_args\.val_split_mode: the data has no validation split"):
        check_training_splits(learned, without_val, [], evaluate=True)
    check_training_splits(manual, without_val, [], evaluate=True)
    with pytest.raises(ConfigError, match=r"\['pixel_AUROC'\] are validation metrics"):
        check_training_splits(manual, without_val, ["pixel_AUROC"], evaluate=True)
    with pytest.raises(DataError, match="no test split to evaluate on"):
        check_training_splits(manual, {"train": object()}, [], evaluate=True)
    check_training_splits(manual, {"train": object()}, [], evaluate=False)
    with pytest.raises(ConfigError, match="the run has no validation split to learn them from"):
        check_statistics_source(learned, has_validation=False)
    check_statistics_source(manual, has_validation=False)


def test_image_metrics_need_an_anomalous_test_image() -> None:
    with pytest.raises(DataError, match="the test split has no anomalous images"):
        check_metric_inputs([0, 0, 0], MetricsConfig())
    check_metric_inputs([0, 0, 0], MetricsConfig(image=[], pixel=["AUROC"]))
    check_metric_inputs([0, 1], MetricsConfig())


# -- a run's config and its frozen keys ------------------------------------------------------------


@pytest.fixture
def trained() -> RunConfig:
    return RunConfig(_settings(), MODEL, None)


@pytest.mark.parametrize(
    ("settings", "model", "message"),
    [
        (_settings(seed=7), None, "seed: the run was trained with 42, not 7"),
        (_settings(grid=TileGrid.create(128, 64, 32)), None, "tiling: the run was trained with"),
        (_settings(trainer={"max_epochs": 5}), None, "TrainModels.trainer: the run was trained with {'max_epochs': 1}"),
        (_settings(merge=MergeConfig(blending="hann")), None, "merge.blending: the run was trained with 'mean'"),
        (
            _settings(),
            {"class_path": "Padim", "init_args": {"backbone": "resnet18", "n_features": 10}},
            "TrainModels.model: the run was trained with",
        ),
        (_settings(), {"class_path": "Patchcore"}, "TrainModels.model: the run was trained with"),
    ],
    ids=["seed", "tiling", "trainer", "blending", "model-args", "model-class"],
)
def test_check_frozen_names_the_changed_key(
    trained: RunConfig, settings: EnsembleSettings, model: dict | None, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        check_frozen(trained, settings, model)
    assert str(error.value).startswith(message)
    assert str(error.value).endswith("keep the run's value or train a new run")


@pytest.mark.parametrize(
    "settings",
    [
        _settings(normalization_stage="none"),
        _settings(thresholding=ThresholdingConfig("ManualThreshold", stage="tile")),
        _settings(seam_smoothing=SeamSmoothingConfig(apply=True, sigma=3.0)),
        _settings(merge=MergeConfig(blending="mean", image_score="max_tiles")),
        _settings(metrics=MetricsConfig(image=["AUPR"], pixel=[])),
        _settings(visualization=VisualizationConfig(save=False)),
        _settings(accelerator="cpu", devices=[0], default_root_dir="elsewhere"),
    ],
    ids=["normalization", "thresholding", "smoothing", "image-score", "metrics", "visualization", "runtime"],
)
def test_check_frozen_accepts_post_processing_and_runtime_changes(
    trained: RunConfig, settings: EnsembleSettings
) -> None:
    check_frozen(trained, settings, None)
    check_frozen(trained, settings, {"class_path": "anomalib.models.Padim", "init_args": MODEL["init_args"]})


def test_run_config_round_trips_and_stays_unfrozen(tmp_path: Path) -> None:
    settings = _settings(normalization_stage="tile", merge=MergeConfig(blending="gaussian"), accelerator="gpu")
    run = RunDirectory(tmp_path)
    write_run_config(run, RunConfig(settings, MODEL, {"class_path": "anomalib.data.MVTecAD", "init_args": {}}))
    read = read_run_config(run)  # on this CPU machine too: a GPU-trained run is readable anywhere
    assert read.settings == settings
    assert read.model_spec["init_args"]["n_features"] == 20
    assert read.data_spec["class_path"] == "anomalib.data.MVTecAD"
    check_frozen(read, settings, None)


def test_the_same_model_spelled_without_defaults_is_not_a_change(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    settings = _settings()
    spec = ModelFactory.from_spec("Padim").spec  # what TiledEnsembleEngine.fit("Padim", ...) records and resumes with
    write_run_config(run, RunConfig(settings, spec, None))
    check_frozen(read_run_config(run), settings, spec)
