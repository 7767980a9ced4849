"""GPU check of the runners: the same run on every runner, then the GPU run on a CPU.

On a machine with a CUDA GPU it trains and evaluates one small run (synthetic 256 px images, 3x3
tiles of 128 px, Padim on a random resnet18: nothing to download) with serial, processes and ray,
each with ``tiles_per_device`` 1 and 4 (four tiles sharing the GPU), and checks that every runner
gives serial's metrics. Then it evaluates (tiles predicted again) and predicts with the GPU-trained
run on the CPU. Every tile's log line says which device it trained on. Without a GPU it does the
same on the CPU (1 and 2 workers) so the script itself is exercised.

Usage: ``benchmarks/gpu_check.sh`` (or ``python -m benchmarks.gpu_check [--out DIR]``); it prints
one table and exits 1 if a step failed or a runner's metrics differ from serial's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import cli
from benchmarks.harness.files import write_yaml
from benchmarks.harness.launch import Launcher, process_error
from benchmarks.harness.manifest import latest_metrics_file
from benchmarks.harness.models import RANDOM_PADIM
from benchmarks.harness.ours import ours_command, printed_run_dir
from benchmarks.harness.procmon import ProcessRun

TOLERANCE = 1e-6
"""Largest metric difference to serial that counts as equal."""
TILE_DEVICE = re.compile(r"trained in [\d.]+ s on (.+?) \(\d+ training tiles")
"""Where a tile trained, from its ``run.log`` line: ``cuda:0 (CUDA_VISIBLE_DEVICES=3)``, ``cpu``. (The manifest does
not record devices.)"""


@dataclass
class Step:
    """One command of the check and what it gave."""

    name: str
    accelerator: str
    execution: dict[str, Any]
    seconds: float = 0.0
    ok: bool = False
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        """The name as a file name: ``processes-4-tiles-gpu``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def contenders(gpu: bool) -> list[tuple[str, dict[str, Any]]]:
    """Runner settings to compare: tiles_per_device 1 and 4 on a GPU, 1 and 2 workers on a CPU."""
    if gpu:
        shares = {"1 tile/GPU": {"tiles_per_device": 1}, "4 tiles/GPU": {"tiles_per_device": 4}}
    else:
        shares = {"1 worker": {"workers": 1}, "2 workers": {"workers": 2, "threads_per_worker": 1}}
    found = [("serial", {"runner": "serial"})]
    for runner in ("processes", "ray"):
        found += [(f"{runner}, {label}", {"runner": runner, **share}) for label, share in shares.items()]
    return found


def config(data: Path, results: Path, accelerator: str, execution: dict[str, Any]) -> dict[str, Any]:
    """The run's config."""
    return {
        "seed": 42,
        "accelerator": accelerator,
        "default_root_dir": str(results),
        "tiling": {"image_size": [256, 256], "tile_size": 128, "stride": 64},
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {"root": str(data), "category": "texture", "train_batch_size": 8, "eval_batch_size": 8},
        },
        "TrainModels": {"model": RANDOM_PADIM},
        "visualization": {"save": False},
        "execution": execution,
    }


def run(step: Step, launcher: Launcher, arguments: list[str], work: Path) -> ProcessRun | None:
    """Run ``python -m anomalib_tiled <arguments>`` for one step, timing it; a failure is recorded in ``step``."""
    process = launcher.run(ours_command(launcher, *arguments), work / "logs" / f"{step.slug}-{arguments[0]}", work)
    step.seconds = process.wall_s
    if (error := process_error(process, arguments[0])) is not None:
        step.detail = error
        return None
    step.ok = True
    return process


def train(step: Step, launcher: Launcher, data: Path, work: Path) -> Path | None:
    """Train and evaluate one contender; returns its run directory."""
    path = write_yaml(work / f"{step.slug}.yaml", config(data, work / "results", step.accelerator, step.execution))
    process = run(step, launcher, ["train", "--config", str(path)], work)
    root = printed_run_dir(process) if process is not None else None
    if root is None:
        step.ok, step.detail = False, step.detail or "no 'Run: <run directory>' line in the output of train"
        return None
    step.metrics = _latest_metrics(root)
    step.devices = sorted(set(TILE_DEVICE.findall((root / "run.log").read_text(encoding="utf-8"))))
    return root


