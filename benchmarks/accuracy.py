"""Accuracy matrix: datasets x models x seeds, ours (with post-processing variants) vs upstream vs single.

Sides (:mod:`benchmarks.harness.ours`, :mod:`benchmarks.harness.sides`):
    * ``ours``: ``python -m anomalib_tiled train`` once per (dataset, model, seed), then one
      ``eval --root RUN <options>`` per variant (:data:`VARIANTS`, or ``--variant NAME=OPTIONS``);
    * ``upstream``: anomalib 2.7's tiled ensemble (with pixel AUPRO added to its evaluator);
    * ``single``: one model on the whole image, scaled so its longer side is the tile size.

Every side reports image AUROC, pixel AUROC, pixel AUPRO and pixel F1 with anomalib's metrics.
Datasets (:mod:`benchmarks.harness.accuracy_data`) are built once under ``<out>/data`` (data seed
``--data-seed``); ``--seeds`` seed the models. One JSON per cell
(``<out>/cells/<dataset>/<model>/seed<k>/<side>.json``); finished cells are skipped on a rerun
(ours evaluates only the variants it lacks). ``<out>/accuracy.md`` holds the tables.

Usage (from the repository root):
    HF_HOME=../shared/hf-cache HF_HUB_OFFLINE=1 python -m benchmarks.accuracy --datasets textures,border
    python -m benchmarks.accuracy --datasets bottle --models padim,patchcore --seeds 0,1,2 --workers 2
    python -m benchmarks.accuracy --out benchmark-results/accuracy --report-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import cli
from benchmarks.harness.accuracy_data import DATASETS, BenchDataset, DatasetUnavailableError, build
from benchmarks.harness.accuracy_report import write_tables
from benchmarks.harness.files import write_json
from benchmarks.harness.launch import Launcher, process_error
from benchmarks.harness.models import PADIM, PATCHCORE
from benchmarks.harness.ours import run_ours
from benchmarks.harness.results import SideResult, finish_metrics
from benchmarks.harness.sides import run_reference, run_upstream
from benchmarks.harness.workload import Workload

MODELS: dict[str, dict[str, Any]] = {
    "padim": PADIM,
    "patchcore": PATCHCORE,
    "padim_random": {"class_path": "Padim", "init_args": {"backbone": "resnet18", "pre_trained": False}},
}
VARIANTS: dict[str, list[str]] = {
    f"{prefix}_{pooling}": ["--merge.tile_scaling", scaling, "--merge.image_score", image_score]
    for prefix, scaling in (("raw", "none"), ("z", "normal_zscore"), ("q", "normal_quantile"))
    for pooling, image_score in (("max", "max_map"), ("topk", "topk_map"), ("mean", "mean_tiles"))
}
"""Post-processing variants of ours (tile scaling x image score), all applied to the one trained run."""
SIDES = ("ours", "upstream", "single")
BASE_OURS_OVERRIDES: tuple[tuple[str, Any], ...] = (("visualization.save", False),)
"""Config keys ours always trains with: result pictures cost time and say nothing about accuracy."""
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _pairs(entries: list[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            msg = f"{option}: expected NAME=VALUE, got {entry!r}"
            raise ValueError(msg)
        pairs.append((key.strip(), value))
    return pairs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; a bad value exits with status 2 and one ``error:`` line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_common_options(parser, "benchmark-results/accuracy", timeout=1800.0)
    parser.add_argument("--datasets", default="textures", help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--models", default="padim", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated model seeds (default: 0)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="ours' variants to evaluate (names)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="define (or redefine) a variant: eval options, e.g. 'topk=--merge.image_score topk_map' (repeatable)",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config key of ours' training, VALUE parsed as YAML, e.g. TrainModels.calibration_share=0.2",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated datasets (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once, single-threaded each if > 1")
    parser.add_argument("--rerun-failed", action="store_true", help="run failed cells again (default: keep them)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild accuracy.md from the cell files")
    args = parser.parse_args(argv)
    try:
        args.dataset_names = cli.parse_choices(args.datasets, DATASETS, "--datasets")
        args.model_names = cli.parse_choices(args.models, list(MODELS), "--models")
        args.side_names = cli.parse_choices(args.sides, SIDES, "--sides")
        args.seed_list = cli.whole_numbers(args.seeds, "--seeds")
        args.variant_table = {**VARIANTS, **{k: shlex.split(v) for k, v in _pairs(args.variant, "--variant")}}
        args.variant_names = cli.parse_choices(args.variants, list(args.variant_table), "--variants")
        args.overrides = tuple((k, yaml.safe_load(v)) for k, v in _pairs(args.train_override, "--train-override"))
    except (ValueError, yaml.YAMLError) as error:
        parser.error(str(error).splitlines()[0])
    if args.workers < 1:
        parser.error(f"--workers: expected a whole number >= 1, got {args.workers}")
    return args


def ours_tag(overrides: tuple[tuple[str, Any], ...]) -> str:
    """Cell-file stem of ours: ``ours``, or ``ours-<hash>`` when trained with extra config keys."""
    if not overrides:
        return "ours"
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode(), usedforsecurity=False).hexdigest()[:8]
    return f"ours-{digest}"


class Matrix:
    """Runs the cells of the matrix and writes one JSON per cell.

    Args:
        args: Parsed command-line options.
        launcher: Process settings of every side.
    """

    def __init__(self, args: argparse.Namespace, launcher: Launcher) -> None:
        self.args = args
        self.launcher = launcher
        self.out: Path = args.out.resolve()
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        """Print a progress line (cells may run in parallel)."""
        with self.lock:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def workload(self, data: BenchDataset, model: str, seed: int, *, single: bool = False) -> Workload:
        """What every side runs for one cell; ``single`` sizes it for the single model."""
        return Workload(
            data_root=data.root,
            category=data.category,
            image_size=data.single_size if single else data.image_size,
            tile_size=data.tile_size,
            stride=data.stride,
            model=MODELS[model],
            seed=seed,
            num_workers=0,
            pixel_aupro=True,
            ours_overrides=(*BASE_OURS_OVERRIDES, *self.args.overrides),
        )

    def run_cell(self, data: BenchDataset, model: str, seed: int, side: str) -> bool:
        """Run one cell unless its file says it is done; return whether all its rows are ok."""
        stem = ours_tag(self.args.overrides) if side == "ours" else side
        where = Path(data.name) / model / f"seed{seed}"
        cell_file = self.out / "cells" / where / f"{stem}.json"
        directory = self.out / "runs" / where / stem
        cell = json.loads(cell_file.read_text(encoding="utf-8")) if cell_file.is_file() else None
        if cell is not None and not self._needs_run(cell, side):
            return all(row["ok"] for row in cell["rows"].values())
        self.say(f"{data.name} / {model} / seed {seed}: {side} ...")
        base = {"dataset": data.name, "model": model, "seed": seed, "side": side}
        if side == "ours":
            cell = self._ours(data, model, seed, directory, cell)
        else:
            runner = run_upstream if side == "upstream" else run_reference
            result = runner(self.workload(data, model, seed, single=side == "single"), directory, self.launcher)
            cell = {"rows": {side: result.to_dict()}}
        cell = {**base, **cell}
        write_json(cell_file, cell)
        for label, row in cell["rows"].items():
            outcome = _metrics_text(row["metrics"]) if row["ok"] else f"FAILED: {row['error']}"
            self.say(f"  {data.name} / {model} / seed {seed}: {label}: {row['wall_s'] or 0:.0f} s, {outcome}")
        return all(row["ok"] for row in cell["rows"].values())

    def _needs_run(self, cell: dict[str, Any], side: str) -> bool:
        failed = not all(row["ok"] for row in cell["rows"].values())
        if side == "ours":
            missing = [name for name in self.args.variant_names if _label(name) not in cell["rows"]]
            return (bool(missing) and cell["train"]["ok"]) or (failed and self.args.rerun_failed)
        return failed and self.args.rerun_failed

    def _ours(
        self, data: BenchDataset, model: str, seed: int, directory: Path, cell: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Train once (or reuse the cell's trained run), then evaluate the variants it lacks."""
        rows: dict[str, Any] = dict(cell["rows"]) if cell else {}
        train = cell["train"] if cell and cell["train"]["ok"] and Path(cell["train"]["run_dir"]).is_dir() else None
        if train is None:
            rows = {}
            train = run_ours(self.workload(data, model, seed), directory, self.launcher, mode="train").to_dict()
        overrides = [list(pair) for pair in self.args.overrides]
        missing = {
            name: self.args.variant_table[name]
            for name in self.args.variant_names
            if not (_label(name) in rows and (rows[_label(name)]["ok"] or not self.args.rerun_failed))
        }
        if not train["ok"]:
            rows.update({_label(name): dict(train) for name in missing})
        elif missing:
            results = eval_ours_variants(Path(train["run_dir"]), directory, self.launcher, missing)
            rows.update({_label(name): {**results[name].to_dict(), "options": missing[name]} for name in missing})
        return {"train": train, "train_overrides": overrides, "rows": rows}

    def run(self) -> bool:
        """Build the datasets, run every cell (``--workers`` at a time); return whether all succeeded."""
        cells = []
        ok = True
        for name in self.args.dataset_names:
            try:
                data = build(name, self.out / "data", self.args.data_seed, self.args.shared.resolve())
            except DatasetUnavailableError as error:
                self.say(f"{name}: skipped: {error}")
                continue
            cells += [
                (data, model, seed, side)
                for model in self.args.model_names
                for seed in self.args.seed_list
                for side in self.args.side_names
            ]
        with ThreadPoolExecutor(max_workers=self.args.workers) as pool:
            for done in pool.map(lambda cell: self.run_cell(*cell), cells):
                ok = ok and done
        return ok


