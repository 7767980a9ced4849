"""Grid scaling: how training time, disk, memory and latency grow with the number of tiles.

The package's synthetic data (small defects) at 2048 x 2048 px, cut into grids of 4, 16 and 64 tiles
(tiles 1024, 512, 256; ``--grids`` adds 256 tiles of 128), PatchCore and Padim on two backbones whose
weights are the same in every tile: ``wide_resnet50_2`` from a local Hugging Face cache entry holding
seeded random weights (:mod:`benchmarks.harness.backbones`: the real network's sizes and FLOPs,
nothing downloaded) and the ImageNet ``resnet18.tv_in1k`` of ``../shared``. Per grid, each in its own
monitored process: ``train --evaluate false`` (wall, peak RSS, the run's stage and per-tile phase times
from ``manifest.json``), the run directory's size, an OpenVINO export (its size), and run-based
``predict`` and the artifact at batch 1 and in throughput (latency, peak RSS). The floor: the same
model class's backbone over one whole image at full resolution (the backbone work any model does).
The per-tile cost is fitted: tile-stage seconds = a + b x tiles.

Usage (from the repository root):
    python -m benchmarks.grid_scaling                       # 2048 px, grids 4,16,64, both models and backbones
    python -m benchmarks.grid_scaling --models patchcore --backbones wide_resnet50_2
    python -m benchmarks.grid_scaling --quick               # 256 px, grids 4,16, random resnet18: a smoke test

Results go to ``--out`` (``benchmarks/out/grid-scaling-<date-time>``): ``results.md``, ``results.json``
and ``grid_scaling.png``. Exit status 1 if a measurement failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import cli
from benchmarks.harness.backbones import link_shared_backbones, write_seeded_backbone
from benchmarks.harness.contenders import export_artifact, folder_size, run_child
from benchmarks.harness.datasets import make_synthetic
from benchmarks.harness.launch import Launcher
from benchmarks.harness.machine import machine_info, machine_line
from benchmarks.harness.manifest import RunTimes, read_manifest
from benchmarks.harness.markdown import row, write_results
from benchmarks.harness.ours import run_ours
from benchmarks.harness.workload import Workload

GRID_TILES = {4: 2, 16: 4, 64: 8, 256: 16}
"""Tiles of a grid -> tiles per side (no overlap: tile = image side / tiles per side)."""
BACKBONES = {"wide_resnet50_2": "seeded", "resnet18.tv_in1k": "shared", "resnet18": "random"}
MODELS = {
    "patchcore": {
        "class_path": "Patchcore",
        "init_args": {"layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.1},
    },
    "padim": {"class_path": "Padim", "init_args": {"n_features": 100}},
}
OWN_WORK = ("fit", "predict")
"""Phases of a tile job that are the model's own work; ``setup`` and ``save`` are the fixed per-tile overhead."""


