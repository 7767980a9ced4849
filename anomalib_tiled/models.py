"""Tile models: fresh anomalib models sized to the tiles, and trained ones loaded from checkpoints.

One fresh model per tile position is built from the configured class and init args with its
pre-processor sized to the tile. Post-processing, evaluation and visualisation of single tiles are
switched off in the tile models: the ensemble normalises, thresholds, evaluates and draws the
*merged* predictions itself. Only when a callback monitors an ``image_*``/``pixel_*`` metric (e.g.
``EarlyStopping(monitor=pixel_AUROC)``) does a tile model get an evaluator computing that metric on
its validation tiles.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule

from anomalib_tiled.components import MODEL_MODULE, check_init_args, class_spec, import_class, validation_metrics
from anomalib_tiled.configfile import as_yaml_value
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.tiling import Size

# Components the ensemble replaces for the merged predictions.
_ENSEMBLE_COMPONENTS = ("post_processor", "evaluator", "visualizer")


class ModelFactory:
    """Builds fresh tile models of one anomalib model class.

    Args:
        model_class: The anomalib model class.
        init_args: Keyword arguments of the model (``pre_processor`` may be given; the post-processor,
            evaluator and visualiser are the ensemble's).
    """

    def __init__(self, model_class: type[AnomalibModule], init_args: dict[str, Any] | None = None) -> None:
        self.model_class = model_class
        self.init_args = dict(init_args or {})
        for name in _ENSEMBLE_COMPONENTS:
            value = self.init_args.pop(name, True)
            if value not in (True, False, None):
                msg = (
                    f"TrainModels.model.init_args.{name}: not supported in a tiled ensemble, which post-processes, "
                    "evaluates and visualises merged predictions itself; remove it and use normalization_stage, "
                    "thresholding, TrainModels.metrics and visualization"
                )
                raise ConfigError(msg)
        check_init_args(model_class, self.init_args, "TrainModels.model")

    @classmethod
    def from_spec(cls, spec: str | dict | AnomalibModule | type) -> ModelFactory:
        """Factory from a class name/path, ``{class_path, init_args}``, a model class or a model instance.

        An instance is a template: its class and hyper-parameters are used, its weights are not.
        """
        if isinstance(spec, AnomalibModule):
            return cls(type(spec), dict(spec.hparams))
        if inspect.isclass(spec):
            if not issubclass(spec, AnomalibModule):
                msg = f"model: {spec.__name__} is not an anomalib model (AnomalibModule subclass)"
                raise ConfigError(msg)
            return cls(spec)
        class_path, init_args = class_spec(spec, "TrainModels.model")
        model_class = import_class(class_path, MODEL_MODULE, "TrainModels.model.class_path")
        if not issubclass(model_class, AnomalibModule):
            msg = f"TrainModels.model.class_path: {class_path} is not an anomalib model (AnomalibModule subclass)"
            raise ConfigError(msg)
        return cls(model_class, init_args)

    @property
    def name(self) -> str:
        """Model class name (used in the run directory path)."""
        return self.model_class.__name__

    @property
    def spec(self) -> dict[str, Any]:
        """``{class_path, init_args}`` of the model, for the run's config."""
        init_args = {k: v for k, v in self.init_args.items() if not isinstance(v, torch.nn.Module)}
        return {
            "class_path": f"{self.model_class.__module__}.{self.model_class.__qualname__}",
            "init_args": as_yaml_value(init_args),
        }

    @property
    def full_spec(self) -> dict[str, Any]:
        """:attr:`spec` with the model's plain default arguments filled in (a canonical form to compare)."""
        spec = self.spec
        plain = str | int | float | bool | list | tuple | None
        parameters = inspect.signature(self.model_class.__init__).parameters.values()
        defaults = {
            p.name: as_yaml_value(p.default)
            for p in parameters
            if p.name not in _ENSEMBLE_COMPONENTS and isinstance(p.default, plain)
        }
        return {**spec, "init_args": {**defaults, **spec["init_args"]}}

    def build(self, tile_size: Size, monitored_metrics: list[str]) -> AnomalibModule:
        """A new, untrained model for tiles of ``tile_size``.

        Args:
            tile_size: ``(height, width)`` of the tiles.
            monitored_metrics: ``image_<Metric>``/``pixel_<Metric>`` names callbacks monitor; the
                model computes them on its validation tiles.

        Raises:
            ConfigError: If the model rejects its init args.
        """
        kwargs = dict(self.init_args)
        if kwargs.get("pre_processor", True) is True:
            kwargs["pre_processor"] = _tile_pre_processor(self.model_class, tile_size)
        kwargs["post_processor"] = False
        kwargs["visualizer"] = False
        kwargs["evaluator"] = (
            Evaluator(val_metrics=validation_metrics(monitored_metrics)) if monitored_metrics else False
        )
        try:
            return self.model_class(**kwargs)
        except Exception as error:  # noqa: BLE001 - whatever the model raises, the cause is its init args
            detail = " ".join(str(error).split())
            msg = f"TrainModels.model.init_args: {self.name} cannot be built with {self.init_args}: {detail}"
            raise ConfigError(msg) from None

    def load(self, checkpoint: Path, tile_size: Size) -> AnomalibModule:
        """A trained tile model from its checkpoint (``weights_only=True`` through anomalib's loader).

        Args:
            checkpoint: The tile's checkpoint.
            tile_size: ``(height, width)`` of the tiles: models whose layers depend on the input
                size (FastFlow) are built for it, as they were for training.
        """
        overrides: dict[str, Any] = {"post_processor": False, "evaluator": False, "visualizer": False}
        if self.init_args.get("pre_processor", True) is True:
            overrides["pre_processor"] = _tile_pre_processor(self.model_class, tile_size)
        # The checkpoint holds the weights: no need to fetch pretrained backbones again.
        if "pre_trained" in inspect.signature(self.model_class.__init__).parameters:
            overrides["pre_trained"] = False
        return self.model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, **overrides)


def _tile_pre_processor(model_class: type[AnomalibModule], tile_size: Size) -> Any:
    try:
        return model_class.configure_pre_processor(image_size=tile_size)
    except TypeError:
        return model_class.configure_pre_processor()
