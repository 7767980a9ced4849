"""Settings of a tiled ensemble: enums and plain dataclasses, nothing else.

The settings are split by what may change once a run is trained:

* :class:`TrainingSettings` — what the tile models depend on (tile geometry, seed, trainer); a run
  fixes them;
* :class:`PostProcessingSettings` — what turns tile predictions into results (normalisation,
  thresholds, seam smoothing, merging, metrics, pictures); an evaluation may change them;
* :class:`RuntimeSettings` — where work runs and writes (accelerator, devices, output root, and how
  tile jobs are spread over workers: :class:`ExecutionSettings`); any command may change them, so a
  run trained on a GPU server is evaluated on a CPU.

Construction checks only values (ranges, enum names): no I/O, no imports of heavy libraries and no
hardware checks. Those run just before work, in :mod:`anomalib_tiled.config.checks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from anomalib_tiled.errors import ConfigError, did_you_mean
from anomalib_tiled.tiling import Blending, TileGrid


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
    TOPK_MAP = "topk_map"
    MEAN_TILES = "mean_tiles"
    MAX_TILES = "max_tiles"


class TileScaling(str, Enum):
    """How tile predictions are put on a common scale before merging (``merge.tile_scaling``)."""

    NONE = "none"
    NORMAL_ZSCORE = "normal_zscore"
    NORMAL_QUANTILE = "normal_quantile"


# Config-file spellings of the enums (jsonargparse parses enums by member name, the guide uses values).
NormalizationStageName = Literal["tile", "image", "none"]
ThresholdStageName = Literal["tile", "image"]
BlendingName = Literal["mean", "hann", "gaussian"]
ImageScoreName = Literal["max_map", "topk_map", "mean_tiles", "max_tiles"]
TileScalingName = Literal["none", "normal_zscore", "normal_quantile"]
RunnerName = Literal["serial", "processes", "ray"]
AUTO = "auto"
T = TypeVar("T")


@dataclass
class TilingConfig:
    """Tile geometry as written in a config file.

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

    def __post_init__(self) -> None:
        self.stage = enum_value(ThresholdStage, self.stage, "thresholding.stage")

    @property
    def is_manual(self) -> bool:
        """Whether the threshold is fixed by the user rather than learned from validation data."""
        method = self.method.get("class_path", "") if isinstance(self.method, dict) else self.method
        return str(method).rpartition(".")[2] == "ManualThreshold"


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

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            msg = f"SeamSmoothing.sigma: must be > 0, got {self.sigma}"
            raise ConfigError(msg)
        if not 0 < self.width <= 1:
            msg = f"SeamSmoothing.width: must be in (0, 1] (a fraction of the tile size), got {self.width}"
            raise ConfigError(msg)


@dataclass
class MergeConfig:
    """How tile predictions become full-image predictions.

    Args:
        blending: Weighting of overlapping tiles: ``mean`` (uniform), ``hann`` or ``gaussian``
            (smooth windows that favour tile centres).
        image_score: ``max_map`` (max of the merged map, like anomalib models), ``topk_map`` (mean
            of the ``top_k`` highest merged-map pixels), ``mean_tiles`` or ``max_tiles`` (mean or
            max of the tile scores).
        tile_scaling: Put every tile model on a common scale before merging, learned from the
            normal images held out of fitting (``TrainModels.calibration_share``): ``normal_zscore``,
            ``normal_quantile`` or ``none`` (raw values).
        top_k: Fraction of the merged map's pixels ``topk_map`` averages, in (0, 1].
    """

    blending: BlendingName | Blending = "mean"
    # Defaults chosen by the accuracy matrix (docs/benchmarks.md), not by taste.
    image_score: ImageScoreName | ImageScore = "topk_map"
    tile_scaling: TileScalingName | TileScaling = "normal_quantile"
    top_k: float = 0.01

    def __post_init__(self) -> None:
        self.blending = enum_value(Blending, self.blending, "merge.blending")
        self.image_score = enum_value(ImageScore, self.image_score, "merge.image_score")
        self.tile_scaling = enum_value(TileScaling, self.tile_scaling, "merge.tile_scaling")
        if not 0 < self.top_k <= 1:
            msg = f"merge.top_k: must be a fraction of the pixels in (0, 1], got {self.top_k}"
            raise ConfigError(msg)


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

    def __post_init__(self) -> None:
        if self.max_side < 16:
            msg = f"visualization.max_side: must be >= 16 pixels, got {self.max_side}"
            raise ConfigError(msg)


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

    def __post_init__(self) -> None:
        self.image = _as_list(self.image)
        self.pixel = _as_list(self.pixel)


