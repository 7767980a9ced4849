"""Command line: ``anomalib tiled train | eval | predict`` (also ``anomalib-tiled`` and ``python -m anomalib_tiled``).

The CLI is a thin layer over :class:`~anomalib_tiled.engine.TiledEnsembleEngine`. Inside ``anomalib``
the ``tiled`` subcommand is a pipeline whose parser hands the remaining arguments over unparsed;
they are parsed here, so the three entry points share one parser and one error format: a single
``error: <key>: <what is wrong>; <fix>`` line and a non-zero exit status, tracebacks only with
``--verbose`` or in the run's ``run.log``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from anomalib_tiled.cli.console import ConsoleProgress, command_environment
from anomalib_tiled.cli.subcommands import SUBCOMMANDS
from anomalib_tiled.errors import ConfigError, RunInterruptedError, TiledEnsembleError, did_you_mean

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def overview(prog: str = "anomalib tiled") -> str:
    """Help text listing the subcommands."""
    lines = [
        f"usage: {prog} {{{','.join(SUBCOMMANDS)}}} [options]",
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
        sys.stderr.write(
            f"error: unknown subcommand '{command}'{did_you_mean(command, SUBCOMMANDS)}; use {', '.join(SUBCOMMANDS)}\n"
        )
        return EXIT_USAGE
    verbose = "--verbose" in options or "--verbose=true" in options
    progress = ConsoleProgress(Console(stderr=True, soft_wrap=True))
    try:
        with command_environment(progress):
            from anomalib_tiled.cli.commands import COMMANDS  # noqa: PLC0415 - keeps --help free of torch

            return COMMANDS[command](options, progress)
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
