"""The ``tiled`` subcommands: each parses its arguments and calls the engine."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

from rich.table import Table

from anomalib_tiled.cli.arguments import parse_args
from anomalib_tiled.cli.console import ConsoleProgress, quiet_libraries
from anomalib_tiled.components import instantiate_datamodule
from anomalib_tiled.configfile import plain, settings_from_namespace, spec_from_namespace
from anomalib_tiled.engine import TiledEnsembleEngine
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.run import RunDirectory
from anomalib_tiled.runconfig import check_frozen, read_run_config
from anomalib_tiled.settings import RuntimeSettings

if TYPE_CHECKING:
    from jsonargparse import Namespace


def train(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled train``: fit every tile (or finish ``--resume``), then evaluate."""
    cfg = _parse("train", options)
    settings = settings_from_namespace(cfg)
    model_spec = spec_from_namespace(cfg.TrainModels.get("model"))
    data_spec = spec_from_namespace(cfg.get("data"))
    if model_spec is None:
        msg = "TrainModels.model: missing; set TrainModels.model.class_path (e.g. Padim) in the config"
        raise ConfigError(msg)
    if data_spec is None:
        msg = "data: missing; set data.class_path (e.g. MVTecAD) and data.init_args.root in the config"
        raise ConfigError(msg)
    engine = TiledEnsembleEngine.from_settings(settings, progress)
    datamodule = instantiate_datamodule(data_spec)
    if cfg.evaluate:
        results = engine.train(model_spec, datamodule, resume=cfg.resume, data_spec=data_spec)
        _summary(progress, results[0])
    else:
        engine.fit(model_spec, datamodule, resume=cfg.resume, data_spec=data_spec)
    assert engine.run is not None
    sys.stdout.write(f"{engine.run.root}\n")
    return 0


def evaluate(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled eval``: evaluate a run again, post-processing settings may change."""
    cfg = _parse("eval", options)
    settings = settings_from_namespace(cfg)
    run = RunDirectory.open(cfg.root)
    trained = read_run_config(run)
    check_frozen(trained, settings, spec_from_namespace(cfg.TrainModels.get("model")), "eval")
    engine = TiledEnsembleEngine.from_run(run.root, settings, progress=progress)
    data_spec = spec_from_namespace(cfg.get("data"))
    datamodule = None if data_spec == trained.data_spec else instantiate_datamodule(data_spec)
    results = engine.test(datamodule=datamodule)
    _summary(progress, results[0])
    return 0


def predict(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled predict``: apply a run to unlabeled images."""
    cfg = _parse("predict", options)
    trained = read_run_config(RunDirectory.open(cfg.root)).settings
    changes = {key: value for key, value in vars(cfg.visualization).items() if value is not None}
    post = dataclasses.replace(
        trained.postprocessing, visualization=dataclasses.replace(trained.postprocessing.visualization, **changes)
    )
    runtime = RuntimeSettings(
        accelerator=cfg.accelerator or trained.runtime.accelerator,
        devices=cfg.devices if cfg.devices is not None else trained.runtime.devices,
        default_root_dir=trained.runtime.default_root_dir,
        execution=plain(cfg.execution),
    )
    settings = dataclasses.replace(trained, postprocessing=post, runtime=runtime)
    engine = TiledEnsembleEngine.from_run(cfg.root, settings, progress=progress)
    engine.predict(cfg.data, cfg.output)
    return 0


COMMANDS = {"train": train, "eval": evaluate, "predict": predict}


def _parse(command: str, options: list[str]) -> Namespace:
    cfg = parse_args(command, options)
    quiet_libraries()  # after the imports: importing Lightning resets its loggers to INFO
    return cfg


def _summary(progress: ConsoleProgress, results: dict[str, float]) -> None:
    table = Table(title="Tiled ensemble")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for name, value in results.items():
        table.add_row(name, f"{value:.4f}")
    progress.console.print(table)
