"""Runners: placement, the shared dispatch loop, and the processes and Ray runners end to end.

Every runner must give the serial runner's metrics for a fixed seed, retry a tile whose worker was
killed, fail the run on a tile that raises, and resume a run interrupted under another runner.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_tiled.cli import main
from anomalib_tiled.data.synthetic import CATEGORY
from anomalib_tiled.errors import ConfigError, DataError, TileJobError
from anomalib_tiled.execution.jobs import TileResult
from anomalib_tiled.execution.runners.placement import (
    Slot,
    child_visible_devices,
    plan_slots,
    ray_task_resources,
    worker_environment,
)
from anomalib_tiled.execution.runners.processes import WORKER_CODE, WorkerPool
from anomalib_tiled.execution.runners.serial import drive
from anomalib_tiled.execution.runners.worker import Outcome, WorkerSetup
from anomalib_tiled.progress import ProgressListener, Task
from anomalib_tiled.settings import ExecutionSettings, RuntimeSettings
from tests.conftest import base_config, interrupt_training, write_config

TILES = 4


# -- placement: worker index -> device and threads (pure) -----------------------------------------


def test_one_worker_per_gpu_by_default() -> None:
    slots = plan_slots(ExecutionSettings(runner="processes"), gpus=4, cores=16)
    assert [slot.device for slot in slots] == [0, 1, 2, 3]
    assert {slot.threads for slot in slots} == {4}


def test_tiles_share_listed_devices_round_robin() -> None:
    execution = ExecutionSettings(runner="processes", devices=[0, 1, 3], tiles_per_device=2)
    slots = plan_slots(execution, gpus=4, cores=12)
    assert [slot.device for slot in slots] == [0, 1, 3, 0, 1, 3]
    assert [slot.index for slot in slots] == list(range(6))
    assert {slot.threads for slot in slots} == {2}


def test_fewer_workers_than_gpus_take_the_first_devices() -> None:
    slots = plan_slots(ExecutionSettings(runner="processes", workers=2), gpus=4, cores=8)
    assert [(slot.device, slot.threads) for slot in slots] == [(0, 4), (1, 4)]


def test_cpu_workers_and_threads_never_exceed_the_cores() -> None:
    assert plan_slots(ExecutionSettings(runner="processes"), gpus=0, cores=2) == [Slot(0, None, 1), Slot(1, None, 1)]
    assert [s.threads for s in plan_slots(ExecutionSettings(workers=2), gpus=0, cores=8)] == [4, 4]
    assert len(plan_slots(ExecutionSettings(threads_per_worker=2), gpus=0, cores=8)) == 4
    assert plan_slots(ExecutionSettings(workers=1, threads_per_worker=2), gpus=0, cores=2) == [Slot(0, None, 2)]


@pytest.mark.parametrize(
    ("execution", "gpus", "cores", "message"),
    [
        (ExecutionSettings(workers=2, threads_per_worker=2), 0, 2, "execution.threads_per_worker: 2 worker(s) x 2"),
        (ExecutionSettings(workers=3), 0, 2, "exceed the 2 CPU cores"),
        (ExecutionSettings(devices=[0, 4]), 2, 8, "execution.devices: [4] not visible"),
        (ExecutionSettings(workers=3, tiles_per_device=1), 2, 8, "execution.workers: 3 workers need 3 device slots"),
    ],
)
def test_placement_refuses_what_the_machine_lacks(
    execution: ExecutionSettings, gpus: int, cores: int, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        plan_slots(execution, gpus=gpus, cores=cores)
    assert message in str(error.value)


def test_worker_environment_pins_one_device_among_the_visible_ones() -> None:
    env = worker_environment(Slot(1, 2, 3), {"CUDA_VISIBLE_DEVICES": "4,5,6", "HOME": "/h"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["HOME"] == "/h"
    assert "CUDA_VISIBLE_DEVICES" not in worker_environment(Slot(0, None, 1), {})
    assert child_visible_devices(None, 3) == child_visible_devices("", 3) == "3"


def test_ray_task_resources() -> None:
    gpu = ray_task_resources(ExecutionSettings(runner="ray", tiles_per_device=4), gpu=True)
    assert (gpu.num_cpus, gpu.num_gpus, gpu.threads, gpu.in_flight) == (1, 0.25, 1, None)
    cpu = ray_task_resources(ExecutionSettings(runner="ray", workers=2, ray={"num_cpus_per_tile": 2}), gpu=False)
    assert (cpu.num_cpus, cpu.num_gpus, cpu.threads, cpu.in_flight) == (2, 0.0, 2, 2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"runner": "rey"}, "execution.runner: unknown value 'rey' (did you mean 'ray'?)"),
        ({"workers": 0}, "execution.workers: must be an integer >= 1 or auto"),
        ({"tiles_per_device": "auto"}, "execution.tiles_per_device: must be an integer >= 1"),
        ({"devices": [1, 1]}, "execution.devices: must be auto or distinct GPU indices"),
        ({"max_retries": -1}, "execution.max_retries: must be >= 0"),
        ({"ray": {"num_gpus_per_tile": 2}}, "execution.ray.num_gpus_per_tile: must be auto or in"),
        ({"ray": {"adress": "auto"}}, "execution.ray.adress: unknown key (did you mean 'address'?)"),
    ],
)
def test_execution_values_are_checked(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        RuntimeSettings(execution=fields)
    assert str(error.value).startswith(message)


def test_runner_ray_without_ray_installed_is_one_line(
    dataset_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like
    config = write_config(tmp_path / "c.yaml", base_config(dataset_root, tmp_path / "results"))
    assert main(["train", "--config", str(config), "--execution.runner", "ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: execution.runner: 'ray' needs Ray, which is not installed; pip install \"anomalib-tiled[ray]\""
    )
    assert not (tmp_path / "results").exists()


# -- the dispatch loop every runner shares ----------------------------------------------------------


@dataclass
class FakeJob:
    name: str
    finished: list[str] = field(default_factory=list)

    def run(self) -> TileResult:
        raise AssertionError("backends decide the outcome")

    def finish(self, result: TileResult) -> None:
        self.finished.append(result.name)

    def pinned(self) -> FakeJob:
        return self


class ScriptedBackend:
    """Runs two jobs at once; each attempt at a job takes the next scripted outcome."""

    capacity = 2

    def __init__(self, script: dict[str, list[Outcome]]) -> None:
        self.script = {name: deque(outcomes) for name, outcomes in script.items()}
        self.running: deque[FakeJob] = deque()
        self.cancelled = False

    def submit(self, job: FakeJob) -> None:
        self.running.append(job)

    def wait(self, timeout: float) -> list[tuple[FakeJob, Outcome]]:
        del timeout
        job = self.running.popleft()
        return [(job, self.script[job.name].popleft())]

    def cancel(self) -> None:
        self.cancelled = True


class StopAfter(ProgressListener):
    def __init__(self, calls: int) -> None:
        self.calls = calls

    def should_stop(self) -> bool:
        self.calls -= 1
        return self.calls < 0


def _ok(name: str) -> Outcome:
    return Outcome(result=TileResult(name, 1.0, {"size": 1, "sha256": "x"}))


def _drive(backend: ScriptedBackend, names: list[str], listener: ProgressListener | None = None) -> list[str]:
    recorded: list[str] = []
    jobs = [FakeJob(name, recorded) for name in names]
    with Task(listener or ProgressListener(), "Training tile models", len(jobs)) as task:
        drive(backend, jobs, task, max_retries=2)
    return recorded


def test_a_lost_job_is_retried_and_recorded_once() -> None:
    lost = Outcome(lost="its worker process died (killed by SIGKILL)")
    backend = ScriptedBackend({"a": [lost, lost, _ok("a")], "b": [_ok("b")]})
    assert sorted(_drive(backend, ["a", "b"])) == ["a", "b"]
    assert not backend.cancelled


def test_a_job_lost_more_often_than_max_retries_fails_the_run() -> None:
    lost = Outcome(lost="its worker process died (killed by SIGKILL)")
    backend = ScriptedBackend({"a": [lost, lost, lost], "b": [_ok("b")]})
    with pytest.raises(TileJobError, match=r"^a failed: its worker process died \(killed by SIGKILL\), 3 time"):
        _drive(backend, ["a", "b"])
    assert backend.cancelled


def test_a_raising_job_fails_the_run_with_its_name_and_cause() -> None:
    backend = ScriptedBackend({"a": [Outcome(error=ValueError("bad\nthing"), traceback="Traceback ...")]})
    with pytest.raises(TileJobError, match=r"^a failed: ValueError: bad thing \(the traceback is in") as error:
        _drive(backend, ["a"])
    assert "Traceback ..." in str(error.value.__cause__.__cause__)
    assert backend.cancelled


def test_errors_that_name_their_input_pass_unchanged() -> None:
    problem = DataError("data: something the user can fix")
    with pytest.raises(DataError, match=r"^data: something the user can fix$"):
        _drive(ScriptedBackend({"a": [Outcome(error=problem)]}), ["a"])


def test_a_stop_request_cancels_running_jobs_and_keeps_finished_ones() -> None:
    backend = ScriptedBackend({name: [_ok(name)] for name in "abcd"})
    recorded: list[str] = []
    jobs = [FakeJob(name, recorded) for name in "abcd"]
    with Task(StopAfter(2), "Training tile models", 4) as task, pytest.raises(KeyboardInterrupt):
        drive(backend, jobs, task, max_retries=2)
    assert recorded == ["a", "b"]
    assert backend.cancelled


def test_a_job_a_worker_cannot_rebuild_fails_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    # A job naming a class that only this process has (a notebook's, a script's __main__).
    module = types.ModuleType("only_in_this_process")
    exec("class Job:\n    name = 'tile_r0_c0'\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with (
        WorkerPool([Slot(0, None, 1)], WorkerSetup.of_this_process()) as pool,
        Task(ProgressListener(), "Predicting tiles", 1) as task,
        pytest.raises(TileJobError, match=r"^tile_r0_c0 failed: ModuleNotFoundError: No module named 'only_in_this"),
    ):
        drive(pool, [module.Job()], task, max_retries=2)
    assert not _workers_alive()


# -- the runners end to end --------------------------------------------------------------------------


class KillOnce(Callback):
    """Kills the process training the first tile that gets here, once (the marker file remembers)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


