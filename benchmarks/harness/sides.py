"""The other sides of a benchmark, each in its own monitored child process of :mod:`benchmarks.children`.

* ``upstream``: anomalib 2.7's ``TrainTiledEnsemble`` then ``EvalTiledEnsemble``
  (:mod:`benchmarks.children.upstream_tiled`);
* ``reference``: one model on whole downscaled images with ``anomalib.engine.Engine``
  (:mod:`benchmarks.children.single_model`).

(Ours is :mod:`benchmarks.harness.ours`.) Every side is verified, not trusted: a non-zero exit, a
missing metrics file or a missing metric makes the side fail with one line saying why. Upstream also
exits 0 after failed stages (it only logs them), so its standard output is searched for its "There
were some errors" lines as well.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from benchmarks.harness.files import write_json, write_yaml
from benchmarks.harness.launch import Launcher, first_exception, process_error
from benchmarks.harness.results import SideResult, finish_metrics
from benchmarks.harness.workload import Workload

UPSTREAM_STAGE_FAILURE = re.compile(r"There were some errors when running (\w+) with")


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
    config = write_yaml(directory / "upstream.yaml", workload.upstream_config(directory / "runs"))
    stamps_file = directory / "upstream-result.json"
    stamps_file.unlink(missing_ok=True)
    cwd = directory / "upstream-cwd"
    command = launcher.child("upstream_tiled.py", "--config", str(config), "--result", str(stamps_file))
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
            f"upstream: stages {', '.join(failed)} failed{first_exception(pipeline_log)} (see {pipeline_log})"
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
        result.error = f"upstream: exited 0 but wrote no {metrics_file}{first_exception(pipeline_log)}"
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
    spec_file = write_json(directory / "reference.json", spec)
    result_file = directory / "reference-result.json"
    result_file.unlink(missing_ok=True)
    command = launcher.child("single_model.py", "--spec", str(spec_file), "--result", str(result_file))
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
