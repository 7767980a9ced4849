"""Our side of a benchmark: ``python -m anomalib_tiled train`` (and ``eval``), monitored, its results verified.

Modes of :func:`run_ours`:

* ``single``: one ``train`` that also evaluates, as a user runs it; its stage times come from the run's
  ``manifest.json`` (:class:`~benchmarks.harness.manifest.RunTimes`);
* ``split``: ``train --evaluate false`` then ``eval --root RUN``, two processes timed from spawn to exit
  (each pays interpreter start-up and imports);
* ``train``: ``train --evaluate false`` only (the accuracy benchmark evaluates the run in variants).

The run directory is the one ``anomalib tiled`` names on its last ``Run: <dir>`` line.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness.files import write_yaml
from benchmarks.harness.launch import Launcher, process_error
from benchmarks.harness.manifest import RunTimes, latest_metrics_file
from benchmarks.harness.procmon import ProcessRun
from benchmarks.harness.results import SideResult, finish_metrics
from benchmarks.harness.workload import Workload

RUN_LINE = "Run: "
"""How ``anomalib tiled`` names the run directory (on its console, at the end of its output)."""


def ours_command(launcher: Launcher, *arguments: str) -> list[str]:
    """Command line of ``python -m anomalib_tiled <arguments>``."""
    return [launcher.python, "-m", "anomalib_tiled", *arguments]


def printed_run_dir(process: ProcessRun) -> Path | None:
    """The existing directory named by the last line starting with ``Run: `` of the process's output."""
    lines = [
        line for text in (process.stdout(), process.stderr()) for line in text.splitlines() if line.startswith(RUN_LINE)
    ]
    named = lines[-1].removeprefix(RUN_LINE).strip() if lines else ""
    return Path(named) if named and Path(named).is_dir() else None


def run_ours(workload: Workload, directory: Path, launcher: Launcher, mode: str = "single") -> SideResult:
    """Train (and evaluate) with ``python -m anomalib_tiled`` and read the ``metrics.json`` it writes.

    Args:
        workload: What to run.
        directory: Folder for its config, logs and run directory.
        launcher: Process settings.
        mode: ``single``, ``split`` or ``train`` (see the module docstring); ``train`` is ok once the
            run directory exists, without metrics.

    Returns:
        The measurements, or the reason it failed.
    """
    result = SideResult("ours")
    config = write_yaml(directory / "ours.yaml", workload.ours_config(directory / "runs"))
    command = ours_command(launcher, "train", "--config", str(config))
    if mode in ("split", "train"):
        command += ["--evaluate", "false"]
    train = launcher.run(command, directory / "logs" / "ours-train", directory)
    result.add_process(train)
    if (error := process_error(train, "ours train")) is not None:
        result.error = error
        return result
    run_dir = printed_run_dir(train)
    if run_dir is None:
        result.error = (
            f"ours train: no '{RUN_LINE}<run directory>' line names an existing folder; see {train.stderr_path}"
        )
        return result
    result.run_dir = str(run_dir)
    if mode == "single":
        result.stages = session_stages(RunTimes.of(run_dir), train.wall_s)
        return _read_metrics(result, run_dir)
    result.stages["train"] = train.wall_s
    if mode == "split":
        return _evaluate(result, run_dir, directory, launcher)
    result.ok = True
    return result


def session_stages(times: RunTimes, wall_s: float) -> dict[str, float]:
    """Stages of one ``train`` process that also evaluated, from the run's times; {} without them.

    ``train`` and ``eval`` are the training session and the evaluation as the manifest records them;
    ``start-up`` is the rest of the process's wall time (interpreter start-up, imports, checks, exit).
    """
    if times.training_s is None or times.evaluation_s is None:
        return {}
    train, evaluation = float(times.training_s), float(times.evaluation_s)
    return {"train": train, "eval": evaluation, "start-up": wall_s - train - evaluation}


def _evaluate(result: SideResult, run_dir: Path, directory: Path, launcher: Launcher) -> SideResult:
    """Evaluate a trained run with ``eval --root RUN`` (its ``eval`` stage: spawn to exit) and read its metrics."""
    evaluation = launcher.run(
        ours_command(launcher, "eval", "--root", str(run_dir)), directory / "logs" / "ours-eval", directory
    )
    result.add_process(evaluation)
    if (error := process_error(evaluation, "ours eval")) is not None:
        result.error = error
        return result
    result.stages["eval"] = evaluation.wall_s
    return _read_metrics(result, run_dir)


def _read_metrics(result: SideResult, run_dir: Path) -> SideResult:
    metrics_file = latest_metrics_file(run_dir)
    if metrics_file is None:
        result.error = f"ours: no metrics.json of an evaluation recorded in {run_dir / 'manifest.json'}"
        return result
    return finish_metrics(result, json.loads(metrics_file.read_text(encoding="utf-8")), f"ours ({metrics_file})")
