"""Command line: ``anomalib tiled train | eval | predict`` (also ``anomalib-tiled`` and ``python -m anomalib_tiled``).

The CLI is a thin layer over :class:`~anomalib_tiled.engine.TiledEnsembleEngine`. Inside ``anomalib``
the ``tiled`` subcommand is a pipeline whose parser hands the remaining arguments over unparsed;
they are parsed here, so the three entry points share one parser and one error format: a single
``error: <key>: <what is wrong>; <fix>`` line and a non-zero exit status, tracebacks only with
``--verbose`` or in the run's ``run.log``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from anomalib_tiled.errors import ConfigError, RunInterruptedError, TiledEnsembleError

SUBCOMMANDS = {
    "train": "Train one model per tile position, then evaluate on the test split.",
    "eval": "Evaluate a trained run on its test split (or on data given with --data).",
    "predict": "Predict unlabeled images with a trained run.",
}

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def overview(prog: str = "anomalib tiled") -> str:
    """Help text listing the subcommands."""
    lines = [
        f"usage: {prog} {{train,eval,predict}} [options]",
        "",
        "Tiled ensemble: one anomalib model per tile position of high-resolution images.",
        "",
        "subcommands:",
        *(f"  {name:<9}{description}" for name, description in SUBCOMMANDS.items()),
        "",
        f"Run '{prog} <subcommand> --help' for its options.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run a ``tiled`` subcommand.

    Args:
        argv: Arguments after ``tiled`` (default: ``sys.argv[1:]``).
        prog: Program name shown in help (default: the running script's name).

    Returns:
        Exit status: 0 on success, 1 on a failed run, 2 on a usage/config error, 130 when interrupted.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name
    if not args or args[0] in {"-h", "--help"}:
        sys.stdout.write(overview(prog))
        return 0 if args else EXIT_USAGE
    command, options = args[0], args[1:]
    if command not in SUBCOMMANDS:
        from anomalib_tiled.errors import did_you_mean  # noqa: PLC0415

        sys.stderr.write(
            f"error: unknown subcommand '{command}'{did_you_mean(command, SUBCOMMANDS)}; use train, eval or predict\n"
        )
        return EXIT_USAGE
    verbose = "--verbose" in options or "--verbose=true" in options
    warnings.filterwarnings("ignore", category=FutureWarning)  # anomalib's import-time deprecations
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(command, options)
    except SystemExit as exit_:
        # --help and --print_config exit through argparse.
        return int(exit_.code or 0) if isinstance(exit_.code, int | None) else EXIT_ERROR
    except RunInterruptedError as error:
        _report(error, verbose)
        return EXIT_INTERRUPTED
    except ConfigError as error:
        _report(error, verbose)
        return EXIT_USAGE
    except TiledEnsembleError as error:
        _report(error, verbose)
        return EXIT_ERROR
    except KeyboardInterrupt as error:
        _report(error, verbose, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure ends in one line and a non-zero exit
        _report(error, verbose, f"{type(error).__name__}: {' '.join(str(error).split())}")
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(command: str, options: list[str]) -> int:
    from anomalib_tiled import config  # noqa: PLC0415
    from anomalib_tiled.engine import TiledEnsembleEngine  # noqa: PLC0415

    _quiet_libraries()  # after the imports: importing Lightning resets its loggers to INFO
    _, cfg = config.parse_args(command, options)
    if command == "predict":
        from anomalib_tiled.run import RunDirectory  # noqa: PLC0415

        run_settings, _, _ = config.load_run_config(RunDirectory.open(cfg.root))
        changes = {key: value for key, value in vars(cfg.visualization).items() if value is not None}
        visualization = dataclasses.replace(run_settings.visualization, **changes)
        engine = TiledEnsembleEngine.from_run(cfg.root, dataclasses.replace(run_settings, visualization=visualization))
        engine.predict(cfg.data, cfg.output)
        return 0
    settings = config.settings_from_namespace(cfg)
    model_spec = config.spec_from_namespace(cfg.TrainModels.get("model"))
    data_spec = config.spec_from_namespace(cfg.get("data"))
    if command == "eval":
        from anomalib_tiled.run import RunDirectory  # noqa: PLC0415

        run = RunDirectory.open(cfg.root)
        _, run_cfg = config.parse_args("eval", ["--root", str(run.root)])
        config.check_frozen_keys(run_cfg, cfg)
        engine = TiledEnsembleEngine.from_run(run.root, settings)
        run_data = config.spec_from_namespace(run_cfg.get("data"))
        datamodule = None if data_spec == run_data else config.instantiate_datamodule(data_spec)
        engine.test(datamodule=datamodule)
        return 0
    if model_spec is None:
        msg = "TrainModels.model: missing; set TrainModels.model.class_path (e.g. Padim) in the config"
        raise ConfigError(msg)
    if data_spec is None:
        msg = "data: missing; set data.class_path (e.g. MVTecAD) and data.init_args.root in the config"
        raise ConfigError(msg)
    engine = TiledEnsembleEngine.from_settings(settings)
    datamodule = config.instantiate_datamodule(data_spec)
    if cfg.evaluate:
        engine.train(model_spec, datamodule, resume=cfg.resume, data_spec=data_spec)
    else:
        engine.fit(model_spec, datamodule, resume=cfg.resume, data_spec=data_spec)
    sys.stdout.write(f"{engine.run.root}\n")
    return 0


def _report(error: BaseException, verbose: bool, text: str | None = None) -> None:
    if verbose:
        traceback.print_exception(error)
    message = text if text is not None else str(error)
    hint = (
        ""
        if verbose or isinstance(error, TiledEnsembleError | KeyboardInterrupt)
        else " (rerun with --verbose for the traceback)"
    )
    sys.stderr.write(f"error: {message}{hint}\n")


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    del signum, frame
    raise KeyboardInterrupt


def _quiet_libraries() -> None:
    """Keep Lightning's per-tile banners (devices, tips) and known-harmless notices off the console."""
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "lightning_fabric",
        "anomalib",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's notes on memory-bank models (no optimizer, frozen backbone in eval mode) say
    # nothing about the user's run.
    for message in (
        "`LightningModule.configure_optimizers` returned `None`",
        "Found .* module\\(s\\) in eval mode",
        "`isinstance\\(treespec, LeafSpec\\)`",
    ):
        warnings.filterwarnings("ignore", message=message)