def eval_ours_variants(
    run_dir: Path, directory: Path, launcher: Launcher, variants: dict[str, list[str]]
) -> dict[str, SideResult]:
    """Evaluate a trained run once per variant, in one child process (imports paid once).

    Returns:
        Every variant's metrics, or why it failed (the process's wall time is shared by all).
    """
    spec, result_file = write_json(directory / "variants.json", variants), directory / "variants-result.json"
    result_file.unlink(missing_ok=True)
    command = launcher.child(
        "ours_variants.py", "--root", str(run_dir), "--variants", str(spec), "--result", str(result_file)
    )
    process = launcher.run(command, directory / "logs" / "ours-variants", directory)
    error = process_error(process, "ours eval")
    outcome = json.loads(result_file.read_text(encoding="utf-8")) if error is None and result_file.is_file() else {}
    results = {}
    for name in variants:
        result = SideResult("ours")
        result.add_process(process)
        found = outcome.get(name) or {}
        if found.get("exit") == 0 and found.get("metrics_file"):
            source = f"ours {name} ({found['metrics_file']})"
            metrics = json.loads(Path(found["metrics_file"]).read_text(encoding="utf-8"))
            results[name] = finish_metrics(result, metrics, source)
            continue
        result.error = error or f"ours eval {name}: exit status {found.get('exit')}; see {process.stderr_path}"
        results[name] = result
    return results


def _label(variant: str) -> str:
    return f"ours {variant}"


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of the sides: offline hub, the shared backbone cache, one thread each with workers."""
    cache = args.shared / "hf-cache"
    env = cli.offline_env(cache if "HF_HOME" not in os.environ and cache.is_dir() else None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cli.REPO), env.get("PYTHONPATH")]))
    if args.workers > 1:
        # Cells share the cores; accuracy does not depend on timing.
        env.update(SINGLE_THREAD_ENV)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix and write the tables.

    Returns:
        0 when every cell succeeded, 1 when one failed, 2 on a usage error.
    """
    args = parse_args(argv)
    out = args.out.resolve()
    if args.report_only:
        if not (out / "cells").is_dir():
            sys.stderr.write(f"error: --report-only: no cell files under {out / 'cells'}\n")
            return cli.EXIT_USAGE
        sys.stdout.write(f"{write_tables(out)}\n")
        return 0
    launcher = Launcher(env=child_env(args), interval=0.5, timeout=args.timeout)
    ok = Matrix(args, launcher).run()
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout.write(f"{write_tables(out)}\n")
    return 0 if ok else cli.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
