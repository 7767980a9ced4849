"""``anomalib tiled``: the tiled ensemble as a pipeline of anomalib's CLI.

Kept apart from :mod:`anomalib_tiled.cli` so that ``anomalib-tiled`` and ``python -m anomalib_tiled``
do not import anomalib's pipeline machinery just to print help.
"""

from __future__ import annotations

import argparse
import sys

from anomalib.pipelines.components.base import Pipeline
from jsonargparse import ArgumentParser, Namespace

from anomalib_tiled.cli import main, overview


class _PassThroughParser(ArgumentParser):
    """Parser of ``anomalib tiled``: keeps everything after ``tiled`` for :func:`main`.

    anomalib's CLI nests pipeline parsers one level deep; the ``tiled`` subcommands are parsed by
    :func:`main` instead, which also gives them our one-line errors.
    """

    def format_help(self) -> str:
        return overview()


class TiledPipeline(Pipeline):
    """Tiled ensemble: train, evaluate and predict with one model per tile position."""

    def _setup_runners(self, args: dict) -> list:
        """None: the tiled ensemble runs its stages itself (:class:`~anomalib_tiled.engine.TiledEnsembleEngine`)."""
        del args
        return []

    @staticmethod
    def get_parser(parser: ArgumentParser | None = None) -> ArgumentParser:
        """Parser that hands ``train|eval|predict`` and their options to :func:`main`."""
        del parser
        pass_through = _PassThroughParser(description=TiledPipeline.__doc__)
        pass_through.add_argument("args", nargs=argparse.REMAINDER, help="train | eval | predict, and their options")
        return pass_through

    def run(self, args: Namespace | None = None) -> None:
        """Run the subcommand; a failure exits with :func:`main`'s status."""
        status = main(list(args.args) if args is not None else None, prog="anomalib tiled")
        if status:
            sys.exit(status)
