"""Checks that need the environment or the data, run just before work starts.

Settings are plain values (:mod:`anomalib_tiled.settings`); whether this machine has the asked-for
accelerator, whether the metrics and thresholds can be built, whether the output can be written and
whether the data has the splits the settings need is decided here, by the stage about to run, so a
run trained on a GPU server can still be read, evaluated and applied on a CPU box.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_tiled.config.components import threshold_class
from anomalib_tiled.errors import ConfigError, DataError, RunDirectoryError, did_you_mean
from anomalib_tiled.settings import (
    EnsembleSettings,
    MetricsConfig,
    PostProcessingSettings,
    RuntimeSettings,
    TileScaling,
    check_choice,
)
from anomalib_tiled.sinks.metrics import build_metric

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_settings(settings: EnsembleSettings) -> None:
    """Checks of the settings against this machine and the installed libraries, before any work."""
    check_runtime(settings.runtime)
    check_trainer(settings.training.trainer)
    check_postprocessing(settings.postprocessing)
    check_tile_scaling(settings.postprocessing, has_calibration=settings.training.calibration_share > 0)


def check_runtime(runtime: RuntimeSettings) -> None:
    """Fail before any work if the accelerator is unknown or not on this machine, or devices are not one device.

    Raises:
        ConfigError: Naming the key and the fix.
    """
    import torch  # noqa: PLC0415 - torch loads only when work is about to start

    accelerator = runtime.accelerator
    check_choice(accelerator, ACCELERATORS, "accelerator")
    if accelerator in {"gpu", "cuda"} and not torch.cuda.is_available() and not _on_cluster(runtime):
        msg = (
            f"accelerator: '{accelerator}' requested but no CUDA GPU is available on this machine "
            "(torch.cuda.is_available() is False); use accelerator: cpu or auto"
        )
        raise ConfigError(msg)
    if accelerator == "mps" and not torch.backends.mps.is_available():
        msg = (
            "accelerator: 'mps' requested but Apple MPS is not available on this machine; use accelerator: cpu or auto"
        )
        raise ConfigError(msg)
    if runtime.devices is not None:
        check_one_device(runtime.devices, "devices")


def _on_cluster(runtime: RuntimeSettings) -> bool:
    """Whether tiles run on the nodes of a Ray cluster, whose GPUs this machine need not have."""
    return runtime.execution.runner == "ray" and runtime.execution.ray.address is not None


def check_one_device(devices: Any, key: str) -> None:
    """Fail unless ``devices`` names one device (``1``, ``auto`` or ``[index]``)."""
    if devices in (1, "1", "auto") or (isinstance(devices, list) and len(devices) == 1):
        return
    msg = (
        f"{key}: {devices!r} is not supported; each tile model runs on one device: use 1, auto or [index], "
        "and spread tiles over devices with execution.runner: processes and execution.devices"
    )
    raise ConfigError(msg)


def check_trainer(trainer: dict[str, Any]) -> None:
    """Fail on trainer keys Lightning's Trainer does not accept and on multi-device requests."""
    from lightning.pytorch import Trainer  # noqa: PLC0415

    accepted = [n for n in inspect.signature(Trainer.__init__).parameters if n != "self"]
    for name in trainer:
        if name not in accepted:
            msg = f"TrainModels.trainer.{name}: not a Lightning Trainer argument{did_you_mean(name, accepted)}"
            raise ConfigError(msg)
    for name in ("accelerator", "default_root_dir"):
        if name in trainer:
            msg = f"TrainModels.trainer.{name}: set it at the top level of the config ('{name}:'), not in the trainer"
            raise ConfigError(msg)
    check_one_device(trainer.get("devices", 1), "TrainModels.trainer.devices")


def check_postprocessing(post: PostProcessingSettings) -> None:
    """Fail if the threshold method or a metric cannot be built with its arguments."""
    threshold_class(post.thresholding.method)
    for level in ("image", "pixel"):
        for index, spec in enumerate(getattr(post.metrics, level)):
            build_metric(spec, level, f"TrainModels.metrics.{level}[{index}]")


def check_writable(directory: Path) -> None:
    """Fail fast if results cannot be written below ``directory``.

    Raises:
        RunDirectoryError: Naming the first existing parent that is not writable.
    """
    existing = Path(directory)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        msg = f"default_root_dir: cannot write to {existing}; choose a writable default_root_dir"
        raise RunDirectoryError(msg)


def check_training_splits(
    post: PostProcessingSettings, splits: dict[str, Any], monitored: list[str], *, evaluate: bool
) -> None:
    """Fail if the data lacks a split that the settings need.

    Raises:
        ConfigError: Normalisation, learned thresholds or monitored metrics without a validation split.
        DataError: Evaluation asked for without a test split.
    """
    if post.needs_validation_split and "val" not in splits:
        msg = (
            "data.init_args.val_split_mode: the data has no validation split, but "
            f"normalization_stage '{post.normalization_stage.value}' and thresholding.method "
            f"{post.thresholding.method!r} learn from validation predictions; set val_split_mode to "
            "same_as_test, from_test or from_train, or use normalization_stage: none with ManualThreshold"
        )
        raise ConfigError(msg)
    if monitored and "val" not in splits:
        msg = (
            f"TrainModels.trainer.callbacks: {monitored} are validation metrics but the data has no "
            "validation split; set data.init_args.val_split_mode"
        )
        raise ConfigError(msg)
    if evaluate and "test" not in splits:
        msg = (
            "data: the data module has no test split to evaluate on; "
            "check test_split_mode or train with --evaluate false"
        )
        raise DataError(msg)


def check_tile_scaling(post: PostProcessingSettings, *, has_calibration: bool) -> None:
    """Fail if tiles must be scaled from normal calibration images that the run does not hold out."""
    if post.merge.tile_scaling != TileScaling.NONE and not has_calibration:
        msg = (
            f"merge.tile_scaling: {post.merge.tile_scaling.value} learns each tile's scale from normal training "
            "images held out of fitting, but the run holds none out; train with TrainModels.calibration_share "
            "(e.g. 0.2) or use merge.tile_scaling: none"
        )
        raise ConfigError(msg)


def check_metric_inputs(labels: Sequence[int], metrics: MetricsConfig) -> None:
    """Refuse image metrics on a test split without anomalous images, where AUROC & co. are undefined."""
    if metrics.image and set(labels) <= {0}:
        msg = (
            "data: the test split has no anomalous images, so image metrics such as AUROC are undefined; "
            "add anomalous test images or set TrainModels.metrics.image to []"
        )
        raise DataError(msg)


def check_statistics_source(post: PostProcessingSettings, *, has_validation: bool) -> None:
    """Fail if post-processing must learn from validation predictions that the run does not have."""
    if not has_validation and post.needs_validation_split:
        msg = (
            "normalization_stage/thresholding: the run has no validation split to learn them from; "
            "use normalization_stage: none with a ManualThreshold"
        )
        raise ConfigError(msg)
