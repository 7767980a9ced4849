"""Components named in a config: class lookup and instantiation.

Models, data modules, metrics, thresholds, callbacks and loggers are given as a short name
(``Padim``), a class path or ``{class_path, init_args}``. This module turns them into classes and
objects, and fails with one line naming the key when a name or an argument is wrong.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from anomalib_tiled.config.parse_errors import condense_parser_error
from anomalib_tiled.errors import ConfigError, did_you_mean

MODEL_MODULE = "anomalib.models"
DATA_MODULE = "anomalib.data"
METRIC_MODULE = "anomalib.metrics"

METRIC_FIELDS = {
    ("image", "score"): ["pred_score", "gt_label"],
    ("image", "label"): ["pred_label", "gt_label"],
    ("pixel", "score"): ["anomaly_map", "gt_mask"],
    ("pixel", "label"): ["pred_mask", "gt_mask"],
}
"""Batch fields an anomalib metric reads, by level and by what it compares (scores or labels)."""


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
    """Fail if ``init_args`` names a parameter ``cls`` does not accept (classes taking ``**kwargs`` accept all)."""
    parameters = inspect.signature(cls.__init__).parameters
    if (
        any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        and cls.__init__ is not object.__init__
    ):
        return
    accepted = [n for n in parameters if n != "self"]
    for name in init_args:
        if name not in accepted:
            msg = f"{key}.init_args.{name}: {cls.__name__} has no argument '{name}'{did_you_mean(name, accepted)}"
            raise ConfigError(msg)


def threshold_class(method: str | dict) -> type:
    """Resolve the threshold method and check it can be built with its init args.

    Raises:
        ConfigError: If it is no anomalib threshold or rejects its arguments.
    """
    from anomalib.metrics import AnomalibMetric  # noqa: PLC0415 - anomalib's metrics load torchmetrics
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
    fields = {"fields": METRIC_FIELDS["image", "score"]} if issubclass(cls, AnomalibMetric) else {}
    try:
        cls(**fields, **init_args)
    except Exception as error:  # noqa: BLE001 - whatever the class raises, the cause is its init args
        detail = " ".join(str(error).split())
        msg = f"thresholding.method: {cls.__name__} cannot be built with {init_args}: {detail}"
        raise ConfigError(msg) from None
    return cls


def metric_class(spec: str | dict, key: str) -> tuple[type, dict[str, Any]]:
    """Resolve a metric name, class path or ``{class_path, init_args}`` to its class and init args."""
    from anomalib.metrics import AnomalibMetric  # noqa: PLC0415
    from torchmetrics import Metric  # noqa: PLC0415
    from torchmetrics.classification import BinaryPrecisionRecallCurve  # noqa: PLC0415

    class_path, init_args = class_spec(spec, key)
    cls = import_class(class_path, METRIC_MODULE, key)
    if not (issubclass(cls, Metric) and issubclass(cls, AnomalibMetric)):
        msg = f"{key}: {class_path} is not an anomalib metric; use e.g. AUROC, F1Score, AUPR or AUPRO"
        raise ConfigError(msg)
    check_init_args(cls, {k: v for k, v in init_args.items() if k not in {"fields", "prefix", "strict"}}, key)
    if issubclass(cls, BinaryPrecisionRecallCurve):
        # torchmetrics squashes scores outside [0, 1] with a sigmoid: raw anomaly scores (Padim's are
        # tens) all become 1.0 and the curve collapses (AUROC 0.5). Curves depend only on the ranking.
        init_args.setdefault("normalization", None)
    return cls, init_args


def metric_kind(cls: type) -> str:
    """``label`` for metrics of thresholded predictions (F1Score...), ``score`` for curves (AUROC...)."""
    from torchmetrics.classification import BinaryStatScores  # noqa: PLC0415

    return "label" if issubclass(cls, BinaryStatScores) else "score"


def validation_metrics(names: list[str]) -> list[Any]:
    """Exact anomalib metrics named ``image_<Metric>``/``pixel_<Metric>`` for a tile model's validation.

    Raises:
        ConfigError: If a name is no anomalib curve metric (tile models make no thresholded predictions).
    """
    metrics = []
    for name in names:
        level, _, metric_name = name.partition("_")
        cls, init_args = metric_class(metric_name, f"monitor '{name}'")
        if metric_kind(cls) == "label":
            msg = (
                f"monitor '{name}': needs thresholded predictions, which tile models do not make during training; "
                "monitor a curve metric such as pixel_AUROC"
            )
            raise ConfigError(msg)
        metrics.append(cls(fields=METRIC_FIELDS[level, "score"], prefix=f"{level}_", **init_args))
    return metrics


def monitored_metrics(callbacks: list[Any]) -> list[str]:
    """``image_*``/``pixel_*`` metric names that the callbacks monitor.

    Raises:
        ConfigError: If a monitored ``image_``/``pixel_`` name is not an anomalib metric.
    """
    names = []
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.partition("_")[0] in {"image", "pixel"}:
            validation_metrics([monitor])
            names.append(monitor)
    return sorted(set(names))


def fresh_callbacks(trainer: dict[str, Any]) -> list[Any]:
    """New callback objects from the trainer config, so no state (early-stopping counters...) leaks between tiles."""
    from lightning.pytorch import Callback  # noqa: PLC0415

    return fresh_objects(
        trainer.get("callbacks"), Callback, "lightning.pytorch.callbacks", "TrainModels.trainer.callbacks"
    )


def fresh_loggers(trainer: dict[str, Any], save_dir: str) -> bool | list[Any]:
    """The trainer's ``logger`` setting for one tile: new logger objects writing below ``save_dir``.

    ``true``/``false`` are passed on (Lightning's default logger writes to the tile folder too).
    """
    from lightning.pytorch.loggers import Logger  # noqa: PLC0415

    specs = trainer.get("logger", False)
    if isinstance(specs, bool) or specs is None:
        return bool(specs)
    # Without a save_dir in the config, each tile logs into its own folder of the run.
    return fresh_objects(
        specs, Logger, "lightning.pytorch.loggers", "TrainModels.trainer.logger", {"save_dir": save_dir}
    )


def fresh_objects(specs: Any, base: type, module: str, key: str, defaults: dict[str, Any] | None = None) -> list[Any]:
    """New objects of subclasses of ``base`` from specs (or deep copies of given objects).

    Raises:
        ConfigError: Naming ``key[index]`` when a class is unknown, of the wrong kind or rejects its arguments.
    """
    if specs is None:
        return []
    objects = []
    for index, spec in enumerate(specs if isinstance(specs, list) else [specs]):
        where = f"{key}[{index}]"
        if isinstance(spec, base):
            objects.append(copy.deepcopy(spec))
            continue
        class_path, init_args = class_spec(spec, where)
        cls = import_class(class_path, module, where)
        if not issubclass(cls, base):
            msg = f"{where}: {class_path} is not a Lightning {base.__name__.lower()}"
            raise ConfigError(msg)
        check_init_args(cls, init_args, where)
        accepted = inspect.signature(cls.__init__).parameters
        init_args = {**{k: v for k, v in (defaults or {}).items() if k in accepted}, **init_args}
        try:
            objects.append(cls(**init_args))
        except Exception as error:  # noqa: BLE001 - Lightning raises its own exception types for bad arguments
            detail = " ".join(str(error).split())
            msg = f"{where}: {cls.__name__} rejected its arguments: {detail}"
            raise ConfigError(msg) from None
    return objects


def instantiate_datamodule(spec: dict[str, Any] | None) -> Any:
    """Data module from ``{class_path, init_args}`` (nested class specs such as augmentations included).

    Raises:
        ConfigError: If there is no spec or the class rejects its arguments.
    """
    from anomalib.data import AnomalibDataModule  # noqa: PLC0415

    if spec is None:
        msg = "data: the run's config has no data section; pass --data.class_path and --data.init_args.*"
        raise ConfigError(msg)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=AnomalibDataModule)
    try:
        return parser.instantiate_classes(parser.parse_object({"data": spec}))["data"]
    except (ArgumentError, TypeError, ValueError) as error:
        msg = f"data: {condense_parser_error(str(error), parser)}"
        raise ConfigError(msg) from None
