"""Config format: the keys of a tiled-ensemble config, and conversion to and from settings.

A config (YAML file and command-line overrides, or a run's ``config.yaml``) is read by jsonargparse
into a typed namespace — types, class paths and init args of the data module, model and callbacks —
then :func:`settings_from_namespace` resolves it into :class:`~anomalib_tiled.settings.EnsembleSettings`
and checks what types cannot (geometry). :func:`settings_to_config` writes the canonical format
back, which is what a run's ``config.yaml`` holds.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from anomalib_tiled.config.legacy import PARSER_MODE, register_loader
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.settings import (
    EnsembleSettings,
    ExecutionSettings,
    MergeConfig,
    MetricsConfig,
    NormalizationStageName,
    PostProcessingSettings,
    RuntimeSettings,
    SeamSmoothingConfig,
    ThresholdingConfig,
    ThresholdStageName,
    TilingConfig,
    TrainingSettings,
    VisualizationConfig,
)
from anomalib_tiled.tiling import TileGrid, to_pair


def add_settings_arguments(parser: ArgumentParser, *, require_data: bool) -> None:
    """Add every config key of the tiled ensemble to ``parser``.

    Args:
        parser: Parser of a ``tiled`` subcommand or of a run's config.
        require_data: Whether ``data`` and ``TrainModels.model`` are required (``train``).
    """
    from anomalib.data import AnomalibDataModule  # noqa: PLC0415 - anomalib loads torch; help stays fast

    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (YAML).")
    parser.add_argument("--seed", type=int, default=42, help="Seed for data splits, sampling and model init.")
    _add_runtime_arguments(parser)
    parser.add_dataclass_arguments(TilingConfig, "tiling")
    parser.add_argument(
        "--normalization_stage",
        type=NormalizationStageName,
        default="image",
        help="Min-max normalisation per tile model (tile), on merged images (image) or none.",
    )
    parser.add_dataclass_arguments(ThresholdingConfig, "thresholding")
    parser.add_argument(
        "--thresholding_stage",
        type=ThresholdStageName | None,
        default=None,
        help="Upstream-format alias of thresholding.stage.",
    )
    parser.add_subclass_arguments(
        AnomalibDataModule,
        "data",
        instantiate=False,
        required=require_data,
        help="anomalib data module: class_path (MVTecAD, Folder, Visa...) and init_args.",
    )
    parser.add_dataclass_arguments(SeamSmoothingConfig, "SeamSmoothing")
    _add_train_models_arguments(parser, require_model=require_data)
    parser.add_dataclass_arguments(MergeConfig, "merge")
    parser.add_dataclass_arguments(VisualizationConfig, "visualization")


def _add_train_models_arguments(parser: ArgumentParser, *, require_model: bool) -> None:
    from anomalib.models import AnomalibModule  # noqa: PLC0415 - anomalib loads torch; help stays fast

    parser.add_subclass_arguments(
        AnomalibModule,
        "TrainModels.model",
        instantiate=False,
        required=require_model,
        fail_untyped=False,
        help="anomalib model trained on every tile: class_path (Padim, Patchcore, Fastflow...) and init_args.",
    )
    parser.add_dataclass_arguments(MetricsConfig, "TrainModels.metrics")
    parser.add_argument(
        "--TrainModels.trainer",
        type=dict[str, Any],
        default={},
        help="Lightning Trainer arguments for every tile model (max_epochs, callbacks, logger...).",
    )
    parser.add_argument(
        "--TrainModels.calibration_share",
        type=float,
        default=TrainingSettings.calibration_share,
        help="Fraction of training images held out of fitting to learn the tile scaling from (merge.tile_scaling).",
    )


def _add_runtime_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--accelerator",
        type=str,
        default="auto",
        help="Device for the tile models: auto, cpu, gpu (= cuda) or mps.",
    )
    parser.add_argument(
        "--devices",
        type=int | str | list[int] | None,
        default=None,
        help="Device of the tile models: 1/auto or [index] (default: TrainModels.trainer.devices).",
    )
    parser.add_argument(
        "--default_root_dir",
        type=Path,
        default=Path("results"),
        help="Results root; a run goes to <root>/<Model>/<Dataset>/<category>/vN.",
    )
    add_execution_arguments(parser)


def add_execution_arguments(parser: ArgumentParser) -> None:
    """Add the ``execution`` keys: which runner spreads tile jobs over which workers and devices."""
    parser.add_class_arguments(ExecutionSettings, "execution", help="Where tile jobs run (serial, processes, ray).")


def settings_parser() -> ArgumentParser:
    """Parser of a run's ``config.yaml`` (canonical format), raising instead of exiting."""
    register_loader()  # runs written before a key was renamed are read with the new name
    parser = ArgumentParser(exit_on_error=False, default_config_files=[], parser_mode=PARSER_MODE)
    add_settings_arguments(parser, require_data=False)
    return parser


