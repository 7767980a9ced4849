"""Scaling of tile training over workers: serial vs the processes and Ray runners (issue #10).

Every contender trains and evaluates the same run (``python -m anomalib_tiled train``, one monitored
process whose tree includes the workers and Ray's own processes) on MVTec AD bottle at 512 px with
Padim on the offline resnet18: a 3x3 grid (tiles 256, stride 128) and a 4x4 grid (tiles 128). The
contenders are serial (torch's default threads: all cores), and processes and ray with 1 and 2
workers, each worker with cores / workers threads, so workers x threads = cores.

Usage (from the repository root):
    python -m benchmarks.scaling                 # bottle 40 train / 45 test, both grids (about 25 min on 2 cores)
    python -m benchmarks.scaling --grids 3x3     # one grid
    python -m benchmarks.scaling --quick         # synthetic 256 px images, random backbone: a smoke test

Results go to ``benchmarks/out/scaling-<date-time>/results.md`` and ``results.json``. The exit
status is 1 if a contender failed (and, with ``--check-targets``, if a target is missed), 2 on a
usage error such as missing shared data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.compare_upstream import (
    EXIT_FAILED,
    PRETRAINED_MODEL,
    QUICK_DATA,
    RANDOM_MODEL,
    REPO,
    UsageError,
    report_stop,
)
from benchmarks.datasets import build_subset, make_synthetic
from benchmarks.report import machine_info
from benchmarks.sides import REPORTED_METRICS, Launcher, SideResult, Workload, logged_records, run_ours

GIB = 1024**3
SPEEDUP_TARGET = 1.3
"""Two workers at least this much faster than serial on the 3x3 grid (end to end)."""
RSS_TARGET = 2.0
"""Peak process-tree RSS at most this multiple of serial's."""
METRIC_TOLERANCE = 1e-6
"""Largest metric difference to serial that counts as identical."""
CONTENDERS = (("serial", 1), ("processes", 1), ("processes", 2), ("ray", 1), ("ray", 2))
GRIDS = {"3x3": (256, 128), "4x4": (128, 128)}
"""Grid name: (tile size, stride) at 512 px; ``--quick`` halves both at 256 px."""
TABLE_HEADER = (
    "| Runner | Workers x threads | Wall | Speed-up | First tile at | Tiles' own time | Peak RSS (tree) "
    "| RSS / serial | Peak PSS (tree) | max metric diff |"
)
TILE_LINE = re.compile(r"(tile_r\d+_c\d+) trained in ([\d.]+) s")


@dataclass
class Measurement:
    """One contender on one grid.

    Attributes:
        runner: ``serial``, ``processes`` or ``ray``.
        workers: Concurrent tile jobs.
        threads: Torch threads per worker.
        result: Wall time, memory and metrics of the ``train`` process.
        first_tile_s: Seconds from the start of training until the first tile was trained (decoding,
            workers' start-up and imports, one tile).
        tile_s: Sum of the tiles' own training times.
    """

    runner: str
    workers: int
    threads: int
    result: SideResult
    first_tile_s: float | None = None
    tile_s: float | None = None


@dataclass
class Grid:
    """The contenders on one grid."""

    name: str
    measurements: list[Measurement] = field(default_factory=list)

    def serial(self) -> Measurement | None:
        """The serial contender, if it succeeded."""
        found = [m for m in self.measurements if m.runner == "serial" and m.result.ok]
        return found[0] if found else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic 256 px data and a random backbone")
    parser.add_argument("--grids", default="3x3,4x4", help="comma-separated subset of 3x3,4x4 (default: both)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="data/mvtec_ad and hf-cache")
    parser.add_argument("--n-train", type=int, default=40, help="training images of the bottle subset")
    parser.add_argument("--n-test", type=int, default=45, help="test images of the bottle subset")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to share (default: all)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds after which a contender is killed")
    parser.add_argument(
        "--pss", action="store_true", help="also sample the tree's PSS every 2 s (shared pages counted once; costs CPU)"
    )
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="results folder")
    args = parser.parse_args(argv)
    args.grid_names = [name.strip() for name in args.grids.split(",") if name.strip()]
    if not args.grid_names or set(args.grid_names) - set(GRIDS):
        parser.error(f"--grids: use a comma-separated subset of {','.join(GRIDS)}, got {args.grids!r}")
    return args


