"""What the harness reads back from a run of ours (manifest.json, the ``Run:`` line) and its option parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.harness.cli import whole_numbers
from benchmarks.harness.manifest import RunTimes, latest_metrics_file
from benchmarks.harness.ours import printed_run_dir, session_stages
from benchmarks.harness.procmon import ProcessRun

MANIFEST = {
    "status": "trained",
    "training_seconds": 30.5,
    "training_stages": {"decode": 4.0, "tiles": 24.0, "statistics": 2.0},
    "tiles": {
        "tile_r0_c0": {"checkpoint": {"size": 1, "sha256": "a"}, "seconds": 11.0},
        "tile_r0_c1": {"checkpoint": {"size": 1, "sha256": "b"}, "seconds": 12.5},
    },
    "evaluations": [
        {"dir": "eval/v0", "metrics": {"image_AUROC": 0.5}, "seconds": 9.0},
        {"dir": "eval/v1", "metrics": {"image_AUROC": 0.9}, "seconds": 7.5},
    ],
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "Padim" / "MVTecAD" / "texture" / "v0"
    for version in ("v0", "v1"):
        (root / "eval" / version).mkdir(parents=True)
        (root / "eval" / version / "metrics.json").write_text(json.dumps({"version": version}), encoding="utf-8")
    (root / "manifest.json").write_text(json.dumps(MANIFEST), encoding="utf-8")
    return root


def test_run_times_come_from_the_manifest(run_dir: Path) -> None:
    times = RunTimes.of(run_dir)
    assert times.training_s == 30.5
    assert times.stages == {"decode": 4.0, "tiles": 24.0, "statistics": 2.0}
    assert times.tile_s == {"tile_r0_c0": 11.0, "tile_r0_c1": 12.5}
    assert times.evaluation_s == 7.5  # the latest evaluation
    assert session_stages(times, wall_s=50.0) == {"train": 30.5, "eval": 7.5, "start-up": 12.0}


def test_a_run_without_times_gives_none(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"tiles": {"tile_r0_c0": {"checkpoint": {}}}}), "utf-8")
    times = RunTimes.of(tmp_path)
    assert times == RunTimes()
    assert session_stages(times, wall_s=50.0) == {}
    assert RunTimes.of(tmp_path / "absent") == RunTimes()
    assert latest_metrics_file(tmp_path) is None


def test_latest_metrics_file_is_the_last_recorded_evaluation(run_dir: Path) -> None:
    assert latest_metrics_file(run_dir) == run_dir / "eval" / "v1" / "metrics.json"
    (run_dir / "eval" / "v1" / "metrics.json").unlink()
    assert latest_metrics_file(run_dir) is None


def _process(tmp_path: Path, stdout: str, stderr: str) -> ProcessRun:
    out, err = tmp_path / "p.out", tmp_path / "p.err"
    out.write_text(stdout, encoding="utf-8")
    err.write_text(stderr, encoding="utf-8")
    return ProcessRun(["train"], 0, 0.0, 1.0, 0, 0, 1, out, err, timed_out=False)


def test_run_directory_is_the_last_run_line(run_dir: Path, tmp_path: Path) -> None:
    console = (
        f"INFO: Run: {tmp_path / 'not this'}\nRun: {tmp_path / 'absent'}\nMetrics: image_AUROC 0.9000\n"
        f"Run: {run_dir}\nReport: {run_dir / 'eval' / 'v1' / 'report.html'}\n"
    )
    assert printed_run_dir(_process(tmp_path, "", console)) == run_dir
    assert printed_run_dir(_process(tmp_path, f"Run: {run_dir}\n", "")) == run_dir
    assert printed_run_dir(_process(tmp_path, f"{run_dir}\n", "Run: \n")) is None  # no run line names a folder
    assert printed_run_dir(_process(tmp_path, f"{run_dir}\n", "")) is None


def test_whole_numbers() -> None:
    assert whole_numbers("2, 1,2,4", "--copies") == [2, 1, 4]
    with pytest.raises(ValueError, match=r"--copies: expected comma-separated whole numbers >= 1, got '0,1'"):
        whole_numbers("0,1", "--copies", minimum=1)
    with pytest.raises(ValueError, match="--seeds: expected comma-separated whole numbers, got 'a'"):
        whole_numbers("a", "--seeds")
