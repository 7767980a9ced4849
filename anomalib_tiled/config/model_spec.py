"""The tile model named in a config: its class and init args, checked, and their canonical spec.

Kept apart from building models (:mod:`anomalib_tiled.execution.models`) so that a run's config is
read and compared without anything that trains.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from anomalib.models import AnomalibModule

from anomalib_tiled.config.components import MODEL_MODULE, check_init_args, class_spec, import_class
from anomalib_tiled.config.format import as_yaml_value
from anomalib_tiled.errors import ConfigError

# Components the ensemble replaces for the merged predictions.
_ENSEMBLE_COMPONENTS = ("post_processor", "evaluator", "visualizer")


class ModelSpec:
    """One anomalib model class and its init args, as a config names them.

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
    def from_spec(cls, spec: str | dict | AnomalibModule | type) -> ModelSpec:
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