@dataclass
class TrainingSettings:
    """What the tile models depend on; a trained run fixes it.

    Args:
        grid: Tile grid.
        seed: Seed of data splits and models (tile ``i`` is seeded with ``seed + i``).
        trainer: Lightning Trainer arguments for every tile model (``callbacks`` and ``logger`` as
            class specs or objects).
        calibration_share: Fraction of the training images held out of fitting, on which every tile
            model's normal variation is measured (``merge.tile_scaling``); 0 fits on all of them.
    """

    grid: TileGrid
    seed: int = 42
    trainer: dict[str, Any] = field(default_factory=dict)
    calibration_share: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.calibration_share < 1:
            msg = f"TrainModels.calibration_share: must be in [0, 1), got {self.calibration_share}"
            raise ConfigError(msg)


@dataclass
class PostProcessingSettings:
    """What turns tile predictions into results; an evaluation may change it."""

    normalization_stage: NormalizationStageName | NormalizationStage = NormalizationStage.IMAGE
    thresholding: ThresholdingConfig = field(default_factory=ThresholdingConfig)
    seam_smoothing: SeamSmoothingConfig = field(default_factory=SeamSmoothingConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    visualization: VisualizationConfig = field(default_factory=VisualizationConfig)

    def __post_init__(self) -> None:
        self.normalization_stage = enum_value(NormalizationStage, self.normalization_stage, "normalization_stage")

    @property
    def needs_validation_split(self) -> bool:
        """Whether normalisation or thresholding learn statistics from validation predictions."""
        return self.normalization_stage != NormalizationStage.NONE or not self.thresholding.is_manual


@dataclass
class RaySettings:
    """How the ``ray`` runner uses a Ray cluster.

    Args:
        address: ``None`` starts a local Ray for the run; ``auto`` joins the cluster this machine
            belongs to (``ray start``); ``ray://host:10001`` connects through Ray Client.
        num_cpus_per_tile: CPUs Ray reserves for one tile job.
        num_gpus_per_tile: GPUs Ray reserves for one tile job; ``auto``: ``1 / tiles_per_device``
            on a GPU, ``0`` on a CPU.
        runtime_env: Ray ``runtime_env`` of the tile jobs (``env_vars``, ``pip``...); ``None``
            relies on an identical environment on every node.
        storage: ``shared`` (every node sees the run directory) or ``object_store`` (see docs/distributed.md).
    """

    address: str | None = None
    num_cpus_per_tile: float = 1
    num_gpus_per_tile: float | Literal["auto"] = AUTO
    runtime_env: dict[str, Any] | None = None
    storage: Literal["shared", "object_store"] = "shared"

    def __post_init__(self) -> None:
        check_choice(self.storage, ("shared", "object_store"), "execution.ray.storage")
        if self.num_cpus_per_tile <= 0:
            raise ConfigError(f"execution.ray.num_cpus_per_tile: must be > 0, got {self.num_cpus_per_tile}")
        if self.num_gpus_per_tile != AUTO and not 0 <= float(self.num_gpus_per_tile) <= 1:
            msg = f"execution.ray.num_gpus_per_tile: must be auto or in [0, 1], got {self.num_gpus_per_tile!r}"
            raise ConfigError(msg)


@dataclass
class ExecutionSettings:
    """Where tile jobs run: one after another, in local worker processes, or as Ray tasks.

    Args:
        runner: ``serial`` (in this process), ``processes`` (local worker processes, one device
            each) or ``ray`` (one Ray task per tile, on this machine or a cluster).
        workers: Tile jobs running at once; ``auto``: one per device slot on a GPU (devices x
            tiles_per_device), cores / threads_per_worker on a CPU (every tile with Ray).
        devices: ``auto`` (every visible GPU) or GPU indices ``[0, 1, 3]`` that tiles are spread
            over (``processes``); a tile uses exactly one.
        tiles_per_device: Tile jobs sharing one GPU.
        threads_per_worker: Torch intra-op threads of each worker; ``auto``: 1 when ``workers`` is
            ``auto``, else cores / workers (workers x threads never exceed the cores).
        max_retries: Times a tile is run again after its worker died (killed, node lost); a tile
            that raises is never retried.
        ray: Ray settings.
    """

    runner: RunnerName = "serial"
    workers: int | Literal["auto"] = AUTO
    devices: Literal["auto"] | list[int] = AUTO
    tiles_per_device: int = 1
    threads_per_worker: int | Literal["auto"] = AUTO
    max_retries: int = 2
    ray: RaySettings = field(default_factory=RaySettings)

    def __post_init__(self) -> None:
        self.ray = from_dict(RaySettings, self.ray, "execution.ray")
        check_choice(self.runner, get_args(RunnerName), "execution.runner")
        for key in ("workers", "threads_per_worker", "tiles_per_device"):
            value = getattr(self, key)
            if (value != AUTO or key == "tiles_per_device") and (not isinstance(value, int) or value < 1):
                msg = f"execution.{key}: must be an integer >= 1{'' if key == 'tiles_per_device' else ' or auto'}"
                raise ConfigError(f"{msg}, got {value!r}")
        if self.devices != AUTO and (not self.devices or len(set(self.devices)) != len(self.devices)):
            msg = f"execution.devices: must be auto or distinct GPU indices such as [0, 1], got {self.devices!r}"
            raise ConfigError(msg)
        if self.max_retries < 0:
            raise ConfigError(f"execution.max_retries: must be >= 0, got {self.max_retries}")


@dataclass
class RuntimeSettings:
    """Where the work runs and writes; any command may change it.

    Args:
        accelerator: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``mps``.
        devices: Device of the tile models: ``auto``/``1`` (the first one) or ``[index]``; ``None``
            keeps ``TrainModels.trainer.devices``.
        default_root_dir: Results root; runs go to ``<root>/<Model>/<Dataset>/<category>/vN``.
        execution: How tile jobs are spread over workers and devices (an :class:`ExecutionSettings`
            or a dict of its fields).
    """

    accelerator: str = "auto"
    devices: int | str | list[int] | None = None
    default_root_dir: Path = Path("results")
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)

    def __post_init__(self) -> None:
        self.default_root_dir = Path(self.default_root_dir)
        self.execution = from_dict(ExecutionSettings, self.execution or {}, "execution")