def execution(runner: str, workers: int, cores: int) -> dict[str, Any]:
    """``execution`` keys of a contender: workers x threads = cores."""
    if runner == "serial":
        return {"runner": "serial"}
    threads = max(1, cores // workers)
    keys: dict[str, Any] = {"runner": runner, "workers": workers, "threads_per_worker": threads}
    if runner == "ray":
        keys["ray"] = {"num_cpus_per_tile": threads}
    return keys


def dataset(args: argparse.Namespace, scratch: Path) -> Path:
    """Root of the benchmark's data (MVTec layout), built in ``scratch``."""
    if args.quick:
        return make_synthetic(scratch / "synthetic", 256, seed=42, **QUICK_DATA).parent
    source = args.shared / "data" / "mvtec_ad" / "bottle"
    for needed in (source / "train", source / "test", args.shared / "hf-cache"):
        if not needed.is_dir():
            msg = f"shared data not found: {needed} does not exist; pass --shared DIR or run --quick"
            raise UsageError(msg)
    return build_subset(source, scratch / "data", n_train=args.n_train, n_test=args.n_test).root


def measure(args: argparse.Namespace, data_root: Path, out: Path, console: Console) -> list[Grid]:
    """Run every contender on every grid."""
    env = {key: value for key, value in os.environ.items() if key not in {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}}
    env["HF_HUB_OFFLINE"] = "1"
    if not args.quick:
        env["HF_HOME"] = str(args.shared.resolve() / "hf-cache")
    launcher = Launcher(env=env, interval=0.1, timeout=args.timeout, pss_interval=2.0 if args.pss else None)
    scale = 2 if args.quick else 1
    grids = []
    for name in args.grid_names:
        tile, stride = (size // scale for size in GRIDS[name])
        grid = Grid(name)
        for runner, workers in CONTENDERS:
            keys = execution(runner, workers, args.cores)
            workload = Workload(
                data_root=data_root,
                category="texture" if args.quick else "bottle",
                image_size=512 // scale,
                tile_size=tile,
                stride=stride,
                model=RANDOM_MODEL if args.quick else PRETRAINED_MODEL,
                execution=keys,
            )
            console.print(f"{name}: {runner} with {workers} worker(s) ...")
            result = run_ours(workload, out / name / f"{runner}-{workers}", launcher)
            threads = keys.get("threads_per_worker", args.cores)
            grid.measurements.append(_with_tile_times(Measurement(runner, workers, threads, result)))
            console.print(f"  {_summary(result)}")
        grids.append(grid)
    return grids


def _with_tile_times(measurement: Measurement) -> Measurement:
    """Where the time went, from the run's log: start-up until the first tile, and the tiles' own time."""
    result = measurement.result
    if not result.run_dir or result.wall_s is None:
        return measurement
    log = Path(result.run_dir) / "run.log"
    records = logged_records(log, "trained in")
    started = logged_records(log, " tile positions (")  # "Training Padim on 9 tile positions (...)"
    if records and started:
        measurement.first_tile_s = records[0][0] - started[0][0]
        measurement.tile_s = sum(float(match[2]) for _, text in records if (match := TILE_LINE.search(text)))
    return measurement


def _summary(result: SideResult) -> str:
    if not result.ok:
        return f"FAILED: {result.error}"
    return f"{result.wall_s:.1f} s, peak RSS {(result.peak_tree_rss or 0) / GIB:.2f} GiB, {result.metrics}"


def metric_difference(result: SideResult, serial: SideResult) -> float | None:
    """Largest absolute metric difference to serial (None when either lacks a metric)."""
    names = [name for name in REPORTED_METRICS if name in serial.metrics]
    if not result.ok or any(name not in result.metrics for name in names):
        return None
    return max(abs(result.metrics[name] - serial.metrics[name]) for name in names)


def targets(grids: list[Grid]) -> list[dict[str, str]]:
    """The issue's targets: speed-up of 2 workers on 3x3, identical metrics, peak RSS within 2x serial."""
    rows = []
    for grid in grids:
        serial = grid.serial()
        for m in grid.measurements:
            if serial is None or m.runner == "serial" or not m.result.ok:
                continue
            label = f"{grid.name} {m.runner} x{m.workers}"
            difference = metric_difference(m.result, serial.result)
            rows.append(_row(label, "metrics = serial", difference is not None and difference <= METRIC_TOLERANCE))
            rss = (m.result.peak_tree_rss or 0) / (serial.result.peak_tree_rss or 1)
            rows.append(_row(label, f"peak RSS <= {RSS_TARGET:g} x serial ({rss:.2f})", rss <= RSS_TARGET))
            if grid.name == "3x3" and m.workers == 2:
                speedup = (serial.result.wall_s or 0) / (m.result.wall_s or 1)
                rows.append(_row(label, f"speed-up >= {SPEEDUP_TARGET:g} ({speedup:.2f})", speedup >= SPEEDUP_TARGET))
    return rows


def _row(contender: str, target: str, met: bool) -> dict[str, str]:
    return {"contender": contender, "target": target, "status": "met" if met else "not met"}


def render(grids: list[Grid], machine: dict[str, Any], args: argparse.Namespace) -> str:
    """The results as Markdown: one table per grid, then the targets."""
    data = "synthetic 256 px (--quick)" if args.quick else f"MVTec AD bottle {args.n_train}/{args.n_test}, 512 px"
    machine_line = (
        f"{machine['cpu']}, {machine['logical_cores']} logical cores, {machine['ram_gib']} GiB; load at start "
        f"{machine['load_average_at_start']}; commit {machine['commit']}; {machine['date']}"
    )
    lines = ["# Scaling: serial vs processes vs ray", "", machine_line, f"Data: {data}", ""]
    for grid in grids:
        lines += [f"## {grid.name}", "", *_table(grid), ""]
    lines += ["## Targets", "", "| Contender | Target | Status |", "| --- | --- | --- |"]
    lines += [f"| {row['contender']} | {row['target']} | {row['status']} |" for row in targets(grids)]
    return "\n".join(lines) + "\n"


def _table(grid: Grid) -> list[str]:
    serial = grid.serial()
    rows = [TABLE_HEADER, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in grid.measurements:
        result = m.result
        if not result.ok:
            rows.append(f"| {m.runner} | {m.workers} x {m.threads} | FAILED: {result.error} | | | | | | | |")
            continue
        base = serial.result if serial else result
        difference = metric_difference(result, base)
        rows.append(
            f"| {m.runner} | {m.workers} x {m.threads} | {result.wall_s:.1f} s "
            f"| {(base.wall_s or 0) / (result.wall_s or 1):.2f} | {_seconds(m.first_tile_s)} | {_seconds(m.tile_s)} "
            f"| {(result.peak_tree_rss or 0) / GIB:.2f} GiB "
            f"| {(result.peak_tree_rss or 0) / (base.peak_tree_rss or 1):.2f} "
            f"| {'n/a' if result.peak_tree_pss is None else f'{result.peak_tree_pss / GIB:.2f} GiB'} "
            f"| {'n/a' if difference is None else f'{difference:.1e}'} |"
        )
    return rows


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the Markdown report and write it with the JSON results.

    Returns:
        0 on success, 1 if a contender failed (or a target is missed with ``--check-targets``), 2 on a
        usage error, 130 when interrupted.
    """
    args = parse_args(argv)
    console = Console(stderr=True)
    out = args.out.resolve() / f"scaling-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%SZ')}"
    try:
        with tempfile.TemporaryDirectory(prefix="anomalib-tiled-scaling-") as scratch:
            grids = measure(args, dataset(args, Path(scratch)), out, console)
    except (UsageError, KeyboardInterrupt) as error:
        return report_stop(error, "contender")
    markdown = render(grids, machine_info(REPO), args)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    results = {grid.name: [m.__dict__ | {"result": m.result.to_dict()} for m in grid.measurements] for grid in grids}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(markdown)
    console.print(f"Written: {out / 'results.md'} and {out / 'results.json'}")
    failed = any(not m.result.ok for grid in grids for m in grid.measurements)
    missed = args.check_targets and any(row["status"] == "not met" for row in targets(grids))
    return EXIT_FAILED if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