def _latest_metrics(root: Path) -> dict[str, float]:
    metrics_file = latest_metrics_file(root)
    return json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file is not None else {}


def on_cpu(root: Path, launcher: Launcher, data: Path, work: Path) -> list[Step]:
    """Evaluate (every tile predicted again) and predict with the trained run on the CPU."""
    shutil.rmtree(root / "predictions")
    cpu = ["--accelerator", "cpu", "--execution.runner", "processes"]
    evaluation = Step("eval of the run on CPU", "cpu", {"runner": "processes"})
    if run(evaluation, launcher, ["eval", "--root", str(root), *cpu], work):
        evaluation.metrics = _latest_metrics(root)
    prediction = Step("predict with the run on CPU", "cpu", {"runner": "processes"})
    images = data / "texture" / "test"
    command = ["predict", "--root", str(root), "--data", str(images), "--output", str(work / "predict"), *cpu]
    if run(prediction, launcher, command, work):
        rows = (work / "predict" / "predictions.csv").read_text(encoding="utf-8").strip().splitlines()
        prediction.detail = f"{len(rows) - 1} images predicted"
    return [evaluation, prediction]


def table(steps: list[Step]) -> str:
    """The results as a Markdown table; metrics are compared with the first (serial) step."""
    reference = steps[0].metrics
    lines = [
        "| Step | Accelerator | Wall | image_AUROC | pixel_AUROC | max diff to serial | Tile devices | Status |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for step in steps:
        diff = max((abs(step.metrics[k] - v) for k, v in reference.items() if k in step.metrics), default=None)
        values = [f"{step.metrics[k]:.6f}" if k in step.metrics else "" for k in ("image_AUROC", "pixel_AUROC")]
        status = "ok" if step.ok else "FAILED"
        lines.append(
            f"| {step.name} | {step.accelerator} | {step.seconds:.1f} s | {' | '.join(values)} "
            f"| {'' if diff is None else f'{diff:.1e}'} | {', '.join(step.devices)} | {status} {step.detail} |"
        )
    return "\n".join(lines) + "\n"


def failed(steps: list[Step], training: int) -> bool:
    """Whether a step failed or a training step's metrics differ from serial's."""
    reference = steps[0].metrics
    differs = any(
        abs(step.metrics.get(name, float("inf")) - value) > TOLERANCE
        for step in steps[:training]
        for name, value in reference.items()
    )
    return differs or not all(step.ok for step in steps)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and print its table.

    Returns:
        0 when every step passed and every runner matched serial, else 1.
    """
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    args = parser.parse_args(argv)
    import torch  # noqa: PLC0415 - only to see whether a GPU is here

    from anomalib_tiled.data.synthetic import make_dataset  # noqa: PLC0415

    gpu = torch.cuda.is_available()
    work = args.out or Path(tempfile.mkdtemp(prefix="anomalib-tiled-gpu-check-"))
    launcher = Launcher(env=cli.offline_env(), interval=0.5, timeout=args.timeout)
    data = work / "data"
    make_dataset(data, size=256, n_train=16, n_test_good=6, n_test_defect=6, seed=3)
    steps = [Step(name, "gpu" if gpu else "cpu", execution) for name, execution in contenders(gpu)]
    roots = []
    for step in steps:
        roots.append(train(step, launcher, data, work))
        print(f"{step.name}: {'ok' if step.ok else 'FAILED ' + step.detail} ({step.seconds:.0f} s)", file=sys.stderr)
    training = len(steps)
    if roots[0] is not None:
        steps += on_cpu(roots[0], launcher, data, work)
    print(f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none (CPU only)'}\n")
    print(table(steps))
    return 1 if failed(steps, training) else 0


if __name__ == "__main__":
    sys.exit(main())
