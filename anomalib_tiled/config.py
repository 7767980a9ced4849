"""Configuration: schema, the tiled-ensemble guide's formats, and validation.

Two config formats are accepted and turned into one representation:

* the **guide format** (anomalib's tiled-ensemble guide): ``tiling: {tile_size, stride}`` with the
  image size in ``data.init_args.image_size``, ``thresholding: {method, stage}``,
  ``TrainModels: {model, metrics, trainer}``, anomalib 1.x data class names and keys;
* the **current upstream format**: ``tiling.image_size`` and ``thresholding_stage``.

Precedence when both appear: ``tiling.image_size`` wins over ``data.init_args.image_size`` and
``thresholding.stage`` wins over ``thresholding_stage`` (a warning names the dropped value).

Parsing is two-phase. jsonargparse reads files and command-line overrides into a typed namespace
(types, class paths and init args of the data module, model and callbacks); :func:`resolve` then
checks what types cannot (geometry, stages, metric and threshold names, data root, accelerator)
and raises :class:`~anomalib_tiled.errors.ConfigError` with one line naming key, value and fix.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_loader

from anomalib_tiled.errors import ConfigError, did_you_mean
from anomalib_tiled.tiling import Blending, TileGrid, to_pair

logger = logging.getLogger(__name__)

PARSER_MODE = "anomalib_tiled"


class NormalizationStage(str, Enum):
    """Where min-max normalisation happens: per tile model, on merged images, or not at all."""

    TILE = "tile"
    IMAGE = "image"
    NONE = "none"


class ThresholdStage(str, Enum):
    """Where anomaly thresholds are computed and applied: per tile model or on merged images."""

    TILE = "tile"
    IMAGE = "image"


class ImageScore(str, Enum):
    """How the image anomaly score is pooled from tile predictions."""

    MAX_MAP = "max_map"
    MEAN_TILES = "mean_tiles"
    MAX_TILES = "max_tiles"


# Config-file spellings of the enums above (jsonargparse parses enums by member name, the guide uses values).
NormalizationStageName = Literal["tile", "image", "none"]
ThresholdStageName = Literal["tile", "image"]
BlendingName = Literal["mean", "hann", "gaussian"]
ImageScoreName = Literal["max_map", "mean_tiles", "max_tiles"]


@dataclass
class TilingConfig:
    """Tile geometry.

    Args:
        tile_size: Tile size seen by each model, ``n`` or ``[height, width]``.
        stride: Step between tiles, ``n`` or ``[height, width]``; defaults to the tile size
            (no overlap). A stride smaller than the tile gives overlapping tiles.
        image_size: Size the images are resized to before tiling, ``n`` or ``[height, width]``.
            The guide format gives it as ``data.init_args.image_size``.
    """

    tile_size: int | tuple[int, int] = 256
    stride: int | tuple[int, int] | None = None
    image_size: int | tuple[int, int] | None = None


@dataclass
class ThresholdingConfig:
    """Anomaly thresholds.

    Args:
        method: ``F1AdaptiveThreshold``, ``ManualThreshold``, a class path, or
            ``{class_path, init_args}`` (e.g. ``ManualThreshold`` with ``default_value``).
        stage: ``image`` computes thresholds on merged validation predictions; ``tile`` uses one
            threshold per tile model.
    """

    method: str | dict = "F1AdaptiveThreshold"
    stage: ThresholdStageName | ThresholdStage = "image"


@dataclass
class SeamSmoothingConfig:
    """Gaussian smoothing of the bands around tile borders.

    Args:
        apply: Smooth the seams.
        sigma: Standard deviation of the Gaussian, in pixels.
        width: Band width around every tile border, as a fraction of the tile size.
    """

    apply: bool = False
    sigma: float = 2.0
    width: float = 0.1


@dataclass
class MergeConfig:
    """How tile predictions become full-image predictions.

    Args:
        blending: Weighting of overlapping tiles: ``mean`` (uniform), ``hann`` or ``gaussian``
            (smooth windows that favour tile centres).
        image_score: ``max_map`` (max of the merged map, like anomalib models), ``mean_tiles``
            or ``max_tiles`` (mean or max of the tile scores).
    """

    blending: BlendingName | Blending = "mean"
    image_score: ImageScoreName | ImageScore = "max_map"


@dataclass
class VisualizationConfig:
    """Result images.

    Args:
        save: Write one PNG per test/predict image.
        max_side: Longest side of the written images in pixels (native resolution up to this).
        grid: Draw faint tile-grid lines.
    """

    save: bool = True
    max_side: int = 1024
    grid: bool = True


@dataclass
class MetricsConfig:
    """Metrics computed on merged test predictions.

    Args:
        image: Image-level metrics: names of anomalib metrics (``AUROC``, ``F1Score``, ``AUPR``...),
            class paths, or ``{class_path, init_args}``.
        pixel: Pixel-level metrics, same forms (``AUROC``, ``F1Score``, ``AUPRO``, ``AUPR``...).
    """

    image: list[str | dict] | str = field(default_factory=lambda: ["AUROC", "F1Score"])
    pixel: list[str | dict] | str = field(default_factory=lambda: ["AUROC", "F1Score"])


@dataclass
class EnsembleSettings:
    """Everything the tiled ensemble needs besides the model and the data.

    This is the single internal representation both config formats and the Python API resolve to.
    """

    grid: TileGrid
    seed: int = 42
    accelerator: str = "auto"
    default_root_dir: Path = Path("results")
    normalization_stage: NormalizationStage = NormalizationStage.IMAGE
    thresholding: ThresholdingConfig = field(default_factory=ThresholdingConfig)
    seam_smoothing: SeamSmoothingConfig = field(default_factory=SeamSmoothingConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    visualization: VisualizationConfig = field(default_factory=VisualizationConfig)

    def __post_init__(self) -> None:
        self.normalization_stage = _enum(NormalizationStage, self.normalization_stage, "normalization_stage")
        self.thresholding.stage = _enum(ThresholdStage, self.thresholding.stage, "thresholding.stage")
        self.merge.blending = _enum(Blending, self.merge.blending, "merge.blending")
        self.merge.image_score = _enum(ImageScore, self.merge.image_score, "merge.image_score")
        self.default_root_dir = Path(self.default_root_dir)
        self.metrics = MetricsConfig(image=_as_list(self.metrics.image), pixel=_as_list(self.metrics.pixel))
        validate_settings(self)

    @property
    def needs_validation_split(self) -> bool:
        """Whether normalisation or thresholding learn statistics from validation predictions."""
        return self.normalization_stage != NormalizationStage.NONE or not is_manual_threshold(
            self.thresholding.method,
        )


# --------------------------------------------------------------------------------------------------
# Class resolution


MODEL_MODULE = "anomalib.models"
DATA_MODULE = "anomalib.data"
METRIC_MODULE = "anomalib.metrics"

# anomalib 1.x names of data modules that were renamed in 2.x.
LEGACY_DATA_CLASSES = {"MVTec": "MVTecAD"}
# anomalib 1.x data-module keys with no 2.x counterpart of the same name.
LEGACY_DATA_KEYS_DROPPED = ("task",)
LEGACY_DATA_TRANSFORMS = {
    "transform": ("augmentations",),
    "train_transform": ("train_augmentations",),
    "eval_transform": ("val_augmentations", "test_augmentations"),
}


def import_class(class_path: str, default_module: str, key: str) -> type:
    """Import a class from a dotted path or a short name in ``default_module``.

    Args:
        class_path: ``package.module.Class`` or ``Class``.
        default_module: Module searched for short names (``anomalib.models``...).
        key: Config key, for the error message.

    Returns:
        The class.

    Raises:
        ConfigError: If no such class exists.
    """
    module_name, _, name = class_path.rpartition(".")
    module_name = module_name or default_module
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = f"{key}: cannot import '{module_name}' for class '{class_path}' ({error}); check the class path"
        raise ConfigError(msg) from None
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        public = [n for n in dir(module) if not n.startswith("_") and inspect.isclass(getattr(module, n))]
        msg = f"{key}: unknown class '{class_path}'{did_you_mean(name, public)}; use a class of {module_name}"
        raise ConfigError(msg)
    return cls


def class_spec(spec: str | dict | Namespace, key: str) -> tuple[str, dict[str, Any]]:
    """Split ``name`` / ``{class_path, init_args}`` into the class path and its init args."""
    if isinstance(spec, Namespace):
        spec = spec.as_dict()
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        unknown = set(spec) - {"class_path", "init_args"}
        if unknown:
            msg = f"{key}: unexpected keys {sorted(unknown)}; give only class_path and init_args"
            raise ConfigError(msg)
        return spec["class_path"], dict(spec.get("init_args") or {})
    msg = f"{key}: expected a class name or {{class_path, init_args}}, got {spec!r}"
    raise ConfigError(msg)


def check_init_args(cls: type, init_args: dict[str, Any], key: str) -> None:
    """Fail if ``init_args`` names a parameter ``cls`` does not accept."""
    parameters = inspect.signature(cls.__init__).parameters
    if (
        any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        and cls.__init__ is not object.__init__
    ):
        accepted = [n for n in parameters if n != "self"]
        strict = False
    else:
        accepted = [n for n in parameters if n != "self"]
        strict = True
    for name in init_args:
        if strict and name not in accepted:
            msg = f"{key}.init_args.{name}: {cls.__name__} has no argument '{name}'{did_you_mean(name, accepted)}"
            raise ConfigError(msg)


def is_manual_threshold(method: str | dict) -> bool:
    """Whether the threshold is fixed by the user rather than learned from validation data."""
    class_path, _ = class_spec(method, "thresholding.method")
    return class_path.rpartition(".")[2] == "ManualThreshold"


# --------------------------------------------------------------------------------------------------
# Validation


def _enum(enum_cls: type[Enum], value: Any, key: str) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = [member.value for member in enum_cls]
        msg = f"{key}: unknown value {value!r}{did_you_mean(str(value), choices)}; use one of {choices}"
        raise ConfigError(msg) from None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str | dict):
        return [value]
    return list(value)


def validate_settings(settings: EnsembleSettings) -> None:
    """Cross-field checks that need no data: smoothing, thresholds, metrics, visualisation.

    Raises:
        ConfigError: On the first invalid value.
    """
    smoothing = settings.seam_smoothing
    if smoothing.sigma <= 0:
        msg = f"SeamSmoothing.sigma: must be > 0, got {smoothing.sigma}"
        raise ConfigError(msg)
    if not 0 < smoothing.width <= 1:
        msg = f"SeamSmoothing.width: must be in (0, 1] (a fraction of the tile size), got {smoothing.width}"
        raise ConfigError(msg)
    if settings.visualization.max_side < 16:
        msg = f"visualization.max_side: must be >= 16 pixels, got {settings.visualization.max_side}"
        raise ConfigError(msg)
    threshold_class(settings.thresholding.method)
    from anomalib_tiled.metrics import build_metric  # noqa: PLC0415 - metrics import torchmetrics lazily

    for level in ("image", "pixel"):
        for index, spec in enumerate(getattr(settings.metrics, level)):
            build_metric(spec, level, f"TrainModels.metrics.{level}[{index}]")
    check_accelerator(settings.accelerator)


def threshold_class(method: str | dict) -> type:
    """Resolve and check the threshold method."""
    from anomalib.metrics.threshold import Threshold  # noqa: PLC0415

    class_path, init_args = class_spec(method, "thresholding.method")
    cls = import_class(class_path, METRIC_MODULE, "thresholding.method")
    if not issubclass(cls, Threshold):
        msg = (
            f"thresholding.method: {class_path} is not an anomalib threshold; "
            "use F1AdaptiveThreshold or ManualThreshold"
        )
        raise ConfigError(msg)
    check_init_args(cls, init_args, "thresholding.method")
    # Threshold classes take **kwargs: build one now so a misspelled argument fails before training.
    from anomalib.metrics import AnomalibMetric  # noqa: PLC0415

    fields = {"fields": ["pred_score", "gt_label"]} if issubclass(cls, AnomalibMetric) else {}
    try:
        cls(**fields, **init_args)
    except Exception as error:  # noqa: BLE001 - whatever the class raises, the cause is its init args
        detail = " ".join(str(error).split())
        msg = f"thresholding.method: {cls.__name__} cannot be built with {init_args}: {detail}"
        raise ConfigError(msg) from None
    return cls


def check_accelerator(accelerator: str) -> None:
    """Fail before any work if the requested accelerator is not on this machine."""
    import torch  # noqa: PLC0415

    choices = ("auto", "cpu", "gpu", "cuda", "mps")
    if accelerator not in choices:
        suggestion = did_you_mean(accelerator, choices)
        msg = f"accelerator: unknown value {accelerator!r}{suggestion}; use one of {list(choices)}"
        raise ConfigError(msg)
    if accelerator in {"gpu", "cuda"} and not torch.cuda.is_available():
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
    devices = trainer.get("devices", 1)
    if devices not in (1, "1", "auto", [0]) and not (isinstance(devices, list) and len(devices) == 1):
        msg = (
            f"TrainModels.trainer.devices: {devices!r} is not supported; tile models are trained one at a time on "
            "one device: use devices: 1 (choose the GPU with CUDA_VISIBLE_DEVICES)"
        )
        raise ConfigError(msg)


# --------------------------------------------------------------------------------------------------
# Format translation


def translate_legacy(config: dict[str, Any]) -> dict[str, Any]:
    """Turn a guide-format (anomalib 1.x) or upstream-format config into the canonical format.

    The canonical format is the guide's, with ``tiling.image_size`` holding the image size and
    data-module arguments valid for anomalib 2.x.

    Args:
        config: Config as loaded from YAML; it is not modified.

    Returns:
        The translated config.
    """
    config = copy.deepcopy(config)
    data = config.get("data")
    if isinstance(data, dict):
        init_args = data.get("init_args")
        class_path = data.get("class_path")
        if isinstance(class_path, str):
            module, _, name = class_path.rpartition(".")
            if name in LEGACY_DATA_CLASSES and module in {"", DATA_MODULE}:
                data["class_path"] = f"{DATA_MODULE}.{LEGACY_DATA_CLASSES[name]}"
        if isinstance(init_args, dict):
            _translate_legacy_data_args(config, init_args)
    thresholding_stage = config.pop("thresholding_stage", None)
    if thresholding_stage is not None:
        thresholding = config.setdefault("thresholding", {})
        if not isinstance(thresholding, dict):
            return config
        if "stage" in thresholding and thresholding["stage"] != thresholding_stage:
            logger.warning(
                "Both thresholding.stage (%s) and thresholding_stage (%s) are set; using thresholding.stage.",
                thresholding["stage"],
                thresholding_stage,
            )
        thresholding.setdefault("stage", thresholding_stage)
    return config


def _translate_legacy_data_args(config: dict[str, Any], init_args: dict[str, Any]) -> None:
    image_size = init_args.pop("image_size", None)
    if image_size is not None:
        tiling = config.setdefault("tiling", {})
        if isinstance(tiling, dict):
            if tiling.get("image_size") is not None and _as_pair_list(tiling["image_size"]) != _as_pair_list(
                image_size
            ):
                logger.warning(
                    "Both tiling.image_size (%s) and data.init_args.image_size (%s) are set; using tiling.image_size.",
                    tiling["image_size"],
                    image_size,
                )
            tiling.setdefault("image_size", image_size)
    for key in LEGACY_DATA_KEYS_DROPPED:
        init_args.pop(key, None)
    for old, new_keys in LEGACY_DATA_TRANSFORMS.items():
        value = init_args.pop(old, None)
        if value is not None:
            for new in new_keys:
                init_args.setdefault(new, value)


def _as_pair_list(value: Any) -> Any:
    return [value, value] if isinstance(value, int) else list(value) if isinstance(value, list | tuple) else value


def _load_yaml(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, dict) and ({"TrainModels", "tiling", "data"} & set(value)):
        return translate_legacy(value)
    return value


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


# --------------------------------------------------------------------------------------------------
# Parser


def add_settings_arguments(parser: ArgumentParser, *, require_data: bool) -> None:
    """Add every config key of the tiled ensemble to ``parser``.

    Args:
        parser: Parser of a ``tiled`` subcommand.
        require_data: Whether ``data`` and ``TrainModels.model`` are required (``train``).
    """
    from anomalib.data import AnomalibDataModule  # noqa: PLC0415
    from anomalib.models import AnomalibModule  # noqa: PLC0415

    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (YAML).")
    parser.add_argument("--seed", type=int, default=42, help="Seed for data splits, sampling and model init.")
    parser.add_argument(
        "--accelerator",
        type=str,
        default="auto",
        help="Device for the tile models: auto, cpu, gpu (= cuda) or mps.",
    )
    parser.add_argument(
        "--default_root_dir",
        type=Path,
        default=Path("results"),
        help="Results root; a run goes to <root>/<Model>/<Dataset>/<category>/vN.",
    )
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
    parser.add_subclass_arguments(
        AnomalibModule,
        "TrainModels.model",
        instantiate=False,
        required=require_data,
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
    parser.add_dataclass_arguments(MergeConfig, "merge")
    parser.add_dataclass_arguments(VisualizationConfig, "visualization")


# Keys a trained run fixes: eval and predict may not change them.
FROZEN_KEYS = ("seed", "tiling", "TrainModels.model", "TrainModels.trainer", "merge.blending")


def settings_from_namespace(cfg: Namespace) -> EnsembleSettings:
    """Resolve a parsed namespace into :class:`EnsembleSettings`.

    Raises:
        ConfigError: On the first invalid value.
    """
    tiling = cfg.tiling
    if tiling.image_size is None:
        msg = "tiling.image_size: missing; set tiling.image_size (or data.init_args.image_size), e.g. [512, 512]"
        raise ConfigError(msg)
    try:
        grid = TileGrid.create(
            image_size=_pair(tiling.image_size, "tiling.image_size"),
            tile_size=_pair(tiling.tile_size, "tiling.tile_size"),
            stride=None if tiling.stride is None else _pair(tiling.stride, "tiling.stride"),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    thresholding = ThresholdingConfig(**_plain(cfg.thresholding))
    if cfg.get("thresholding_stage") is not None:
        thresholding.stage = cfg.thresholding_stage
    trainer = _plain(cfg.TrainModels.trainer) or {}
    check_trainer(trainer)
    return EnsembleSettings(
        grid=grid,
        seed=cfg.seed,
        accelerator=cfg.accelerator,
        default_root_dir=cfg.default_root_dir,
        normalization_stage=cfg.normalization_stage,
        thresholding=thresholding,
        seam_smoothing=SeamSmoothingConfig(**_plain(cfg.SeamSmoothing)),
        merge=MergeConfig(**_plain(cfg.merge)),
        metrics=MetricsConfig(**_plain(cfg.TrainModels.metrics)),
        trainer=trainer,
        visualization=VisualizationConfig(**_plain(cfg.visualization)),
    )


def _pair(value: Any, key: str) -> tuple[int, int]:
    try:
        return to_pair(list(value) if isinstance(value, tuple) else value, key)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {key: _plain(item) for key, item in vars(value).items()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def spec_from_namespace(value: Namespace | dict | None) -> dict[str, Any] | None:
    """Plain ``{class_path, init_args}`` dict of a parsed subclass argument."""
    if value is None:
        return None
    plain = _plain(value)
    return {"class_path": plain["class_path"], "init_args": dict(plain.get("init_args") or {})}


def condense_parser_error(message: str, parser: ArgumentParser | None = None) -> str:
    """Turn a (multi-line) jsonargparse error into one line, with a suggestion for unknown names.

    Args:
        message: The parser's error message.
        parser: The parser that failed, to suggest known keys.

    Returns:
        A single line.
    """
    key = _failing_key(message)
    owner = key or "config"
    positions = re.findall(r"line (\d+), column (\d+)", message)
    if "Problems parsing config" in message:
        # PyYAML: unindented lines are reasons; indented ones are positions and the offending text.
        reasons = [
            raw.removeprefix("Problems parsing config:").strip()
            for raw in message.splitlines()
            if raw.strip() and not raw[:1].isspace()
        ]
        reason = reasons[-1] if reasons else "invalid YAML"
        where = f" at line {positions[-1][0]}, column {positions[-1][1]}" if positions else ""
        return f"config file: YAML syntax error{where}: {reason}; fix the YAML"
    class_problem = re.search(r"Problem with given class_path '([^']+)':\s*(.*?)(?:\n\s*-|\Z)", message, re.DOTALL)
    if class_problem:
        class_path, detail = class_problem.group(1), re.sub(r"\s+", " ", class_problem.group(2)).strip()
        option = re.search(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)", detail)
        if option:
            name = option.group(1).removeprefix("init_args.")
            accepted = _init_parameters(class_path)
            return (
                f"{owner}.init_args.{name}: {class_path.rpartition('.')[2]} has no argument "
                f"'{name}'{did_you_mean(name, accepted)}"
            )
        return f"{owner}: {class_path}: {detail}"
    import_path = re.search(
        r"(?:Expected a dot import path string: |Import path )(\S+?)(?: does not correspond|\s*$)",
        message,
        re.MULTILINE,
    )
    if import_path:
        name = import_path.group(1).strip("'\"")
        subtypes = re.search(r"Subtypes: \[(.*)\]", message)
        bases = re.findall(r"<class '([^']+)'>", subtypes.group(1)) if subtypes else []
        candidates = [name for base in bases if base != "NoneType" for name in _subclass_names(base)]
        return f"{owner}: unknown class '{name}'{did_you_mean(name.rpartition('.')[2], candidates)}"
    for pattern in (
        r"Unrecognized arguments: --?(\S+)",
        r"does not accept (?:nested key|option) '([^']+)'",
        r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)",
        r"No action for key \"?'?([^\"'\s]+)",
    ):
        match = re.search(pattern, message)
        if match:
            unknown = match.group(1).lstrip("-").split("=")[0]
            known = _known_keys(parser) if parser is not None else []
            return f"{unknown}: unknown config key{did_you_mean(unknown, known)}"
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("Expected") and "NoneType" not in line]
    detail = specific[0] if specific else lines[-1] if lines else message
    return f"{key}: {detail}" if key else detail


def _failing_key(message: str) -> str | None:
    match = re.search(r'Parser key "([^"]+)"', message) or re.search(r"key '([^']+)'", message)
    return match.group(1) if match else None


def _known_keys(parser: ArgumentParser) -> list[str]:
    keys = []
    for action in parser._actions:  # noqa: SLF001 - jsonargparse exposes no public listing
        keys.extend(option.lstrip("-") for option in action.option_strings if option.startswith("--"))
    return keys


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]


def _subclass_names(base_path: str) -> list[str]:
    module, _, name = base_path.rpartition(".")
    try:
        base = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: set[str] = set()
    stack = [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            names.add(sub.__name__)
            stack.append(sub)
    return sorted(names)


def as_yaml_value(value: Any) -> Any:
    """Copy of ``value`` with enums, paths and tuples turned into YAML scalars and lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: as_yaml_value(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [as_yaml_value(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------
# Parsers and run configs


def build_parser(command: str) -> ArgumentParser:
    """Parser of ``anomalib tiled <command>`` (``train``, ``eval`` or ``predict``).

    Errors raise instead of exiting, so the CLI can print them as one line.
    """
    descriptions = {
        "train": "Train one model per tile position, then evaluate on the test split.",
        "eval": "Evaluate a trained run on its test split (or on data given with --data).",
        "predict": "Predict unlabeled images with a trained run.",
    }
    parser = ArgumentParser(
        prog=f"anomalib tiled {command}",
        description=descriptions[command],
        parser_mode=PARSER_MODE,
        exit_on_error=False,
        default_config_files=[],
        allow_abbrev=False,
    )
    if command == "predict":
        parser.add_argument("--root", type=Path, required=True, help="Run directory printed by 'anomalib tiled train'.")
        parser.add_argument("--data", type=str, required=True, help="Folder, image file or glob of images to predict.")
        parser.add_argument(
            "--output", type=Path | None, default=None, help="Output folder (default: <root>/predict/vN)."
        )
        # Unset options keep the run's own visualization settings.
        parser.add_argument("--visualization.save", type=bool | None, default=None, help="Write result pictures.")
        parser.add_argument("--visualization.max_side", type=int | None, default=None, help="Longest picture side.")
        parser.add_argument("--visualization.grid", type=bool | None, default=None, help="Draw the tile grid.")
        parser.add_argument("--verbose", type=bool, default=False, help="Print full tracebacks.")
        return parser
    if command == "eval":
        parser.add_argument("--root", type=Path, required=True, help="Run directory printed by 'anomalib tiled train'.")
    else:
        parser.add_argument("--resume", type=Path | None, default=None, help="Resume an interrupted run directory.")
        parser.add_argument("--evaluate", type=bool, default=True, help="Evaluate on the test split after training.")
    parser.add_argument("--verbose", type=bool, default=False, help="Print full tracebacks.")
    add_settings_arguments(parser, require_data=False)
    return parser


def settings_to_config(settings: EnsembleSettings, model_spec: dict, data_spec: dict | None) -> dict[str, Any]:
    """Canonical config dict of a run (what ``config.yaml`` holds)."""
    from dataclasses import asdict  # noqa: PLC0415

    grid = settings.grid
    config: dict[str, Any] = {
        "seed": settings.seed,
        "accelerator": settings.accelerator,
        "default_root_dir": str(settings.default_root_dir),
        "tiling": {"tile_size": list(grid.tile_size), "stride": list(grid.stride), "image_size": list(grid.image_size)},
        "normalization_stage": settings.normalization_stage.value,
        "thresholding": as_yaml_value(asdict(settings.thresholding)),
        "SeamSmoothing": asdict(settings.seam_smoothing),
        "TrainModels": {
            "model": model_spec,
            "metrics": as_yaml_value(asdict(settings.metrics)),
            "trainer": _trainer_spec(settings.trainer),
        },
        "merge": as_yaml_value(asdict(settings.merge)),
        "visualization": asdict(settings.visualization),
    }
    if data_spec is not None:
        config["data"] = as_yaml_value(data_spec)
    return config


def _trainer_spec(trainer: dict[str, Any]) -> dict[str, Any]:
    spec = {key: as_yaml_value(value) for key, value in trainer.items() if key != "callbacks"}
    if "callbacks" in trainer:
        callbacks = trainer["callbacks"]
        spec["callbacks"] = [_object_spec(c) for c in (callbacks if isinstance(callbacks, list) else [callbacks])]
    return spec


def _object_spec(value: Any) -> Any:
    """Callback instances (Python API) become ``{class_path, init_args}`` by their init signature."""
    if isinstance(value, dict | str):
        return value
    cls = type(value)
    init_args = {}
    for name in inspect.signature(cls.__init__).parameters:
        for attribute in (name, f"_{name}"):
            item = getattr(value, attribute, None)
            if isinstance(item, str | int | float | bool):
                init_args[name] = item
                break
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def dump_config(config: dict[str, Any]) -> str:
    """YAML text of a config dict."""
    return yaml.safe_dump(config, sort_keys=False)


def parse_args(command: str, args: list[str]) -> tuple[ArgumentParser, Namespace]:
    """Parse command-line arguments of a ``tiled`` subcommand (``eval``/``predict`` start from the run's config).

    Raises:
        ConfigError: With a one-line message on any parsing error.
    """
    from jsonargparse import ArgumentError  # noqa: PLC0415

    from anomalib_tiled.run import RunDirectory  # noqa: PLC0415

    parser = build_parser(command)
    # eval and resume start from the run's own config; the command line may then override keys.
    if command == "eval" and (root := _argument(args, "--root")) is not None:
        args = ["--config", str(RunDirectory.open(root).config_path), *args]
    if command == "train" and (root := _argument(args, "--resume")) is not None:
        args = ["--config", str(RunDirectory.open(root, require_trained=False, option="--resume").config_path), *args]
    try:
        return parser, parser.parse_args(args)
    except ArgumentError as error:
        raise ConfigError(condense_parser_error(str(error), parser)) from None


def _argument(args: list[str], option: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(f"{option}="):
            return arg.partition("=")[2]
    return None


def load_run_config(run: Any) -> tuple[EnsembleSettings, dict, dict | None]:
    """Settings, model spec and data spec saved in a run's ``config.yaml``.

    Raises:
        ConfigError: If the saved config is no longer valid.
    """
    from jsonargparse import ArgumentError  # noqa: PLC0415

    parser = build_parser("eval")
    try:
        cfg = parser.parse_args(["--root", str(run.root), "--config", str(run.config_path)])
    except ArgumentError as error:
        msg = f"{run.config_path}: {condense_parser_error(str(error), parser)}"
        raise ConfigError(msg) from None
    return (
        settings_from_namespace(cfg),
        spec_from_namespace(cfg.TrainModels.model),
        spec_from_namespace(cfg.get("data")),
    )


def check_frozen_keys(run_cfg: Namespace, cfg: Namespace) -> None:
    """Fail if ``eval`` changes a key a trained run fixes (tiling, model, trainer, seed, blending).

    Raises:
        ConfigError: Naming the key and the run's value.
    """
    for key in FROZEN_KEYS:
        before, after = _plain(run_cfg.get(key)), _plain(cfg.get(key))
        if before != after:
            msg = f"{key}: the run was trained with {before!r}; eval cannot change it (got {after!r}); train a new run"
            raise ConfigError(msg)


def instantiate_datamodule(spec: dict[str, Any] | None) -> Any:
    """Data module from ``{class_path, init_args}`` (nested class specs such as augmentations included).

    Raises:
        ConfigError: If there is no spec or the class rejects its arguments.
    """
    if spec is None:
        msg = "data: the run's config has no data section; pass --data.class_path and --data.init_args.*"
        raise ConfigError(msg)
    return _instantiate(spec, "anomalib.data.AnomalibDataModule", "data")


def _instantiate(spec: dict[str, Any], base_path: str, key: str) -> Any:
    from jsonargparse import ArgumentError  # noqa: PLC0415

    module, _, name = base_path.rpartition(".")
    base = getattr(importlib.import_module(module), name)
    parser = ArgumentParser(exit_on_error=False, parser_mode=PARSER_MODE)
    parser.add_argument(f"--{key}", type=base)
    try:
        cfg = parser.parse_object({key: spec})
        return parser.instantiate_classes(cfg)[key]
    except (ArgumentError, TypeError, ValueError) as error:
        msg = f"{key}: {condense_parser_error(str(error), parser)}"
        raise ConfigError(msg) from None
