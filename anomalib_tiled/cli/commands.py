"""The ``tiled`` subcommands: each parses its arguments and calls the engine."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

from anomalib_tiled.cli.arguments import parse_args
from anomalib_tiled.cli.console import ConsoleProgress, quiet_libraries
from anomalib_tiled.config.components import instantiate_datamodule
from anomalib_tiled.config.format import plain, settings_from_namespace, spec_from_namespace
from anomalib_tiled.engine import TiledEnsembleEngine
from anomalib_tiled.errors import ConfigError, RunDirectoryError
from anomalib_tiled.report import REPORT_DATA, REPORT_HTML, load_report_data, render_report
from anomalib_tiled.run.directory import RunDirectory, latest_version
from anomalib_tiled.settings import RuntimeSettings

if TYPE_CHECKING:
    from pathlib import Path

    from jsonargparse import Namespace

    from anomalib_tiled.run.config import SavedConfig


def train(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled train``: fit every tile (or finish ``--resume``), then evaluate."""
    cfg, _ = _parse("train", options)
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
        _summary(progress, results[0], engine.evaluation_dir)
    else:
        engine.fit(model_spec, datamodule, resume=cfg.resume, data_spec=data_spec)
        # Without an evaluation there is no report: the run folder is the last line.
        assert engine.run is not None
        progress.message(f"Run: {engine.run.root}")
    return 0


def evaluate(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled eval``: evaluate a run again, post-processing settings may change."""
    cfg, saved = _parse("eval", options)
    settings = settings_from_namespace(cfg)
    model_spec = spec_from_namespace(cfg.TrainModels.get("model"))
    trained = saved.config if saved else None
    engine = TiledEnsembleEngine.from_run(cfg.root, settings, model_spec=model_spec, progress=progress, trained=trained)
    assert engine.trained is not None
    data_spec = spec_from_namespace(cfg.get("data"))
    datamodule = None if data_spec == engine.trained.data_spec else instantiate_datamodule(data_spec)
    results = engine.test(datamodule=datamodule)
    _summary(progress, results[0], engine.evaluation_dir)
    return 0


def predict(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled predict``: apply a run (``--root``) or an exported one (``--model``) to unlabeled images."""
    cfg, saved = _parse("predict", options)
    changes = {key: value for key, value in vars(cfg.visualization).items() if value is not None}
    if (cfg.root is None) == (cfg.model is None):
        msg = "predict: give either --root RUN (the trained run) or --model ARTIFACT (an exported one), not both"
        raise ConfigError(msg)
    if cfg.model is not None:
        from anomalib_tiled.deploy.inferencer import TiledInferencer  # noqa: PLC0415 - runtimes load on use
        from anomalib_tiled.deploy.predict import predict_with_artifact  # noqa: PLC0415

        predict_with_artifact(TiledInferencer(cfg.model, cfg.device), cfg.data, cfg.output, progress, changes)
        return 0
    engine = TiledEnsembleEngine.from_run(cfg.root, progress=progress, trained=saved.config if saved else None)
    trained = engine.settings
    post = dataclasses.replace(
        trained.postprocessing, visualization=dataclasses.replace(trained.postprocessing.visualization, **changes)
    )
    runtime = RuntimeSettings(
        accelerator=cfg.accelerator or trained.runtime.accelerator,
        devices=cfg.devices if cfg.devices is not None else trained.runtime.devices,
        default_root_dir=trained.runtime.default_root_dir,
        execution=plain(cfg.execution),
    )
    engine.settings = dataclasses.replace(trained, postprocessing=post, runtime=runtime)
    predictions = engine.predict(cfg.data, cfg.output)
    # After the library's "Predictions of N images written to <output>" line: the run and the report.
    assert engine.run is not None
    progress.message(f"Run: {engine.run.root}")
    progress.message(f"Report: {predictions[0].anomaly_map_path.parent.parent / REPORT_HTML}")
    return 0


def report(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled report``: render an evaluation's ``report.html`` again from its saved data."""
    cfg, _ = _parse("report", options)
    run = RunDirectory.open(cfg.root)
    folder = run.root / "eval" / cfg.eval if cfg.eval else latest_version(run.root / "eval")
    if folder is None or not (folder / REPORT_DATA).is_file():
        where = folder or run.root / "eval"
        msg = f"--root: no {REPORT_DATA} in {where}; evaluate the run with 'anomalib tiled eval --root {run.root}'"
        raise RunDirectoryError(msg)
    page = render_report(load_report_data(folder), folder)
    progress.message(f"Report: {page}")
    return 0


def export(options: list[str], progress: ConsoleProgress) -> int:
    """``anomalib tiled export``: one deployable artifact of a trained run; prints its folder."""
    cfg, _ = _parse("export", options)
    from anomalib_tiled.export import export_run  # noqa: PLC0415 - exporters load on use

    directory = export_run(
        cfg.root,
        cfg.format,
        compression=cfg.compression,
        output=cfg.output,
        quantization_images=cfg.data,
        progress=progress,
    )
    sys.stdout.write(f"{directory}\n")
    return 0


COMMANDS = {"train": train, "eval": evaluate, "predict": predict, "report": report, "export": export}


def _parse(command: str, options: list[str]) -> tuple[Namespace, SavedConfig | None]:
    parsed = parse_args(command, options)
    quiet_libraries()  # after the imports: importing Lightning resets its loggers to INFO
    return parsed


def _summary(progress: ConsoleProgress, results: dict[str, float], output: Path | None) -> None:
    """The three lines a run ends with: metrics, run folder, report."""
    assert output is not None
    progress.message("Metrics: " + ", ".join(f"{name} {value:.4f}" for name, value in results.items()))
    progress.message(f"Run: {output.parent.parent}")
    progress.message(f"Report: {output / REPORT_HTML}")