class FailTile(Callback):
    """Raises while fitting one tile position."""

    def __init__(self, tile: str) -> None:
        self.tile = tile

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        if Path(trainer.default_root_dir).name == self.tile:
            msg = f"boom in {self.tile}"
            raise RuntimeError(msg)


def _config(dataset_root: Path, tmp_path: Path, execution: dict, callbacks: list[dict] | None = None) -> Path:
    cfg = base_config(dataset_root, tmp_path / "results", execution=execution)
    if callbacks:
        cfg["TrainModels"] = {**cfg["TrainModels"], "trainer": {"callbacks": callbacks}}
    return write_config(tmp_path / "c.yaml", cfg)


def _only_run(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "results").glob("*/*/*/v0")
    return run


def _metrics(run: Path, evaluation: str = "v0") -> dict[str, float]:
    return json.loads((run / "eval" / evaluation / "metrics.json").read_text())


def _train_with_a_killed_worker(dataset_root: Path, tmp_path: Path, trained_run: Path, execution: dict) -> Path:
    kill = {"class_path": "tests.e2e.test_runners.KillOnce", "init_args": {"marker": str(tmp_path / "killed")}}
    assert main(["train", "--config", str(_config(dataset_root, tmp_path, execution, [kill]))]) == 0
    assert (tmp_path / "killed").exists()
    run = _only_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == TILES
    assert _metrics(run) == pytest.approx(_metrics(trained_run), abs=1e-6)
    return run


