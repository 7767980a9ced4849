"""Inference benchmark of exported tiled ensembles (issue #11): run-based predict vs torch, ONNX Runtime, OpenVINO.

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
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.datasets import build_subset, make_synthetic
from benchmarks.report import machine_info
from benchmarks.sides import CHILDREN, Launcher, Workload, _write_yaml, process_error

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("torch", "onnx", "openvino")
CONTENDERS = ("run", *FORMATS, "floor")
LATENCY_TARGET = 1.2
THROUGHPUT_TARGET = 3.0
MODELS = {
    "padim": {"class_path": "Padim", "init_args": {"backbone": "resnet18.tv_in1k", "n_features": 100}},
    "patchcore": {
        "class_path": "Patchcore",
        "init_args": {"backbone": "resnet18.tv_in1k", "layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.1},
    },
}
QUICK_MODEL = {"class_path": "Padim", "init_args": {"backbone": "resnet18", "pre_trained": False, "n_features": 50}}


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
    parser.add_argument("--quick", action="store_true", help="synthetic 256 px data, Padim 2x2 only (smoke test)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder with data/ and hf-cache/")
    parser.add_argument("--models", default="padim,patchcore", help="comma-separated: padim, patchcore")
    parser.add_argument("--grids", default="2x2,3x3", help="comma-separated: 2x2 (no overlap), 3x3 (stride tile/2)")
    parser.add_argument("--images", type=int, default=16, help="test images predicted (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "inference", help="results folder")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds after which a child is killed")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.grids, args.images, args.repeats = "padim", "2x2", 4, 2
    return args


def dataset(args: argparse.Namespace, scratch: Path) -> tuple[Path, str, int, int]:
    """Dataset root, category, image size and tile size of the run."""
    if args.quick:
        category = make_synthetic(scratch / "synthetic", 256, 10, 2, 1, 42)
        return category.parent, category.name, 256, 128
    source = args.shared / "data" / "mvtec_ad" / "bottle"
    if not (source / "train").is_dir():
        sys.exit(f"error: {source} not found; pass --shared DIR (with data/mvtec_ad/bottle) or use --quick")
    summary = build_subset(source, scratch / "bottle", n_train=40, n_test=args.images)
    return summary.root, summary.category, 512, 256


def run_child(launcher: Launcher, kind: str, target: Path, images: Path, work: Path, **extra: Any) -> dict[str, Any]:
    """One monitored child of :mod:`benchmarks.children.inference_child`; its numbers and peak RSS."""
    result = work / f"{kind}.json"
    command = [launcher.python, str(CHILDREN / "inference_child.py"), "--kind", kind, "--target", str(target)]
    command += ["--images", str(images), "--result", str(result)]
    command += [item for key, value in extra.items() for item in (f"--{key}", str(value))]
    process = launcher.run(command, work / "logs" / kind, work)
    if (error := process_error(process, kind)) is not None:
        raise RuntimeError(error)
    return {**json.loads(result.read_text(encoding="utf-8")), "peak_rss": process.peak_tree_rss}


def cli(launcher: Launcher, arguments: list[str], work: Path, log: str) -> str:
    """Run ``python -m anomalib_tiled ...``; the last line of its standard output."""
    process = launcher.run([launcher.python, "-m", "anomalib_tiled", *arguments], work / "logs" / log, work)
    if (error := process_error(process, log)) is not None:
        raise RuntimeError(error)
    return process.stdout().strip().splitlines()[-1]


def measure(args: argparse.Namespace, launcher: Launcher, workload: Workload, work: Path, name: str) -> Measured:
    """Train, export and time every contender of one model and grid."""
    measured = Measured(name)
    config = _write_yaml(work / "config.yaml", workload.ours_config(work / "runs"))
    run = Path(cli(launcher, ["train", "--config", str(config), "--evaluate", "false"], work, "train"))
    images = workload.data_root / workload.category / "test"
    common = {"count": args.images, "repeats": args.repeats}
    for export_format in FORMATS:
        artifact = work / "artifacts" / export_format
        cli(
            launcher,
            ["export", "--root", str(run), "--format", export_format, "--output", str(artifact)],
            work,
            export_format,
        )
        measured.sizes[export_format] = sum(f.stat().st_size for f in artifact.iterdir() if f.name != "metadata.json")
    run_child(launcher, "floor_export", work / "floor", images, work, run=run)
    paths = {"run": run, **{f: work / "artifacts" / f for f in FORMATS}, "floor": work / "floor"}
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
    """Run the benchmark; write ``results.json`` and ``results.md`` into ``--out``."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not args.quick:
        env["HF_HOME"] = str((args.shared / "hf-cache").resolve())
    launcher = Launcher(env=env, interval=0.1, timeout=args.timeout)
    root, category, image_size, tile = dataset(args, args.out / "data")
    all_measured = []
    for model in args.models.split(","):
        for grid in args.grids.split(","):
            stride = tile if grid == "2x2" else tile // 2
            spec = QUICK_MODEL if args.quick else MODELS[model]
            workload = Workload(root, category, image_size, tile, stride, spec, batch_size=8, seam_smoothing=True)
            name = f"{model} {grid} ({image_size} px, tiles {tile}, stride {stride})"
            all_measured.append(measure(args, launcher, workload, args.out / f"{model}-{grid}", name))
            print("\n".join(table(all_measured[-1])), flush=True)
    machine = machine_info(REPO)
    report = ["## Results", "", f"Machine: {machine.get('cpu')}, {machine.get('cpus')} CPUs", ""]
    report += [line for measured in all_measured for line in table(measured)]
    (args.out / "results.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    results = {
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [vars(m) for m in all_measured],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