def settings_from_namespace(cfg: Namespace) -> EnsembleSettings:
    """Resolve a parsed namespace into :class:`EnsembleSettings`.

    Raises:
        ConfigError: On the first invalid value.
    """
    thresholding = plain(cfg.thresholding)
    if cfg.get("thresholding_stage") is not None:
        thresholding["stage"] = cfg.thresholding_stage
    return EnsembleSettings(
        training=TrainingSettings(
            grid=_grid(cfg.tiling),
            seed=cfg.seed,
            trainer=plain(cfg.TrainModels.trainer) or {},
            calibration_share=cfg.TrainModels.calibration_share,
        ),
        postprocessing=PostProcessingSettings(
            normalization_stage=cfg.normalization_stage,
            thresholding=ThresholdingConfig(**thresholding),
            seam_smoothing=SeamSmoothingConfig(**plain(cfg.SeamSmoothing)),
            merge=MergeConfig(**plain(cfg.merge)),
            metrics=MetricsConfig(**plain(cfg.TrainModels.metrics)),
            visualization=VisualizationConfig(**plain(cfg.visualization)),
        ),
        runtime=RuntimeSettings(
            accelerator=cfg.accelerator,
            devices=plain(cfg.get("devices")),
            default_root_dir=cfg.default_root_dir,
            execution=plain(cfg.execution),
        ),
    )


def _grid(tiling: Namespace) -> TileGrid:
    if tiling.image_size is None:
        msg = "tiling.image_size: missing; set tiling.image_size (or data.init_args.image_size), e.g. [512, 512]"
        raise ConfigError(msg)
    sizes = {key: getattr(tiling, key) for key in ("image_size", "tile_size", "stride")}
    try:
        pairs = {
            key: None if value is None else to_pair(_sequence(value), f"tiling.{key}") for key, value in sizes.items()
        }
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return tile_grid(pairs["image_size"], pairs["tile_size"], pairs["stride"])


def _sequence(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def plain(value: Any) -> Any:
    """``value`` with jsonargparse namespaces turned into dicts, recursively."""
    if isinstance(value, Namespace):
        return {key: plain(item) for key, item in vars(value).items()}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def spec_from_namespace(value: Namespace | dict | None) -> dict[str, Any] | None:
    """Plain ``{class_path, init_args}`` dict of a parsed subclass argument."""
    if value is None:
        return None
    spec = plain(value)
    return {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}


def as_yaml_value(value: Any) -> Any:
    """Copy of ``value`` with enums, paths and tuples turned into YAML scalars and lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: as_yaml_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_yaml_value(item) for item in value]
    return value


def settings_to_config(settings: EnsembleSettings, model_spec: dict | None, data_spec: dict | None) -> dict[str, Any]:
    """Canonical config dict of a run (what ``config.yaml`` holds)."""
    grid = settings.grid
    post = settings.postprocessing
    runtime = settings.runtime
    config: dict[str, Any] = {
        "seed": settings.training.seed,
        "accelerator": runtime.accelerator,
        **({"devices": as_yaml_value(runtime.devices)} if runtime.devices is not None else {}),
        "default_root_dir": str(runtime.default_root_dir),
        "execution": as_yaml_value(asdict(runtime.execution)),
        "tiling": {"tile_size": list(grid.tile_size), "stride": list(grid.stride), "image_size": list(grid.image_size)},
        "normalization_stage": as_yaml_value(post.normalization_stage),
        "thresholding": as_yaml_value(asdict(post.thresholding)),
        "SeamSmoothing": asdict(post.seam_smoothing),
        "TrainModels": {
            "model": model_spec,
            "metrics": as_yaml_value(asdict(post.metrics)),
            "trainer": _trainer_spec(settings.training.trainer),
            "calibration_share": settings.training.calibration_share,
        },
        "merge": as_yaml_value(asdict(post.merge)),
        "visualization": asdict(post.visualization),
    }
    if data_spec is not None:
        config["data"] = as_yaml_value(data_spec)
    return config


def _trainer_spec(trainer: dict[str, Any]) -> dict[str, Any]:
    spec = {key: as_yaml_value(value) for key, value in trainer.items() if key != "callbacks"}
    if "callbacks" in trainer:
        callbacks = trainer["callbacks"]
        spec["callbacks"] = [object_spec(c) for c in (callbacks if isinstance(callbacks, list) else [callbacks])]
    return spec


def object_spec(value: Any) -> Any:
    """``{class_path, init_args}`` of an object, as far as its attributes tell (specs are kept as they are)."""
    if isinstance(value, dict | str):
        return value
    cls = type(value)
    init_args = {}
    for name in inspect.signature(cls.__init__).parameters:
        for attribute in (name, f"_{name}"):
            item = getattr(value, attribute, None)
            if isinstance(item, str | int | float | bool | Path | list | tuple | Enum):
                init_args[name] = as_yaml_value(item)
                break
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def dump_config(config: dict[str, Any]) -> str:
    """YAML text of a config dict."""
    return yaml.safe_dump(config, sort_keys=False)


def tile_grid(image_size: Any, tile_size: Any, stride: Any) -> TileGrid:
    """The tile grid of these sizes (``n`` or ``(h, w)`` each; ``stride`` None: no overlap).

    Raises:
        ConfigError: Naming the size that does not fit.
    """
    try:
        return TileGrid.create(image_size, tile_size, stride)
    except ValueError as error:
        raise ConfigError(str(error)) from None
