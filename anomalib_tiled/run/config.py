"""A run's ``config.yaml``: written once when training starts, read by ``eval``, ``predict`` and ``--resume``.

What a run was trained with is *frozen*: the trained part of the settings (seed, tile geometry,
model, trainer, and the blending its statistics were learned with) may not change when the run is
evaluated, resumed or applied. :func:`check_frozen` is the one place that decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError

from anomalib_tiled.config.format import (
    dump_config,
    settings_from_namespace,
    settings_parser,
    settings_to_config,
    spec_from_namespace,
)
from anomalib_tiled.config.model_spec import ModelSpec
from anomalib_tiled.config.parse_errors import condense_parser_error
from anomalib_tiled.data.splits import DEFAULT_BATCH_SIZE
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.run.directory import RunDirectory, atomic_write_text
from anomalib_tiled.settings import EnsembleSettings

FROZEN_KEYS = (
    "seed",
    "tiling",
    "TrainModels.model",
    "TrainModels.trainer",
    "TrainModels.calibration_share",
    "merge.blending",
)
"""Config keys a trained run fixes."""

PRE_SCALING_VALUES = (("TrainModels.calibration_share", "0"), ("merge.tile_scaling", "none"))
"""What runs written before tile scaling existed (version 0.1, whose ``config.yaml`` lacks these
keys) were trained and merged with: they hold no images out, so they merge raw tiles."""


class SavedConfig:
    """A run's ``config.yaml``, read once: its text, the parser arguments that load it, and its settings.

    Args:
        path: The file (for messages).
        text: Its content.
    """

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self._parsed: RunConfig | None = None

    @classmethod
    def read(cls, run: RunDirectory) -> SavedConfig:
        """The ``config.yaml`` of ``run``."""
        return cls(run.config_path, run.config_path.read_text(encoding="utf-8"))

    @property
    def args(self) -> list[str]:
        """``--config <the file's content>``, plus the values of the keys an older run does not record."""
        config = yaml.safe_load(self.text) or {}
        args = ["--config", self.text]
        if "calibration_share" not in (config.get("TrainModels") or {}):
            args += [f"--{key}={value}" for key, value in PRE_SCALING_VALUES]
        return args

    @property
    def config(self) -> RunConfig:
        """Settings, model spec and data spec the file holds (parsed on first use).

        Nothing about the machine is checked here: a run trained on a GPU is read on a CPU box.

        Raises:
            ConfigError: If the saved config is no longer valid.
        """
        if self._parsed is None:
            parser = settings_parser()
            try:
                cfg = parser.parse_args(self.args)
            except ArgumentError as error:
                msg = f"{self.path}: {condense_parser_error(str(error), parser)}"
                raise ConfigError(msg) from None
            model, data = spec_from_namespace(cfg.TrainModels.model), spec_from_namespace(cfg.get("data"))
            self._parsed = RunConfig(settings_from_namespace(cfg), model, data)
        return self._parsed


@dataclass
class RunConfig:
    """What a run's ``config.yaml`` holds.

    Attributes:
        settings: The run's settings.
        model_spec: ``{class_path, init_args}`` of the tile model.
        data_spec: ``{class_path, init_args}`` of the data module, if known.
    """

    settings: EnsembleSettings
    model_spec: dict[str, Any]
    data_spec: dict[str, Any] | None

    @property
    def eval_batch_size(self) -> int:
        """The data module's eval batch size (anomalib's default when unknown)."""
        return int(((self.data_spec or {}).get("init_args") or {}).get("eval_batch_size") or DEFAULT_BATCH_SIZE)


def write_run_config(run: RunDirectory, config: RunConfig) -> None:
    """Write ``config.yaml`` (atomically)."""
    text = dump_config(settings_to_config(config.settings, config.model_spec, config.data_spec))
    atomic_write_text(run.config_path, text)


def read_run_config(run: RunDirectory) -> RunConfig:
    """Settings, model spec and data spec saved in a run's ``config.yaml`` (see :class:`SavedConfig`)."""
    return SavedConfig.read(run).config


def check_frozen(trained: RunConfig, settings: EnsembleSettings, model_spec: dict[str, Any] | None = None) -> None:
    """Fail if ``settings`` (or ``model_spec``) change what the run was trained with.

    Args:
        trained: The run's own config.
        settings: Settings asked for now.
        model_spec: Model asked for now, or None to keep the run's.

    Raises:
        ConfigError: Naming the first changed key, the run's value and the value given.
    """
    # With defaults filled in, so specs that differ only in spelling (defaults, short names) compare equal.
    trained_model = ModelSpec.from_spec(trained.model_spec).full_spec
    given_model = trained_model if model_spec is None else ModelSpec.from_spec(model_spec).full_spec
    before = settings_to_config(trained.settings, trained_model, None)
    after = settings_to_config(settings, given_model, None)
    for key in FROZEN_KEYS:
        was, given = _lookup(before, key), _lookup(after, key)
        if was != given:
            msg = (
                f"{key}: the run was trained with {was!r}, not {given!r}; a trained run's {key} cannot "
                "change: keep the run's value or train a new run"
            )
            raise ConfigError(msg)


def _lookup(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
