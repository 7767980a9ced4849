"""Scaling of tile training over workers: serial vs the processes and Ray runners.

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
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.harness import cli
from benchmarks.harness.datasets import QUICK_DATA, build_subset, make_synthetic
from benchmarks.harness.launch import Launcher
from benchmarks.harness.machine import machine_info, machine_line
from benchmarks.harness.manifest import RunTimes
from benchmarks.harness.markdown import format_gib, format_seconds, row, write_results
from benchmarks.harness.models import PADIM, RANDOM_PADIM
from benchmarks.harness.ours import run_ours
from benchmarks.harness.results import REPORTED_METRICS, SideResult
from benchmarks.harness.workload import Workload

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
    "| Runner | Workers x threads | Wall | Speed-up | Decode | Tile stage | Tiles' own time | Peak RSS (tree) "
    "| RSS / serial | Peak PSS (tree) | max metric diff |"
)


@dataclass
class Measurement:
    """One contender on one grid.

    Attributes:
        runner: ``serial``, ``processes`` or ``ray``.
        workers: Concurrent tile jobs.
        threads: Torch threads per worker.
        result: Wall time, memory and metrics of the ``train`` process.
        times: Stage and tile seconds the run recorded in its ``manifest.json``: ``decode``, ``tiles`` (every
            tile fitted, workers' start-up and idle rounds included) and each tile's own fit job.
    """

    runner: str
    workers: int
    threads: int
    result: SideResult
    times: RunTimes = field(default_factory=RunTimes)


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
    cli.add_common_options(parser)
    parser.add_argument("--quick", action="store_true", help="synthetic 256 px data and a random backbone")
    parser.add_argument("--grids", default="3x3,4x4", help="comma-separated subset of 3x3,4x4 (default: both)")
    parser.add_argument("--n-train", type=int, default=40, help="training images of the bottle subset")
    parser.add_argument("--n-test", type=int, default=45, help="test images of the bottle subset")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to share (default: all)")
    parser.add_argument(
        "--pss", action="store_true", help="also sample the tree's PSS every 2 s (shared pages counted once; costs CPU)"
    )
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    try:
        args.grid_names = cli.parse_choices(args.grids, list(GRIDS), "--grids")
    except ValueError as error:
        parser.error(str(error))
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
    source = cli.mvtec_category(args.shared, "bottle")
    return build_subset(source, scratch / "data", n_train=args.n_train, n_test=args.n_test).root


def measure(args: argparse.Namespace, data_root: Path, out: Path, console: Console) -> list[Grid]:
    """Run every contender on every grid."""
    env = cli.benchmark_env(args)
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # each contender sets its own threads
        env.pop(threads, None)
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
                model=RANDOM_PADIM if args.quick else PADIM,
                execution=keys,
            )
            console.print(f"{name}: {runner} with {workers} worker(s) ...")
            result = run_ours(workload, out / name / f"{runner}-{workers}", launcher)
            threads = keys.get("threads_per_worker", args.cores)
            times = RunTimes.of(Path(result.run_dir)) if result.run_dir else RunTimes()
            grid.measurements.append(Measurement(runner, workers, threads, result, times))
            console.print(f"  {result.summary()}", markup=False)
        grids.append(grid)
    return grids


def metric_difference(result: SideResult, serial: SideResult) -> float | None:
    """Largest absolute metric difference to serial (None when either lacks a metric)."""
    names = [name for name in REPORTED_METRICS if name in serial.metrics]
    if not result.ok or any(name not in result.metrics for name in names):
        return None
    return max(abs(result.metrics[name] - serial.metrics[name]) for name in names)


def targets(grids: list[Grid]) -> list[dict[str, str]]:
    """The targets: speed-up of 2 workers on 3x3, identical metrics, peak RSS within 2x serial."""
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
    lines = ["# Scaling: serial vs processes vs ray", "", machine_line(machine), f"Data: {data}", ""]
    for grid in grids:
        lines += [f"## {grid.name}", "", *_table(grid), ""]
    lines += ["## Targets", "", "| Contender | Target | Status |", "| --- | --- | --- |"]
    lines += [row(target.values()) for target in targets(grids)]
    return "\n".join(lines) + "\n"


def _table(grid: Grid) -> list[str]:
    serial = grid.serial()
    rows = [TABLE_HEADER, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in grid.measurements:
        result = m.result
        who = [m.runner, f"{m.workers} x {m.threads}"]
        if not result.ok:
            rows.append(row([*who, f"FAILED: {result.error}", *[""] * 8]))
            continue
        base = serial.result if serial else result
        difference = metric_difference(result, base)
        tile_s = sum(m.times.tile_s.values()) if m.times.tile_s else None
        cells = [
            format_seconds(result.wall_s),
            f"{(base.wall_s or 0) / (result.wall_s or 1):.2f}",
            format_seconds(m.times.stages.get("decode"), "n/a"),
            format_seconds(m.times.stages.get("tiles"), "n/a"),
            format_seconds(tile_s, "n/a"),
            format_gib(result.peak_tree_rss),
            f"{(result.peak_tree_rss or 0) / (base.peak_tree_rss or 1):.2f}",
            format_gib(result.peak_tree_pss, "n/a"),
            "n/a" if difference is None else f"{difference:.1e}",
        ]
        rows.append(row([*who, *cells]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the Markdown report and write it with the JSON results.

    Returns:
        0 on success, 1 if a contender failed (or a target is missed with ``--check-targets``), 2 on a
        usage error, 130 when interrupted.
    """
    args = parse_args(argv)
    console = Console(stderr=True)
    out = args.out.resolve() / f"scaling-{cli.stamp()}"
    try:
        with tempfile.TemporaryDirectory(prefix="anomalib-tiled-scaling-") as scratch:
            grids = measure(args, dataset(args, Path(scratch)), out, console)
    except (cli.UsageError, KeyboardInterrupt) as error:
        return cli.report_stop(error, "contender")
    markdown = render(grids, machine_info(), args)
    results = {grid.name: [asdict(m) for m in grid.measurements] for grid in grids}
    markdown_path, json_path = write_results(out, markdown, results)
    sys.stdout.write(markdown)
    console.print(f"Written: {markdown_path} and {json_path}")
    failed = any(not m.result.ok for grid in grids for m in grid.measurements)
    missed = args.check_targets and any(row["status"] == "not met" for row in targets(grids))
    return cli.EXIT_FAILED if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
