"""Inference benchmark of exported tiled ensembles: run-based predict vs torch, ONNX Runtime, OpenVINO.

For each model and grid it trains one run (``python -m anomalib_tiled train --evaluate false``),
exports it to every format (``python -m anomalib_tiled export``) and anomalib's own OpenVINO
export of one tile model (the *floor*), then measures each contender in its own monitored child
process (:mod:`benchmarks.children.inference_child`): per-image latency at batch 1, throughput at
batch 8, and the peak RSS of the process tree. Results go to ``--out`` as JSON and Markdown.

Default: MVTec AD bottle (40 train / 16 test images from ``../shared``), 512 px, tiles 256,
2x2 (stride 256) and 3x3 (stride 128), seam smoothing on, Padim (``resnet18.tv_in1k``, 100
features, offline) and PatchCore. ``--quick``: synthetic 256 px images, Padim with random
weights, 2x2 only — a smoke test of the harness, not a measurement.

Targets: exported OpenVINO latency at most 1.2x the floor; its throughput at least 3x run-based
predict's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import cli
from benchmarks.harness.contenders import export_artifact, run_child
from benchmarks.harness.datasets import build_subset, make_synthetic
from benchmarks.harness.launch import Launcher
from benchmarks.harness.machine import machine_info, machine_line
from benchmarks.harness.markdown import write_results
from benchmarks.harness.models import PADIM, PATCHCORE, RANDOM_PADIM
from benchmarks.harness.ours import run_ours
from benchmarks.harness.workload import Workload

FORMATS = ("torch", "onnx", "openvino")
CONTENDERS = ("run", *FORMATS, "floor")
LATENCY_TARGET = 1.2
THROUGHPUT_TARGET = 3.0
MODELS = {"padim": PADIM, "patchcore": PATCHCORE}
GRIDS = ("2x2", "3x3")


@dataclass
class Measured:
    """One model and grid: artifact sizes and every contender's numbers (or why it failed)."""

    name: str
    sizes: dict[str, int] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    cli.add_common_options(parser, "benchmarks/out/inference")
    parser.add_argument("--quick", action="store_true", help="synthetic 256 px data, Padim 2x2 only (smoke test)")
    parser.add_argument("--models", default="padim,patchcore", help="comma-separated: padim, patchcore")
    parser.add_argument("--grids", default="2x2,3x3", help="comma-separated: 2x2 (no overlap), 3x3 (stride tile/2)")
    parser.add_argument("--images", type=int, default=16, help="test images predicted (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.grids, args.images, args.repeats = "padim", "2x2", 4, 2
    try:
        args.model_names = cli.parse_choices(args.models, list(MODELS), "--models")
        args.grid_names = cli.parse_choices(args.grids, GRIDS, "--grids")
    except ValueError as error:
        parser.error(str(error))
    return args


def dataset(args: argparse.Namespace, scratch: Path) -> tuple[Path, str, int, int]:
    """Dataset root, category, image size and tile size of the run."""
    if args.quick:
        category = make_synthetic(scratch / "synthetic", 256, 10, 2, 1, 42)
        return category.parent, category.name, 256, 128
    source = cli.mvtec_category(args.shared, "bottle")
    summary = build_subset(source, scratch / "bottle", n_train=40, n_test=args.images)
    return summary.root, summary.category, 512, 256


def measure(args: argparse.Namespace, launcher: Launcher, workload: Workload, work: Path, name: str) -> Measured:
    """Train, export and time every contender of one model and grid."""
    measured = Measured(name)
    trained = run_ours(workload, work, launcher, mode="train")
    if not trained.ok:
        raise RuntimeError(trained.error)
    run = Path(trained.run_dir)
    images = workload.data_root / workload.category / "test"
    measured.sizes = {export_format: export_artifact(launcher, run, export_format, work) for export_format in FORMATS}
    run_child(launcher, "floor_export", work / "floor", images, work, run=run)
    paths = {"run": run, **{f: work / "artifacts" / f for f in FORMATS}, "floor": work / "floor"}
    common = {"count": args.images, "repeats": args.repeats}
    for kind in CONTENDERS:
        try:
            measured.results[kind] = run_child(launcher, kind, paths[kind], images, work, **common)
        except RuntimeError as error:  # noqa: PERF203 - a failed contender must not stop the others
            measured.errors[kind] = str(error)
    return measured


def table(measured: Measured) -> list[str]:
    """Markdown table of one model and grid, with the targets."""
    lines = [
        f"### {measured.name}",
        "",
        "| contender | latency (batch 1) | throughput (batch 8) | peak RSS | artifact |",
    ]
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for kind in CONTENDERS:
        if kind in measured.errors:
            lines.append(f"| {kind} | failed: {measured.errors[kind]} | | | |")
            continue
        numbers = measured.results.get(kind, {})
        size = measured.sizes.get(kind)
        lines.append(
            f"| {kind} | {numbers.get('latency_s', float('nan')) * 1000:.0f} ms | "
            f"{numbers.get('throughput_ips', float('nan')):.2f} img/s | {numbers.get('peak_rss', 0) / 2**30:.2f} GiB | "
            f"{'' if size is None else f'{size / 2**20:.0f} MiB'} |"
        )
    lines += ["", *targets(measured), ""]
    return lines


def targets(measured: Measured) -> list[str]:
    """Whether the OpenVINO artifact meets the latency and throughput targets."""
    openvino, floor, run = (measured.results.get(kind) for kind in ("openvino", "floor", "run"))
    if not (openvino and floor and run):
        return ["Targets: not evaluated (a contender failed)."]
    latency = openvino["latency_s"] / floor["latency_s"]
    throughput = openvino["throughput_ips"] / run["throughput_ips"]
    verdict = {True: "met", False: "NOT met"}
    return [
        f"- OpenVINO latency / floor: {latency:.2f} (target <= {LATENCY_TARGET}: {verdict[latency <= LATENCY_TARGET]})",
        (
            f"- OpenVINO throughput / run-based: {throughput:.1f}x "
            f"(target >= {THROUGHPUT_TARGET}x: {verdict[throughput >= THROUGHPUT_TARGET]})"
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``results.json`` and ``results.md`` into ``--out``.

    Returns:
        0 when it ran, 2 on a usage error (missing shared data), 130 when interrupted.
    """
    args = parse_args(argv)
    launcher = Launcher(env=cli.benchmark_env(args), interval=0.1, timeout=args.timeout)
    all_measured = []
    try:
        root, category, image_size, tile = dataset(args, args.out / "data")
        for model in args.model_names:
            for grid in args.grid_names:
                stride = tile if grid == "2x2" else tile // 2
                spec = RANDOM_PADIM if args.quick else MODELS[model]
                workload = Workload(root, category, image_size, tile, stride, spec, batch_size=8, seam_smoothing=True)
                name = f"{model} {grid} ({image_size} px, tiles {tile}, stride {stride})"
                all_measured.append(measure(args, launcher, workload, args.out / f"{model}-{grid}", name))
                print("\n".join(table(all_measured[-1])), flush=True)
    except (cli.UsageError, KeyboardInterrupt) as error:
        return cli.report_stop(error, "contender")
    machine = machine_info()
    report = ["## Results", "", f"Machine: {machine_line(machine)}", ""]
    report += [line for measured in all_measured for line in table(measured)]
    results = {"machine": machine, "args": vars(args), "runs": [vars(m) for m in all_measured]}
    write_results(args.out, "\n".join(report) + "\n", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
