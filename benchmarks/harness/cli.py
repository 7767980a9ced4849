"""Command-line pieces every entry script shares: paths, exit statuses, options, one-line stops, child environments."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
"""Default ``--shared``: the folder holding ``data/mvtec_ad/<category>`` and ``hf-cache``."""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A setup problem reported as one line with exit status 2."""


def add_common_options(parser: argparse.ArgumentParser, out: str = "benchmarks/out", timeout: float = 3600.0) -> None:
    """``--shared``, ``--out`` (default ``out``, below the repository) and ``--timeout``, alike in every benchmark."""
    parser.add_argument(
        "--shared", type=Path, default=SHARED, help="folder with data/mvtec_ad and hf-cache (default: ../shared)"
    )
    parser.add_argument("--out", type=Path, default=REPO / out, help=f"results folder (default: {out})")
    parser.add_argument(
        "--timeout", type=float, default=timeout, help=f"seconds after which a child process is killed ({timeout:g})"
    )


def report_stop(error: UsageError | KeyboardInterrupt, running: str) -> int:
    """Say in one line why a benchmark stopped early; return its exit status (2: usage error, 130: interrupted)."""
    if isinstance(error, KeyboardInterrupt):
        sys.stderr.write(f"error: interrupted; the running {running} was stopped and no report was written\n")
        return EXIT_INTERRUPTED
    sys.stderr.write(f"error: {error}\n")
    return EXIT_USAGE


def parse_choices(text: str, allowed: Sequence[str], option: str) -> list[str]:
    """The comma-separated items of ``text``, in the order given, each once.

    Raises:
        ValueError: Naming ``option`` when an item is not in ``allowed`` or there is none.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        msg = f"{option}: unknown value(s) {unknown or text!r}; use a comma-separated subset of {','.join(allowed)}"
        raise ValueError(msg)
    return list(dict.fromkeys(items))


def whole_numbers(text: str, option: str, minimum: int | None = None) -> list[int]:
    """The comma-separated whole numbers of ``text``, in the order given, each once.

    Raises:
        ValueError: Naming ``option`` when an item is not a whole number (or is below ``minimum``) or there is none.
    """
    try:
        numbers = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        numbers = []
    if not numbers or (minimum is not None and min(numbers) < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        msg = f"{option}: expected comma-separated whole numbers{bound}, got {text!r}"
        raise ValueError(msg)
    return list(dict.fromkeys(numbers))


def stamp() -> str:
    """The current UTC date and time for a results folder's name, e.g. ``20261126-012000Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%SZ")


def offline_env(hf_cache: Path | None = None) -> dict[str, str]:
    """The environment of a child that must not reach a model hub (backbones from ``hf_cache``), else this one's."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if hf_cache is not None:
        env["HF_HOME"] = str(hf_cache.resolve())
    return env


def benchmark_env(args: argparse.Namespace) -> dict[str, str]:
    """:func:`offline_env` with the backbones of ``<--shared>/hf-cache``; none with ``--quick`` (random weights)."""
    return offline_env(None if args.quick else args.shared / "hf-cache")


def mvtec_category(shared: Path, category: str) -> Path:
    """``<shared>/data/mvtec_ad/<category>``, once it and the offline backbone cache ``<shared>/hf-cache`` are found.

    Raises:
        UsageError: Naming what is missing and how to point at it.
    """
    source = shared / "data" / "mvtec_ad" / category
    cache = shared / "hf-cache"
    if not (source / "train").is_dir() or not (source / "test").is_dir():
        msg = (
            f"shared data not found: {source} (with train/ and test/) does not exist; pass --shared DIR "
            "(the folder holding data/mvtec_ad/<category> and hf-cache) or run --quick"
        )
        raise UsageError(msg)
    if not cache.is_dir():
        msg = f"offline backbone cache not found: {cache} does not exist; pass --shared DIR or run --quick"
        raise UsageError(msg)
    return source
