"""Benchmark anomalib-tiled against anomalib 2.7's built-in tiled ensemble.

Both sides train and evaluate on the same data, model, seed and tiling, each in its own
subprocess, while the harness samples the memory of the subprocess tree every 0.1 s.

Scenarios:
    1. MVTec AD bottle, 512 px, tiles 256, stride 256 (2x2), Padim on the offline resnet18.
    2. The same with overlapping tiles: stride 128 (3x3).
    3. Memory scaling: scenario 1 with the test split replicated x1, x2, x4 (ours; upstream only
       with ``--scaling-upstream``, since each of its runs takes minutes).
    4. A single Padim on whole images at 256 px with ``anomalib.engine.Engine``: the accuracy
       a model reaches without tiling.

Usage (from the repository root):
    python -m benchmarks.compare_upstream                 # all scenarios, 40 train / 45 test images
    python -m benchmarks.compare_upstream --scenarios 1   # one scenario
    python -m benchmarks.compare_upstream --full          # the full bottle split (209 / 83)
    python -m benchmarks.compare_upstream --quick         # synthetic data, a few minutes

Results go to ``benchmarks/out/<date-time>/results.md`` and ``results.json`` (``benchmarks/out/latest``
points at the newest). The exit status is 1 if any side failed (and, with ``--check-targets``,
if a target is not met), 2 on a usage error such as missing shared data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from rich.console import Console

from benchmarks.harness import cli
from benchmarks.harness.comparison import Scenario, evaluate_targets, geometry
from benchmarks.harness.comparison_report import write_report
from benchmarks.harness.datasets import QUICK_DATA, DatasetSummary, build_subset, make_synthetic
from benchmarks.harness.launch import Launcher
from benchmarks.harness.machine import machine_info
from benchmarks.harness.models import PADIM, RANDOM_PADIM
from benchmarks.harness.ours import run_ours
from benchmarks.harness.results import SideResult
from benchmarks.harness.sides import run_reference, run_upstream
from benchmarks.harness.workload import Workload

ALL_SCENARIOS = ("1", "2", "3", "4")
QUICK_SCENARIOS = ("1", "3", "4")

PSS_INTERVAL = 1.0
"""Seconds between PSS samples with ``--pss``."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_upstream",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_common_options(parser)
    _data_options(parser)
    _run_options(parser)
    args = parser.parse_args(argv)
    try:
        default = QUICK_SCENARIOS if args.quick else ALL_SCENARIOS
        chosen = cli.parse_choices(args.scenarios or ",".join(default), ALL_SCENARIOS, "--scenarios")
        args.scenario_ids = [item for item in ALL_SCENARIOS if item in chosen]
        args.copy_counts = sorted(cli.whole_numbers(args.copies or ("1,2" if args.quick else "1,2,4"), "--copies", 1))
    except ValueError as error:
        parser.error(str(error))
    return args


