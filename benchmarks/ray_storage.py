"""Ray's two storage modes on the scaling benchmark's grid: ``execution.ray.storage`` shared vs object_store.

Both contenders are the scaling benchmark's ``ray`` with 2 workers x (cores / 2) threads on one grid
(default 3x3: MVTec AD bottle 40 train / 45 test at 512 px, tiles 256, stride 128, Padim on the
offline resnet18), each one monitored ``python -m anomalib_tiled train`` that starts a local Ray,
trains and evaluates. With ``object_store`` every tile's crops go to its task, and its checkpoint,
shared weights files and predictions come back, through Ray's object store, as on a cluster without
shared storage; the driver writes them into the run.

Measured: wall time, peak RSS of the driver (the ``train`` process itself) and of its process tree
(Ray's processes included), the bytes sent to and received from the tile jobs (the run log's
``Ray object store:`` line), and the largest metric difference between the two.

Usage (from the repository root):
    python -m benchmarks.ray_storage               # 3x3 on bottle (needs the shared data), about 4 min on 2 cores
    python -m benchmarks.ray_storage --quick       # synthetic 256 px images, random backbone

Results go to ``benchmarks/out/ray-storage-<date-time>/results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from benchmarks.harness import cli
from benchmarks.harness.datasets import QUICK_DATA, build_subset, make_synthetic
from benchmarks.harness.launch import Launcher
from benchmarks.harness.machine import machine_info, machine_line
from benchmarks.harness.markdown import format_gib, format_seconds, row, write_results
from benchmarks.harness.models import PADIM, RANDOM_PADIM
from benchmarks.harness.ours import run_ours
from benchmarks.harness.results import REPORTED_METRICS, SideResult
from benchmarks.harness.workload import Workload

STORAGES = ("shared", "object_store")
GRIDS = {"3x3": (256, 128), "4x4": (128, 128)}
"""Grid name: (tile size, stride) at 512 px, as in ``benchmarks/scaling.py``; ``--quick`` halves both at 256 px."""
TRAFFIC = re.compile(r"Ray object store: ([\d.]+) MB .* sent to tile jobs, ([\d.]+) MB of their files received")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_storage", description=__doc__.split("\n\n")[0])
    cli.add_common_options(parser)
    parser.add_argument("--quick", action="store_true", help="synthetic 256 px data and a random backbone")
    parser.add_argument("--grid", default="3x3", choices=sorted(GRIDS), help="the grid (default 3x3)")
    parser.add_argument("--n-train", type=int, default=40, help="training images of the bottle subset")
    parser.add_argument("--n-test", type=int, default=45, help="test images of the bottle subset")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to share (default: all)")
    return parser.parse_args(argv)


def dataset(args: argparse.Namespace, scratch: Path) -> Path:
    """Root of the benchmark's data (MVTec layout), built in ``scratch``."""
    if args.quick:
        return make_synthetic(scratch / "synthetic", 256, seed=42, **QUICK_DATA).parent
    source = cli.mvtec_category(args.shared, "bottle")
    return build_subset(source, scratch / "data", n_train=args.n_train, n_test=args.n_test).root


def measure(args: argparse.Namespace, data_root: Path, out: Path, console: Console) -> dict[str, SideResult]:
    """Train and evaluate once per storage mode."""
    env = cli.benchmark_env(args)
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the contenders set their own threads
        env.pop(threads, None)
    launcher = Launcher(env=env, interval=0.1, timeout=args.timeout)
    scale = 2 if args.quick else 1
    tile, stride = (size // scale for size in GRIDS[args.grid])
    threads = max(1, args.cores // 2)
    results = {}
    for storage in STORAGES:
        ray = {"num_cpus_per_tile": threads, "storage": storage}
        workload = Workload(
            data_root=data_root,
            category="texture" if args.quick else "bottle",
            image_size=512 // scale,
            tile_size=tile,
            stride=stride,
            model=RANDOM_PADIM if args.quick else PADIM,
            execution={"runner": "ray", "workers": 2, "threads_per_worker": threads, "ray": ray},
        )
        console.print(f"{args.grid}: ray with 2 workers, storage {storage} ...")
        results[storage] = run_ours(workload, out / storage, launcher)
        console.print(f"  {results[storage].summary()}", markup=False)
    return results


def traffic(result: SideResult) -> tuple[float, float] | None:
    """MB sent to and received from the tile jobs, from the run's log (None with ``shared`` storage)."""
    log = Path(result.run_dir or "") / "run.log"
    found = TRAFFIC.search(log.read_text(encoding="utf-8")) if log.is_file() else None
    return (float(found[1]), float(found[2])) if found else None


def metric_difference(result: SideResult, base: SideResult) -> float | None:
    """Largest absolute metric difference to ``base`` (None when either lacks a metric)."""
    names = [name for name in REPORTED_METRICS if name in base.metrics]
    if not result.ok or any(name not in result.metrics for name in names):
        return None
    return max(abs(result.metrics[name] - base.metrics[name]) for name in names)


def render(results: dict[str, SideResult], machine: dict, args: argparse.Namespace) -> str:
    """The results as one Markdown table."""
    data = "synthetic 256 px (--quick)" if args.quick else f"MVTec AD bottle {args.n_train}/{args.n_test}, 512 px"
    lines = [f"# execution.ray.storage on {args.grid}, ray with 2 workers", "", machine_line(machine), f"Data: {data}"]
    lines += ["", "| Storage | Wall | Driver peak RSS | Tree peak RSS | Sent to jobs | Received | max metric diff |"]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for storage, result in results.items():
        if not result.ok:
            lines.append(row([storage, f"FAILED: {result.error}", *[""] * 5]))
            continue
        moved = traffic(result)
        difference = metric_difference(result, results["shared"])
        cells = [
            format_seconds(result.wall_s),
            format_gib(result.peak_main_rss),
            format_gib(result.peak_tree_rss),
            *(["0 (shared files)"] * 2 if moved is None else [f"{moved[0]:.1f} MB", f"{moved[1]:.1f} MB"]),
            "n/a" if difference is None else f"{difference:.1e}",
        ]
        lines.append(row([storage, *cells]))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run both contenders; print the Markdown report and write it with the JSON results.

    Returns:
        0 on success, 1 if a contender failed, 2 on a usage error, 130 when interrupted.
    """
    args = parse_args(argv)
    console = Console(stderr=True)
    out = args.out.resolve() / f"ray-storage-{cli.stamp()}"
    try:
        with tempfile.TemporaryDirectory(prefix="anomalib-tiled-ray-storage-") as scratch:
            results = measure(args, dataset(args, Path(scratch)), out, console)
    except (cli.UsageError, KeyboardInterrupt) as error:
        return cli.report_stop(error, "contender")
    markdown = render(results, machine_info(), args)
    payload = {storage: result.to_dict() | {"traffic_mb": traffic(result)} for storage, result in results.items()}
    markdown_path, json_path = write_results(out, markdown, payload)
    sys.stdout.write(markdown)
    console.print(f"Written: {markdown_path} and {json_path}")
    return cli.EXIT_FAILED if any(not result.ok for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
