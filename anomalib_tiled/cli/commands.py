"""The ``tiled`` subcommands: each parses its arguments and calls the engine."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

from rich.table import Table

from anomalib_tiled.cli.arguments import parse_args
from anomalib_tiled.cli.console import ConsoleProgress, quiet_libraries
from anomalib_tiled.components import instantiate_datamodule
from anomalib_tiled.configfile import settings_from_namespace, spec_from_namespace
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
        _summary(progress, results[0], engine)
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
    _summary(progress, results[0], engine)
    return 0


def predict(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled predict``: apply a run (``--root``) or an exported one (``--model``) to unlabeled images."""
    cfg = _parse("predict", options)
    changes = {key: value for key, value in vars(cfg.visualization).items() if value is not None}
    if (cfg.root is None) == (cfg.model is None):
        msg = "predict: give either --root RUN (the trained run) or --model ARTIFACT (an exported one), not both"
        raise ConfigError(msg)
    if cfg.model is not None:
        from anomalib_tiled.deploy.inferencer import TiledInferencer  # noqa: PLC0415 - runtimes load on use
        from anomalib_tiled.deploy.predict import predict_with_artifact  # noqa: PLC0415

        predict_with_artifact(TiledInferencer(cfg.model, cfg.device), cfg.data, cfg.output, progress, changes)
        return 0
    trained = read_run_config(RunDirectory.open(cfg.root)).settings
    post = dataclasses.replace(
        trained.postprocessing, visualization=dataclasses.replace(trained.postprocessing.visualization, **changes)
    )
    runtime = RuntimeSettings(
        accelerator=cfg.accelerator or trained.runtime.accelerator,
        devices=cfg.devices if cfg.devices is not None else trained.runtime.devices,
        default_root_dir=trained.runtime.default_root_dir,
    )
    settings = dataclasses.replace(trained, postprocessing=post, runtime=runtime)
    engine = TiledEnsembleEngine.from_run(cfg.root, settings, progress=progress)
    engine.predict(cfg.data, cfg.output)
    return 0


def export(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled export``: one deployable artifact of a trained run; prints its folder."""
    cfg = _parse("export", options)
    from anomalib_tiled.export import export_run  # noqa: PLC0415 - exporters load on use

    directory = export_run(
        cfg.root,
        cfg.format,
        compression=cfg.compression,
        output=cfg.output,
        calibration_data=cfg.data,
        progress=progress,
    )
    sys.stdout.write(f"{directory}\n")
    return 0


COMMANDS = {"train": train, "eval": evaluate, "predict": predict, "export": export}


def _parse(command: str, options: list[str]) -> Namespace:
    cfg = parse_args(command, options)
    quiet_libraries()  # after the imports: importing Lightning resets its loggers to INFO
    return cfg


def _summary(progress: ConsoleProgress, results: dict[str, float], engine: TiledEnsembleEngine) -> None:
    table = Table(title="Tiled ensemble")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for name, value in results.items():
        table.add_row(name, f"{value:.4f}")
    progress.console.print(table)