def _data_options(parser: argparse.ArgumentParser) -> None:
    """Options of what is run: scenarios, data and geometry."""
    parser.add_argument(
        "--quick", action="store_true", help="synthetic data and small images (smoke test, a few minutes)"
    )
    parser.add_argument(
        "--scenarios", default=None, help="comma-separated subset of 1,2,3,4 (default: all; --quick: 1,3,4)"
    )
    parser.add_argument("--category", default="bottle", help="MVTec AD category (default: bottle)")
    parser.add_argument("--full", action="store_true", help="use the full train/test split instead of the 40/45 subset")
    parser.add_argument("--n-train", type=int, default=None, help="training images of the subset (default: 40)")
    parser.add_argument("--n-test", type=int, default=None, help="test images of the subset (default: 45)")
    parser.add_argument("--image-size", type=int, default=None, help="tiled image side (default: 512; --quick: 256)")
    parser.add_argument("--tile-size", type=int, default=None, help="tile side (default: 256; --quick: 128)")
    parser.add_argument(
        "--overlap-stride", type=int, default=None, help="stride of scenario 2 (default: 128; --quick: 64)"
    )
    parser.add_argument(
        "--reference-size", type=int, default=None, help="image side of scenario 4 (default: 256; --quick: 128)"
    )
    parser.add_argument("--copies", default=None, help="test-split copies of scenario 3 (default: 1,2,4; --quick: 1,2)")
    parser.add_argument(
        "--scaling-upstream", action="store_true", help="run upstream in scenario 3 too (minutes per copy)"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of data splits and models (default: 42)")


def _run_options(parser: argparse.ArgumentParser) -> None:
    """Options of how the sides run and are measured."""
    parser.add_argument("--batch-size", type=int, default=32, help="train and eval batch size (default: 32)")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader workers (default: 2)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of both sides (default: cpu)")
    parser.add_argument("--seam-smoothing", action="store_true", help="smooth tile seams on both sides")
    parser.add_argument(
        "--ours-mode",
        choices=("single", "split"),
        default="single",
        help="single: one 'train' (stage times from manifest.json); split: 'train --evaluate false', 'eval --root'",
    )
    parser.add_argument(
        "--upstream-as-is",
        action="store_true",
        help="run upstream without the init_args workaround (it then fails: shows that failures are detected)",
    )
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples (default: 0.1)")
    parser.add_argument(
        "--pss",
        action="store_true",
        help="also sample the process tree's PSS once a second (no double counting; costs CPU, so timings suffer)",
    )
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a target is not met")


class Benchmark:
    """Builds the data, runs the scenarios and collects their results.

    Args:
        args: Parsed command-line options.
        scratch: Temporary folder for the datasets.
        run_root: Folder for configs, logs and run directories.
        console: Where progress is printed.
    """

    def __init__(self, args: argparse.Namespace, scratch: Path, run_root: Path, console: Console) -> None:
        self.args = args
        self.scratch = scratch
        self.run_root = run_root
        self.console = console
        self.geometry = geometry(args)
        # No side may reach a model hub: the real backbone comes from the shared offline cache.
        self.launcher = Launcher(
            env=cli.benchmark_env(args),
            interval=args.interval,
            timeout=args.timeout,
            pss_interval=PSS_INTERVAL if args.pss else None,
        )
        self.model = RANDOM_PADIM if args.quick else PADIM
        self.source = self._source()
        self.datasets: dict[int, DatasetSummary] = {}
        # Identical workloads (scenario 3's x1 is scenario 1) are measured once.
        self.measured: dict[tuple[str, str], SideResult] = {}

    def _source(self) -> Path:
        if self.args.quick:
            return make_synthetic(
                self.scratch / "synthetic", self.geometry.image_size, seed=self.args.seed, **QUICK_DATA
            )
        return cli.mvtec_category(self.args.shared, self.args.category)

    def dataset(self, copies: int) -> DatasetSummary:
        """The benchmark subset with its test split repeated ``copies`` times (built once)."""
        if copies not in self.datasets:
            self.datasets[copies] = build_subset(
                self.source,
                self.scratch / f"data-x{copies}",
                n_train=self.geometry.n_train,
                n_test=self.geometry.n_test,
                test_copies=copies,
            )
        return self.datasets[copies]

    def workload(self, copies: int, stride: int, image_size: int | None = None) -> Workload:
        """The shared workload on the data with ``copies`` test-split copies."""
        data = self.dataset(copies)
        return Workload(
            data_root=data.root,
            category=data.category,
            image_size=image_size or self.geometry.image_size,
            tile_size=self.geometry.tile_size,
            stride=stride,
            model=self.model,
            seed=self.args.seed,
            batch_size=self.args.batch_size,
            num_workers=self.args.num_workers,
            accelerator=self.args.accelerator,
            seam_smoothing=self.args.seam_smoothing,
        )

    def describe(self, data: DatasetSummary) -> str:
        """One line about the data a scenario ran on."""
        what = "synthetic texture" if self.args.quick else f"MVTec AD {data.category}"
        return f"{what}: {data.n_train} train / {data.n_test} test images ({data.n_test_anomalous} anomalous)"

    def side(self, scenario: Scenario, side: str, workload: Workload, runner: Callable[[Path], SideResult]) -> None:
        """Run one side of a scenario (or reuse an identical earlier run) and record it."""
        key = (side, json.dumps(asdict(workload), sort_keys=True, default=str))
        if key in self.measured:
            self.console.print(
                f"[dim]scenario {scenario.id}: {side}: same workload as an earlier run, reusing it[/dim]"
            )
            scenario.results[side] = self.measured[key]
            return
        self.console.print(f"scenario {scenario.id}: running {side} ...")
        result = runner(self.run_root / f"scenario-{scenario.id}" / side)
        self.console.print(f"  {side}: {result.summary()}", markup=False)
        self.measured[key] = result
        scenario.results[side] = result

    def tiled(self, scenario_id: str, stride: int, title: str) -> Scenario:
        """Scenario 1 or 2: ours and upstream on the subset."""
        workload = self.workload(1, stride)
        scenario = Scenario(scenario_id, title, self._details(workload, self.dataset(1)), n_test=self.dataset(1).n_test)
        self.side(scenario, "ours", workload, lambda d: run_ours(workload, d, self.launcher, self.args.ours_mode))
        self.side(
            scenario,
            "upstream",
            workload,
            lambda d: run_upstream(workload, d, self.launcher, pass_init_args=not self.args.upstream_as_is),
        )
        return scenario

    def scaling(self) -> list[Scenario]:
        """Scenario 3: ours (and upstream on request) per test-split copy count."""
        scenarios = []
        for copies in self.args.copy_counts:
            workload = self.workload(copies, self.geometry.tile_size)
            data = self.dataset(copies)
            scenario = Scenario(
                f"3-x{copies}", "memory scaling", self._details(workload, data), copies=copies, n_test=data.n_test
            )
            self.side(
                scenario, "ours", workload, lambda d, w=workload: run_ours(w, d, self.launcher, self.args.ours_mode)
            )
            if self.args.scaling_upstream:
                self.side(
                    scenario,
                    "upstream",
                    workload,
                    lambda d, w=workload: run_upstream(
                        w, d, self.launcher, pass_init_args=not self.args.upstream_as_is
                    ),
                )
            else:
                scenario.skipped["upstream"] = (
                    "not run by default (each upstream run takes minutes and its memory grows with the split); "
                    "pass --scaling-upstream"
                )
            scenarios.append(scenario)
        return scenarios

    def reference(self) -> Scenario:
        """Scenario 4: one model on whole images at the reference size."""
        size = self.geometry.reference_size
        workload = self.workload(1, self.geometry.tile_size, image_size=size)
        data = self.dataset(1)
        model = self.model["class_path"]
        details = f"{self.describe(data)}; one {model} at {size}x{size} px, no tiling (anomalib.engine.Engine)"
        scenario = Scenario("4", f"single model at {size} px (accuracy reference)", details, n_test=data.n_test)
        self.side(scenario, "reference", workload, lambda d: run_reference(workload, d, self.launcher))
        return scenario

    def _details(self, workload: Workload, data: DatasetSummary) -> str:
        smoothing = "on" if workload.seam_smoothing else "off"
        return (
            f"{self.describe(data)}; {workload.image_size} px, tiles {workload.tile_size}, stride {workload.stride} "
            f"({self.geometry.grid(workload.stride)} tiles); seam smoothing {smoothing}"
        )

    def run(self) -> list[Scenario]:
        """Run the selected scenarios in order."""
        scenarios: list[Scenario] = []
        g = self.geometry
        for scenario_id in self.args.scenario_ids:
            if scenario_id == "1":
                scenarios.append(self.tiled("1", g.tile_size, f"{g.grid(g.tile_size)} tiles, no overlap"))
            elif scenario_id == "2":
                scenarios.append(self.tiled("2", g.overlap_stride, f"{g.grid(g.overlap_stride)} overlapping tiles"))
            elif scenario_id == "3":
                scenarios.extend(self.scaling())
            else:
                scenarios.append(self.reference())
        return scenarios

    def settings(self) -> dict[str, Any]:
        """What the report says about how it was run."""
        args = self.args
        if args.quick:
            data = f"synthetic texture ({QUICK_DATA}), {self.geometry.image_size} px source images"
        else:
            amount = (
                "full split"
                if self.geometry.n_train is None and self.geometry.n_test is None
                else (f"subset of {self.geometry.n_train or 'all'} train / {self.geometry.n_test or 'all'} test images")
            )
            data = f"MVTec AD {args.category} from {self.source} ({amount}, files copied into a temporary folder)"
        return {
            "mode": "quick" if args.quick else "full split" if args.full else "subset",
            "data": data,
            "model": json.dumps(self.model),
            "seed": args.seed,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "accelerator": args.accelerator,
            "ours_mode": args.ours_mode,
            "pass_init_args": not args.upstream_as_is,
            "geometry": asdict(self.geometry),
            "scenarios": args.scenario_ids,
            "copies": args.copy_counts,
            "scaling_upstream": args.scaling_upstream,
            "pss": args.pss,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.compare_upstream", *sys.argv[1:]]),
        }


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    del signum, frame
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the Markdown report and write it with the JSON results.

    Returns:
        0 on success, 1 if a side failed (or a target is missed with ``--check-targets``), 2 on a usage
        error, 130 when interrupted.
    """
    args = parse_args(argv)
    console = Console(stderr=True)
    started = cli.stamp()
    run_root = args.out.resolve() / started
    scratch = Path(tempfile.mkdtemp(prefix="anomalib-tiled-bench-"))
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the running child's tree is killed too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        benchmark = Benchmark(args, scratch, run_root, console)
        machine = machine_info()
        scenarios = benchmark.run()
        markdown_path, json_path, markdown = write_report(run_root, machine, benchmark.settings(), scenarios)
    except (cli.UsageError, KeyboardInterrupt) as error:
        return cli.report_stop(error, "side")
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)
    latest = args.out.resolve() / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(started, target_is_directory=True)
    sys.stdout.write(markdown)
    console.print(f"Written: {markdown_path} and {json_path}")
    failed = any(not result.ok for scenario in scenarios for result in scenario.results.values())
    missed = args.check_targets and any(t["status"] == "not met" for t in evaluate_targets(scenarios))
    return cli.EXIT_FAILED if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