@dataclass
class GridResult:
    """One backbone, model and grid: what was measured, or why it failed."""

    backbone: str
    model: str
    tiles: int
    tile_size: int
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grid_scaling", description=__doc__.split("\n\n")[0])
    cli.add_common_options(parser, f"benchmarks/out/grid-scaling-{cli.stamp()}", timeout=7200.0)
    parser.add_argument("--quick", action="store_true", help="256 px, grids 4,16, random resnet18 (smoke test)")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    parser.add_argument("--grids", default="4,16,64", help="comma-separated tile counts: 4, 16, 64, 256")
    parser.add_argument("--models", default="patchcore,padim", help="comma-separated: patchcore, padim")
    parser.add_argument("--backbones", default="wide_resnet50_2,resnet18.tv_in1k", help="comma-separated")
    parser.add_argument("--train", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--test", type=int, default=4, help="test images, half of them defective (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per latency (default 3)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.grids, args.backbones, args.models, args.train, args.test = (
            256,
            "4,16",
            "resnet18",
            "padim",
            6,
            2,
        )
    try:
        args.grid_counts = [int(n) for n in cli.parse_choices(args.grids, [str(n) for n in GRID_TILES], "--grids")]
        args.model_names = cli.parse_choices(args.models, list(MODELS), "--models")
        args.backbone_names = cli.parse_choices(args.backbones, list(BACKBONES), "--backbones")
    except ValueError as error:
        parser.error(str(error))
    return args


def backbone_cache(args: argparse.Namespace, hf_home: Path) -> Path:
    """``HF_HOME`` holding every backbone asked for: seeded ones written, shared ones linked.

    Raises:
        UsageError: If a shared backbone is asked for and ``--shared`` has no ``hf-cache``.
    """
    for name in args.backbone_names:
        if BACKBONES[name] == "seeded":
            write_seeded_backbone(hf_home, name)
        elif BACKBONES[name] == "shared":
            cache = args.shared / "hf-cache"
            if not cache.is_dir():
                msg = f"offline backbone cache not found: {cache} does not exist; pass --shared DIR or drop {name}"
                raise cli.UsageError(msg)
            link_shared_backbones(hf_home, cache)
    return hf_home


def model_spec(model: str, backbone: str) -> dict[str, Any]:
    """``{class_path, init_args}`` of ``model`` on ``backbone`` (random weights for plain ``resnet18``)."""
    spec = MODELS[model]
    init_args = {**spec["init_args"], "backbone": backbone, "pre_trained": BACKBONES[backbone] != "random"}
    return {"class_path": spec["class_path"], "init_args": init_args}


def tile_phases(run_dir: Path) -> dict[str, float]:
    """Seconds of every tile job's phases, summed over the tiles (``setup``, ``fit``, ``predict``, ``save``)."""
    totals: dict[str, float] = {}
    for entry in (read_manifest(run_dir).get("tiles") or {}).values():
        for phase, seconds in (entry.get("phases") or {}).items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    return totals


def measure_grid(args: argparse.Namespace, launcher: Launcher, workload: Workload, work: Path) -> dict[str, Any]:
    """Train, export and time one grid; its numbers.

    Raises:
        RuntimeError: With one line naming the step that failed.
    """
    trained = run_ours(workload, work, launcher, mode="train")
    if not trained.ok or trained.run_dir is None:
        raise RuntimeError(trained.error or "train failed")
    run = Path(trained.run_dir)
    times, phases = RunTimes.of(run), tile_phases(run)
    images = workload.data_root / workload.category / "test"
    artifact_bytes = export_artifact(launcher, run, "openvino", work)
    common = {"count": args.test, "repeats": args.repeats}
    return {
        "train_wall_s": trained.wall_s,
        "train_peak_rss": trained.peak_tree_rss,
        "tile_stage_s": times.stages.get("tiles"),
        "own_work_s": sum(phases.get(phase, 0.0) for phase in OWN_WORK),
        "overhead_s": sum(seconds for phase, seconds in phases.items() if phase not in OWN_WORK),
        "phases_s": phases,
        "run_dir_bytes": folder_size(run),
        "weights_bytes": folder_size(run / "weights"),
        "artifact_bytes": artifact_bytes,
        "weights": run_child(launcher, "weights", run, images, work),
        "run": run_child(launcher, "run", run, images, work, **common),
        "openvino": run_child(launcher, "openvino", work / "artifacts" / "openvino", images, work, **common),
        "floor": run_child(launcher, "backbone", run, images, work, repeats=args.repeats),
    }


def fitted_per_tile(results: list[GridResult]) -> tuple[float, float] | None:
    """Least-squares ``a + b x tiles`` of the tile-stage seconds: ``(a, b)``, None with fewer than two grids."""
    points = [
        (r.tiles, r.numbers["tile_stage_s"]) for r in results if r.error is None and r.numbers.get("tile_stage_s")
    ]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


TABLE_HEADER = (
    "| Tiles | Tile | Train wall | Tile stage | Own work / tile | Overhead / tile | Run dir | Weights | "
    "Backbone + own | Train peak RSS | Predict peak RSS | OpenVINO peak RSS | Run latency | Run img/s | "
    "OpenVINO latency | OpenVINO img/s | Artifact |"
)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def table_row(result: GridResult) -> str:
    """One grid as a Markdown row."""
    if result.error is not None:
        return row([result.tiles, result.tile_size, f"failed: {result.error}", *[""] * 14])
    n, tiles = result.numbers, result.tiles
    weights = n["weights"]
    ideal = weights["backbone_bytes"] + tiles * weights["own_bytes"]
    return row(
        [
            tiles,
            result.tile_size,
            f"{n['train_wall_s']:.1f} s",
            f"{n['tile_stage_s']:.1f} s",
            f"{n['own_work_s'] / tiles:.2f} s",
            f"{n['overhead_s'] / tiles:.2f} s",
            _mib(n["run_dir_bytes"]),
            _mib(n["weights_bytes"]),
            _mib(ideal),
            _mib(n["train_peak_rss"]),
            _mib(n["run"]["peak_rss"]),
            _mib(n["openvino"]["peak_rss"]),
            f"{n['run']['latency_s']:.2f} s",
            f"{n['run']['throughput_ips']:.2f}",
            f"{n['openvino']['latency_s']:.2f} s",
            f"{n['openvino']['throughput_ips']:.2f}",
            _mib(n["artifact_bytes"]),
        ]
    )


def section(backbone: str, model: str, results: list[GridResult]) -> list[str]:
    """Markdown of one backbone and model: the table, the floor, the fitted per-tile cost."""
    lines = [f"### {model} on {backbone}", "", TABLE_HEADER, "|" + " --- |" * 17]
    lines += [table_row(result) for result in results]
    floors = [r.numbers["floor"] for r in results if r.error is None]
    if floors:
        floor = floors[0]
        line = (
            f"Floor (the backbone over one whole image at full resolution): OpenVINO {floor['latency_s']:.2f} s, "
            f"torch {floor['torch_latency_s']:.2f} s, peak RSS {_mib(floor['peak_rss'])}."
        )
        lines += ["", line]
    if (fit := fitted_per_tile(results)) is not None:
        lines.append(f"Fitted tile-stage time: {fit[0]:.1f} s + {fit[1]:.2f} s x tiles.")
    return [*lines, ""]


FIGURES: dict[str, Any] = {
    "Train wall (s)": lambda r: r.numbers["train_wall_s"],
    "Overhead per tile (s)": lambda r: r.numbers["overhead_s"] / r.tiles,
    "Run directory (MiB)": lambda r: r.numbers["run_dir_bytes"] / 2**20,
    "Train peak RSS (MiB)": lambda r: r.numbers["train_peak_rss"] / 2**20,
    "Run-based latency (s)": lambda r: r.numbers["run"]["latency_s"],
    "OpenVINO latency (s)": lambda r: r.numbers["openvino"]["latency_s"],
    "OpenVINO peak RSS (MiB)": lambda r: r.numbers["openvino"]["peak_rss"] / 2**20,
    "Artifact (MiB)": lambda r: r.numbers["artifact_bytes"] / 2**20,
}
"""The plotted figures: title -> value of one grid's result."""


def plot(results: list[GridResult], path: Path) -> Path:
    """One panel per figure against the tile count, one line per backbone and model."""
    import matplotlib as mpl  # noqa: PLC0415 - plotting only here

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    done = [r for r in results if r.error is None]
    counts = sorted({r.tiles for r in done})
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for axis, (title, value) in zip(axes.flat, FIGURES.items(), strict=True):
        for backbone, model in sorted({(r.backbone, r.model) for r in done}):
            line = [r for r in done if (r.backbone, r.model) == (backbone, model)]
            axis.plot([r.tiles for r in line], [value(r) for r in line], marker="o", label=f"{model}, {backbone}")
        axis.set(title=title, xscale="log", xlabel="tiles")
        axis.set_xticks(counts, labels=[str(count) for count in counts])
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Backbone x model pairs measured: Padim's per-position Gaussians do not fit with wide_resnet50_2.

    Padim keeps a covariance of its feature count squared per feature position: 550 features (the
    wide_resnet50_2 default) at 64 x 64 positions of one 256 px tile are 5 GB, beyond this machine.
    """
    return [
        (backbone, model)
        for backbone in args.backbone_names
        for model in args.model_names
        if not (model == "padim" and backbone.startswith("wide_resnet50"))
    ]


def run_all(args: argparse.Namespace, launcher: Launcher) -> list[GridResult]:
    """Every backbone x model x grid; each result printed as it comes."""
    category = make_synthetic(args.out / "data", args.size, args.train, args.test // 2, args.test - args.test // 2, 42)
    results = []
    for backbone, model in pairs(args):
        for tiles in args.grid_counts:
            tile = args.size // GRID_TILES[tiles]
            spec = model_spec(model, backbone)
            workload = Workload(category.parent, category.name, args.size, tile, tile, spec, batch_size=4)
            result = GridResult(backbone, model, tiles, tile)
            try:
                result.numbers = measure_grid(args, launcher, workload, args.out / f"{backbone}-{model}-{tiles}")
            except RuntimeError as error:
                result.error = str(error)
            results.append(result)
            print(f"{backbone} {model} {tiles} tiles: {table_row(result)}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``results.md``, ``results.json`` and the plot into ``--out``.

    Returns:
        0 when every measurement ran, 1 if one failed, 2 on a usage error, 130 when interrupted.
    """
    args = parse_args(argv)
    try:
        hf_home = backbone_cache(args, args.out / "hf-home")
        launcher = Launcher(env=cli.offline_env(hf_home), interval=0.2, timeout=args.timeout)
        results = run_all(args, launcher)
    except (cli.UsageError, KeyboardInterrupt) as error:
        return cli.report_stop(error, "measurement")
    machine = machine_info()
    lines = ["## Grid scaling", "", f"Machine: {machine_line(machine)}", ""]
    for backbone, model in pairs(args):
        lines += section(backbone, model, [r for r in results if (r.backbone, r.model) == (backbone, model)])
    plot(results, args.out / "grid_scaling.png")
    payload = {
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [asdict(r) for r in results],
    }
    write_results(args.out, "\n".join(lines), payload)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