def _fail_a_tile(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, execution: dict) -> None:
    fail = {"class_path": "tests.e2e.test_runners.FailTile", "init_args": {"tile": "tile_r1_c0"}}
    assert main(["train", "--config", str(_config(dataset_root, tmp_path, execution, [fail]))]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: tile_r1_c0 failed: RuntimeError: boom in tile_r1_c0 (the traceback is in the run's run.log)"
    ]
    run = _only_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "tile_r1_c0" not in manifest["tiles"]
    assert "boom in tile_r1_c0" in (run / "run.log").read_text()  # the worker's traceback


def _workers_alive() -> list[psutil.Process]:
    processes = psutil.process_iter(["cmdline"])
    return [process for process in processes if WORKER_CODE in " ".join(process.info["cmdline"] or [])]


@pytest.mark.slow
def test_processes_runner_retries_a_killed_worker_and_matches_serial(
    dataset_root: Path, tmp_path: Path, trained_run: Path
) -> None:
    run = _train_with_a_killed_worker(dataset_root, tmp_path, trained_run, {"runner": "processes", "workers": 2})
    assert "running it again (retry 1 of 2)" in (run / "run.log").read_text()
    assert "trained in" in (run / "run.log").read_text()  # the workers' log records reach the run's log
    assert not _workers_alive()


@pytest.mark.slow
def test_processes_runner_fails_the_run_on_a_raising_tile(
    dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _fail_a_tile(dataset_root, tmp_path, capsys, {"runner": "processes", "workers": 2})
    assert not _workers_alive()


@pytest.mark.slow
def test_eval_predicts_tiles_through_the_processes_runner(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    shutil.rmtree(run / "predictions")  # every tile must be predicted again
    assert main(["eval", "--root", str(run), "--execution.runner", "processes", "--execution.workers", "2"]) == 0
    assert _metrics(run, "v1") == pytest.approx(_metrics(trained_run), abs=1e-6)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_runner_retries_a_killed_worker_and_matches_serial(
    local_ray: None, dataset_root: Path, tmp_path: Path, trained_run: Path
) -> None:
    del local_ray
    _train_with_a_killed_worker(dataset_root, tmp_path, trained_run, {"runner": "ray", "max_retries": 1})


@pytest.mark.slow
def test_ray_runner_fails_the_run_on_a_raising_tile(
    local_ray: None, dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    del local_ray
    _fail_a_tile(dataset_root, tmp_path, capsys, {"runner": "ray"})


@pytest.mark.slow
def test_interrupted_processes_run_resumes_with_ray_and_predicts_with_ray(
    local_ray: None, dataset_root: Path, tmp_path: Path, trained_run: Path
) -> None:
    del local_ray
    pause = {"class_path": "tests.e2e.test_reliability.PauseAfterFit", "init_args": {"seconds": 4.0}}
    config = _config(dataset_root, tmp_path, {"runner": "processes", "workers": 2}, [pause])
    manifest_path, _ = interrupt_training(config, tmp_path / "results")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "interrupted" and 1 <= len(manifest["tiles"]) < TILES
    kept = {tile: entry["checkpoint"]["sha256"] for tile, entry in manifest["tiles"].items()}
    time.sleep(1.0)
    assert not _workers_alive()  # running tiles were cancelled with their workers

    run = manifest_path.parent
    assert main(["train", "--resume", str(run), "--execution.runner", "ray"]) == 0
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == TILES
    assert all(manifest["tiles"][tile]["checkpoint"]["sha256"] == digest for tile, digest in kept.items())
    assert _metrics(run) == pytest.approx(_metrics(trained_run), abs=1e-6)

    images = str(dataset_root / CATEGORY / "test")
    for name, runner in (("serial", "serial"), ("ray", "ray")):
        options = ["--output", str(tmp_path / name), "--execution.runner", runner, "--visualization.save", "false"]
        assert main(["predict", "--root", str(run), "--data", images, *options]) == 0
    assert (tmp_path / "ray" / "predictions.csv").read_text() == (tmp_path / "serial" / "predictions.csv").read_text()
