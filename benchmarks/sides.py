"""The three contenders of a benchmark scenario, each run in its own monitored subprocess.

* ``ours``: ``python -m anomalib_tiled train --evaluate false`` then ``eval --root RUN`` (``split``
  mode, so training and evaluation are timed apart), or one ``train`` (``single`` mode);
* ``upstream``: anomalib 2.7's ``TrainTiledEnsemble`` then ``EvalTiledEnsemble``
  (:mod:`benchmarks.children.upstream_tiled`);
* ``reference``: one model on whole downscaled images with ``anomalib.engine.Engine``
  (:mod:`benchmarks.children.single_model`).

Every side is verified, not trusted: a non-zero exit, a missing metrics file or a missing metric
makes the side fail with one line saying why. Upstream also exits 0 after failed stages (it only
logs them), so its standard output is searched for its "There were some errors" lines as well.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.procmon import ProcessRun, run_monitored

CHILDREN = Path(__file__).resolve().parent / "children"
REQUIRED_METRICS = ("image_AUROC", "pixel_AUROC")
REPORTED_METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score")
KEPT_METRICS = (*REPORTED_METRICS, "pixel_AUPRO")
"""Metrics a side keeps: the reported four plus AUPRO, which only workloads with ``pixel_aupro`` compute."""
UPSTREAM_STAGE_FAILURE = re.compile(r"There were some errors when running (\w+) with")


@dataclass(frozen=True)
class Workload:
    """What both sides of a scenario train and evaluate: data, geometry, model and seed.

    Attributes:
        data_root: Dataset root in MVTec AD layout.
        category: Category folder below the root.
        image_size: Side images are resized to before tiling, or ``(height, width)``.
        tile_size: Tile side.
        stride: Step between tiles (smaller than ``tile_size``: overlapping tiles).
        model: ``{class_path, init_args}`` of the model.
        seed: Seed of data splits and models.
        batch_size: Train and eval batch size.
        num_workers: Data loader workers.
        accelerator: Lightning accelerator.
        seam_smoothing: Smooth tile seams.
        execution: ``execution`` keys of ours (runner, workers...); None keeps the serial default.
        pixel_aupro: Also compute pixel AUPRO (anomalib's exact metric) on every side.
        ours_overrides: ``(dotted.key, value)`` pairs set in ours' config (e.g. ``TrainModels.calibration_share``).
    """

    data_root: Path
    category: str
    image_size: int | tuple[int, int]
    tile_size: int
    stride: int
    model: dict[str, Any]
    seed: int = 42
    batch_size: int = 32
    num_workers: int = 2
    accelerator: str = "cpu"
    seam_smoothing: bool = False
    execution: dict[str, Any] | None = None
    pixel_aupro: bool = False
    ours_overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def size_hw(self) -> list[int]:
        """``[height, width]`` of the images before tiling."""
        if isinstance(self.image_size, int):
            return [self.image_size, self.image_size]
        return [int(side) for side in self.image_size]

    def data_spec(self) -> dict[str, Any]:
        """``{class_path, init_args}`` of the data module, with the split modes upstream requires spelled out."""
        return {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(self.data_root),
                "category": self.category,
                "train_batch_size": self.batch_size,
                "eval_batch_size": self.batch_size,
                "num_workers": self.num_workers,
                "test_split_mode": "from_dir",
                "val_split_mode": "same_as_test",
            },
        }

    def common_config(self, default_root_dir: Path) -> dict[str, Any]:
        """Keys both config formats share."""
        return {
            "seed": self.seed,
            "accelerator": self.accelerator,
            "default_root_dir": str(default_root_dir),
            "tiling": {
                "image_size": self.size_hw,
                "tile_size": [self.tile_size, self.tile_size],
                "stride": self.stride,
            },
            "normalization_stage": "image",
            "data": self.data_spec(),
            "SeamSmoothing": {"apply": self.seam_smoothing, "sigma": 2, "width": 0.1},
        }

    def ours_config(self, default_root_dir: Path) -> dict[str, Any]:
        """Config of ``anomalib_tiled train``."""
        config = self.common_config(default_root_dir)
        config["thresholding"] = {"method": "F1AdaptiveThreshold", "stage": "image"}
        config["TrainModels"] = {
            "model": self.model,
            "metrics": {"image": ["AUROC", "F1Score"], "pixel": ["AUROC", "F1Score", *(["AUPRO"] * self.pixel_aupro)]},
        }
        config["visualization"] = {"save": True}
        if self.execution is not None:
            config["execution"] = self.execution
        for key, value in self.ours_overrides:
            *parents, name = key.split(".")
            node = config
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
        return config

    def upstream_config(self, default_root_dir: Path) -> dict[str, Any]:
        """Config of upstream's pipelines (its metrics are the model's default evaluator: the same four)."""
        config = self.common_config(default_root_dir)
        config["thresholding_stage"] = "image"
        config["TrainModels"] = {"model": self.model}
        return config


@dataclass
class SideResult:
    """Measurements of one side of a scenario.

    Attributes:
        side: ``ours``, ``upstream`` or ``reference``.
        ok: Whether it ran to the end and produced the required metrics.
        error: One line saying why it failed.
        wall_s: End-to-end wall time of its processes.
        stages: Wall time per observable stage (``train``, ``eval``...).
        peak_tree_rss: Peak RSS of the process tree (bytes), the maximum over its processes.
        peak_main_rss: Peak RSS of the main process alone (bytes).
        peak_tree_pss: Peak PSS of the process tree (bytes), when sampled.
        metrics: Metric values it reported.
        run_dir: Where it wrote its results.
        logs: Standard output/error files of its processes.
    """

    side: str
    ok: bool = False
    error: str | None = None
    wall_s: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    peak_tree_rss: int | None = None
    peak_main_rss: int | None = None
    peak_tree_pss: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str | None = None
    logs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)

    def add_process(self, run: ProcessRun) -> None:
        """Account for one finished process: wall time adds up, memory peaks take the maximum."""
        self.wall_s = (self.wall_s or 0.0) + run.wall_s
        self.peak_tree_rss = max(self.peak_tree_rss or 0, run.peak_tree_rss)
        self.peak_main_rss = max(self.peak_main_rss or 0, run.peak_main_rss)
        if run.peak_tree_pss is not None:
            self.peak_tree_pss = max(self.peak_tree_pss or 0, run.peak_tree_pss)
        self.logs += [str(run.stdout_path), str(run.stderr_path)]


@dataclass(frozen=True)
class Launcher:
    """How sides start their processes.

    Attributes:
        env: Environment of every child process.
        interval: Seconds between memory samples.
        timeout: Seconds after which a process is killed.
        pss_interval: Seconds between PSS samples (None: not sampled).
        python: Interpreter of the child processes.
    """

    env: dict[str, str]
    interval: float
    timeout: float | None
    pss_interval: float | None = None
    python: str = sys.executable

    def run(self, command: list[str], log_prefix: Path, cwd: Path) -> ProcessRun:
        """Run a monitored child process in ``cwd``."""
        cwd.mkdir(parents=True, exist_ok=True)
        return run_monitored(
            command,
            log_prefix,
            cwd=cwd,
            env=self.env,
            interval=self.interval,
            timeout=self.timeout,
            pss_interval=self.pss_interval,
        )


def run_ours(workload: Workload, directory: Path, launcher: Launcher, mode: str = "single") -> SideResult:
    """Train and evaluate with ``python -m anomalib_tiled`` and read ``eval/vN/metrics.json``.

    Args:
        workload: What to run.
        directory: Folder for its config, logs and run directory.
        launcher: Process settings.
        mode: ``single`` (one ``train`` that also evaluates, like upstream's one process; stage times
            from the run's ``run.log``), ``split`` (``train --evaluate false``, then ``eval --root``:
            two processes, each paying start-up and imports) or ``train`` (``train --evaluate false``
            only: ok once the run directory exists, no metrics; evaluate it with :func:`eval_ours`).

    Returns:
        The measurements, or the reason it failed.
    """
    result = SideResult("ours")
    config = _write_yaml(directory / "ours.yaml", workload.ours_config(directory / "runs"))
    train_command = [launcher.python, "-m", "anomalib_tiled", "train", "--config", str(config)]
    if mode in ("split", "train"):
        train_command += ["--evaluate", "false"]
    train = launcher.run(train_command, directory / "logs" / "ours-train", directory)
    result.add_process(train)
    if (error := process_error(train, "ours train")) is not None:
        result.error = error
        return result
    run_dir = Path(train.stdout().strip().splitlines()[-1]) if train.stdout().strip() else None
    if run_dir is None or not run_dir.is_dir():
        result.error = (
            f"ours train: the last line of stdout is not a run directory ({run_dir}); see {train.stdout_path}"
        )
        return result
    result.run_dir = str(run_dir)
    if mode == "single" and (learned := _logged_at(run_dir / "run.log", "Statistics learned on validation")):
        # Training ends when the statistics are learned; evaluation is the rest of the process.
        result.stages["train"] = learned - train.started
        result.stages["eval"] = train.wall_s - result.stages["train"]
    if mode == "train":
        result.stages["train"] = train.wall_s
        result.ok = True
        return result
    if mode == "split":
        result.stages["train"] = train.wall_s
        return eval_ours(result, run_dir, directory, launcher)
    return _read_ours_metrics(result, run_dir)


def eval_ours(
    result: SideResult,
    run_dir: Path,
    directory: Path,
    launcher: Launcher,
    options: Sequence[str] = (),
    log_name: str = "ours-eval",
) -> SideResult:
    """Evaluate a trained run with ``eval --root RUN [options]`` and read the metrics it writes.

    Args:
        result: Where the process and metrics are accounted (its ``eval`` stage is set).
        run_dir: Run directory of ``train``.
        directory: Working directory; logs go to ``logs/<log_name>``.
        launcher: Process settings.
        options: Extra ``eval`` options (setting overrides such as ``--merge.image_score mean_tiles``).
        log_name: Stem of the log files.

    Returns:
        ``result``, with the metrics or the reason it failed.
    """
    command = [launcher.python, "-m", "anomalib_tiled", "eval", "--root", str(run_dir), *options]
    evaluation = launcher.run(command, directory / "logs" / log_name, directory)
    result.add_process(evaluation)
    if (error := process_error(evaluation, "ours eval")) is not None:
        result.error = error
        return result
    result.stages["eval"] = evaluation.wall_s
    return _read_ours_metrics(result, run_dir)


def _read_ours_metrics(result: SideResult, run_dir: Path) -> SideResult:
    # The newest eval/vN is the one just written: evaluations of a run never run concurrently here.
    metrics_file = _latest_eval(run_dir)
    if metrics_file is None:
        result.error = f"ours: no eval/vN/metrics.json in {run_dir}"
        return result
    return finish_metrics(result, json.loads(metrics_file.read_text(encoding="utf-8")), f"ours ({metrics_file})")


def _logged_at(log: Path, message: str) -> float | None:
    """Wall-clock time of the first ``run.log`` record containing ``message`` (``asctime`` format)."""
    records = logged_records(log, message)
    return records[0][0] if records else None


def logged_records(log: Path, message: str) -> list[tuple[float, str]]:
    """Wall-clock time and text of every ``run.log`` record containing ``message``, in order."""
    if not log.is_file():
        return []
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        if message in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007 - local time, as logged
            found.append((stamp.timestamp(), line[24:]))
    return found


def run_upstream(workload: Workload, directory: Path, launcher: Launcher, *, pass_init_args: bool = True) -> SideResult:
    """Train and evaluate with anomalib's tiled-ensemble pipelines and read their ``metric_results.csv``.

    Args:
        workload: What to run.
        directory: Folder for its config, logs, working directory and run directory.
        launcher: Process settings.
        pass_init_args: Apply the ``init_args`` workaround of :mod:`benchmarks.children.upstream_tiled`.

    Returns:
        The measurements, or the reason it failed.
    """
    result = SideResult("upstream")
    config = _write_yaml(directory / "upstream.yaml", workload.upstream_config(directory / "runs"))
    stamps_file = directory / "upstream-result.json"
    stamps_file.unlink(missing_ok=True)
    cwd = directory / "upstream-cwd"
    command = [
        launcher.python,
        str(CHILDREN / "upstream_tiled.py"),
        "--config",
        str(config),
        "--result",
        str(stamps_file),
    ]
    if pass_init_args:
        command.append("--pass-init-args")
    if workload.pixel_aupro:
        command.append("--aupro")
    process = launcher.run(command, directory / "logs" / "upstream", cwd)
    result.add_process(process)
    if (error := process_error(process, "upstream")) is not None:
        result.error = error
        return result
    pipeline_log = cwd / "runs" / "pipeline.log"
    failed = list(dict.fromkeys(UPSTREAM_STAGE_FAILURE.findall(process.stdout())))
    if failed:
        result.error = (
            f"upstream: stages {', '.join(failed)} failed{_first_exception(pipeline_log)} (see {pipeline_log})"
        )
        return result
    stamps = json.loads(stamps_file.read_text(encoding="utf-8"))
    result.run_dir = stamps["root_dir"]
    result.stages = {
        "train": stamps["train_end"] - process.started,
        "eval": process.started + process.wall_s - stamps["train_end"],
    }
    metrics_file = Path(stamps["root_dir"]) / "metric_results.csv"
    if not metrics_file.is_file():
        result.error = f"upstream: exited 0 but wrote no {metrics_file}{_first_exception(pipeline_log)}"
        return result
    with metrics_file.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    values = {name: float(value) for name, value in rows[0].items()} if rows else {}
    return finish_metrics(result, values, f"upstream ({metrics_file})")


def run_reference(workload: Workload, directory: Path, launcher: Launcher) -> SideResult:
    """Fit and test one model on whole images resized to ``workload.image_size`` (no tiling).

    With ``workload.pixel_aupro`` its evaluator also computes pixel AUPRO.

    Returns:
        The measurements, or the reason it failed.
    """
    result = SideResult("reference")
    spec = {
        "model": workload.model,
        "data": workload.data_spec(),
        "image_size": workload.size_hw,
        "seed": workload.seed,
        "aupro": workload.pixel_aupro,
        "accelerator": workload.accelerator,
        "default_root_dir": str(directory / "runs"),
    }
    spec_file = directory / "reference.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    result_file = directory / "reference-result.json"
    result_file.unlink(missing_ok=True)
    command = [
        launcher.python,
        str(CHILDREN / "single_model.py"),
        "--spec",
        str(spec_file),
        "--result",
        str(result_file),
    ]
    process = launcher.run(command, directory / "logs" / "reference", directory)
    result.add_process(process)
    if (error := process_error(process, "reference")) is not None:
        result.error = error
        return result
    if not result_file.is_file():
        result.error = f"reference: exited 0 but wrote no {result_file}; see {process.stderr_path}"
        return result
    outcome = json.loads(result_file.read_text(encoding="utf-8"))
    result.run_dir = str(directory / "runs")
    result.stages = {
        "fit": outcome["fit_end"] - process.started,
        "test": process.started + process.wall_s - outcome["fit_end"],
    }
    return finish_metrics(result, outcome["metrics"], f"reference ({result_file})")


def finish_metrics(result: SideResult, values: dict[str, float], source: str) -> SideResult:
    """Keep the reported metrics; fail when a required one is missing or not a finite number."""
    result.metrics = {name: float(values[name]) for name in KEPT_METRICS if name in values}
    bad = [name for name in REQUIRED_METRICS if not math.isfinite(result.metrics.get(name, math.nan))]
    if bad:
        result.error = f"{source}: missing or non-finite {', '.join(bad)} (got {sorted(values)})"
        return result
    result.ok = True
    return result


def process_error(run: ProcessRun, what: str) -> str | None:
    """One line describing a failed process, or None if it exited 0."""
    if run.timed_out:
        return f"{what}: killed after running past the timeout ({run.wall_s:.0f} s); see {run.stderr_path}"
    if run.returncode == 0:
        return None
    text = run.stderr()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")] + exception_lines(text)
    detail = (errors or lines or ["no output"])[-1]
    return f"{what}: exit status {run.returncode}: {detail} (see {run.stderr_path})"


def exception_lines(text: str) -> list[str]:
    """The ``Type: message`` line closing each Python traceback in ``text``, in order."""
    found = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            found.append(line.strip())
            in_traceback = False
    return found


def _first_exception(log: Path) -> str:
    """``': <first exception line>'`` of a log file (the root cause), or '' if it has none."""
    if not log.is_file():
        return ""
    found = exception_lines(log.read_text(encoding="utf-8", errors="replace"))
    return f": {found[0]}" if found else ""


def _latest_eval(run_dir: Path) -> Path | None:
    """``metrics.json`` of the newest ``eval/vN`` of a run."""
    versions = [(int(m.group(1)), p) for p in (run_dir / "eval").glob("v*") if (m := re.fullmatch(r"v(\d+)", p.name))]
    if not versions:
        return None
    metrics = max(versions)[1] / "metrics.json"
    return metrics if metrics.is_file() else None


def _write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