@dataclass
class EnsembleSettings:
    """Everything the tiled ensemble needs besides the model and the data.

    This is the single internal representation both config formats and the Python API resolve to.
    """

    training: TrainingSettings
    postprocessing: PostProcessingSettings = field(default_factory=PostProcessingSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    @property
    def grid(self) -> TileGrid:
        """The tile grid (the most used setting)."""
        return self.training.grid


def enum_value(enum_cls: type[Enum], value: Any, key: str) -> Any:
    """``value`` as a member of ``enum_cls``.

    Raises:
        ConfigError: Naming ``key`` and the valid choices.
    """
    if isinstance(value, enum_cls):
        return value
    check_choice(value, [member.value for member in enum_cls], key)
    return enum_cls(value)


def check_choice(value: Any, choices: Sequence[str], key: str) -> None:
    """Fail unless ``value`` is one of ``choices``.

    Raises:
        ConfigError: Naming ``key``, the closest choice and all of them.
    """
    if value not in choices:
        msg = f"{key}: unknown value {value!r}{did_you_mean(str(value), choices)}; use one of {list(choices)}"
        raise ConfigError(msg)


def from_dict(cls: type[T], value: T | dict[str, Any], key: str) -> T:
    """A settings dataclass from a dict of its fields (the Python API accepts both).

    Raises:
        ConfigError: Naming ``key.<field>`` for a field the class does not have.
    """
    if not isinstance(value, dict):
        return value
    names = [item.name for item in fields(cls)]
    for name in value:
        if name not in names:
            raise ConfigError(f"{key}.{name}: unknown key{did_you_mean(name, names)}; use one of {names}")
    return cls(**value)


def _as_list(value: Any) -> list:
    return [] if value is None else [value] if isinstance(value, str | dict) else list(value)
