"""Parsers of ``anomalib tiled train | eval | predict | export | report``.

``train`` reads a config file and command-line overrides; ``eval`` and ``train --resume`` start
from the run's own ``config.yaml`` and apply overrides on top; ``predict``, ``export`` and ``report``
take only a few options. Errors raise :class:`~anomalib_tiled.errors.ConfigError` with one line instead of
exiting.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from anomalib_tiled.cli.subcommands import SUBCOMMANDS
from anomalib_tiled.config.format import add_execution_arguments, add_settings_arguments
from anomalib_tiled.config.legacy import PARSER_MODE, register_loader
from anomalib_tiled.config.parse_errors import condense_parser_error
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.run.config import SavedConfig
from anomalib_tiled.run.directory import RunDirectory

ROOT_HELP = "Run directory printed by 'anomalib tiled train'."


def build_parser(command: str) -> ArgumentParser:
    """Parser of ``anomalib tiled <command>``; errors raise instead of exiting."""
    register_loader()
    parser = ArgumentParser(
        prog=f"anomalib tiled {command}",
        description=SUBCOMMANDS[command],
        parser_mode=PARSER_MODE,
        exit_on_error=False,
        default_config_files=[],
        allow_abbrev=False,
    )
    if command == "predict":
        _add_predict_arguments(parser)
    elif command == "export":
        _add_export_arguments(parser)
    elif command == "report":
        parser.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
        parser.add_argument("--eval", type=str | None, default=None, help="Evaluation folder (default: the latest).")
    elif command == "eval":
        parser.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
        add_settings_arguments(parser, require_data=False)
    else:
        parser.add_argument("--resume", type=Path | None, default=None, help="Resume an interrupted run directory.")
        parser.add_argument("--evaluate", type=bool, default=True, help="Evaluate on the test split after training.")
        add_settings_arguments(parser, require_data=False)
    parser.add_argument("--verbose", type=bool, default=False, help="Print full tracebacks.")
    return parser


def _add_predict_arguments(parser: ArgumentParser) -> None:
    # Exactly one of --root and --model (checked by the command: one clear line instead of a usage dump).
    parser.add_argument("--root", type=Path | None, default=None, help=ROOT_HELP)
    parser.add_argument("--model", type=Path | None, default=None, help="Artifact folder of 'anomalib tiled export'.")
    parser.add_argument("--data", type=str, required=True, help="Folder, image file or glob of images to predict.")
    parser.add_argument(
        "--output", type=Path | None, default=None, help="Output folder (default: predict/vN in the run or artifact)."
    )
    # Unset options keep the run's own settings.
    parser.add_argument("--accelerator", type=str | None, default=None, help="With --root: auto, cpu, gpu or mps.")
    parser.add_argument(
        "--devices", type=int | str | list[int] | None, default=None, help="With --root: 1/auto or [index]."
    )
    parser.add_argument("--device", type=str, default="CPU", help="With --model: CPU, GPU, or an OpenVINO device.")
    parser.add_argument("--visualization.save", type=bool | None, default=None, help="Write result pictures.")
    parser.add_argument("--visualization.max_side", type=int | None, default=None, help="Longest picture side.")
    parser.add_argument("--visualization.grid", type=bool | None, default=None, help="Draw the tile grid.")
    add_execution_arguments(parser)


def _add_export_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help=ROOT_HELP)
    parser.add_argument("--format", type=str, default="openvino", help="torch, onnx or openvino.")
    parser.add_argument(
        "--compression", type=str, default="none", help="none; with openvino also fp16, int8 or int8_ptq."
    )
    parser.add_argument("--output", type=Path | None, default=None, help="Artifact folder (default: <root>/export/vN).")
    parser.add_argument(
        "--data",
        type=str | None,
        default=None,
        help="int8_ptq quantisation images (default: the run's validation images).",
    )


def parse_args(command: str, args: list[str]) -> tuple[Namespace, SavedConfig | None]:
    """Parse the arguments of a subcommand (``eval`` and ``--resume`` start from the run's config).

    Returns:
        The parsed arguments, and the ``config.yaml`` of the run they name (read once), if any.

    Raises:
        ConfigError: With a one-line message on any parsing error.
        RunDirectoryError: If ``--root``/``--resume`` is not a run.
    """
    parser = build_parser(command)
    saved = None
    if command == "eval" and (root := _argument(args, "--root")) is not None:
        saved = SavedConfig.read(RunDirectory.open(root))
        args = [*saved.args, *args]
    if command == "train" and (root := _argument(args, "--resume")) is not None:
        saved = SavedConfig.read(RunDirectory.open(root, require_trained=False, option="--resume"))
        args = [*saved.args, *args]
    if command == "predict" and (root := _argument(args, "--root")) is not None:
        saved = SavedConfig.read(RunDirectory.open(root))
        # Like every unset predict option, the execution keys default to the run's own.
        parser.set_defaults({"execution": (yaml.safe_load(saved.text) or {}).get("execution") or {}})
    try:
        return parser.parse_args(args), saved
    except ArgumentError as error:
        raise ConfigError(condense_parser_error(str(error), parser)) from None


def _argument(args: list[str], option: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(f"{option}="):
            return arg.partition("=")[2]
    return None
