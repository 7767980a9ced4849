"""The ray runner on a multi-node Ray cluster: tiles spread over nodes, a lost worker node, a lost head,
and worker nodes without the run directory or the data (``execution.ray.storage: object_store``).

Each test starts its own cluster on this machine with ``ray.cluster_utils.Cluster``: a head without
CPUs (so tile tasks run on the worker nodes only, as on a head that only schedules) and two worker
nodes of one CPU each, every Ray process bound to 127.0.0.1. Each node has its own raylet, object
store and worker processes, so killing a node's processes is what losing that machine looks like
to Ray; what the nodes share is the file system, which the ``object_store`` test takes away from the
workers with an audit hook (see :func:`guard_paths`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_tiled.cli import main
from anomalib_tiled.data.synthetic import CATEGORY
from anomalib_tiled.run.directory import file_digest
from tests.conftest import REPO, base_config, write_config

pytestmark = pytest.mark.slow

TILES = 4
WORKER_NODES = 2
LOOPBACK = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
GUARD = "ANOMALIB_TILED_TEST_FORBIDDEN"
"""Folders (os.pathsep-separated) that guarded Ray workers may not touch."""


# -- callbacks and hooks that run in the Ray workers ----------------------------------------------


class MarkStart(Callback):
    """Leaves ``<folder>/<tile>@<node id>.<time>`` when a tile starts fitting, then slows the tile down."""

    def __init__(self, folder: str, seconds: float = 2.0) -> None:
        self.folder = Path(folder)
        self.seconds = seconds

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        import ray

        tile, node = Path(trainer.default_root_dir).name, ray.get_runtime_context().get_node_id()
        (self.folder / f"{tile}@{node}.{time.time_ns()}").touch()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        time.sleep(self.seconds)


def guard_paths() -> None:
    """Ray's ``worker_process_setup_hook``: from now on, touching a path under the folders in ``$GUARD`` raises.

    Every file operation Python audits (``open``, ``os.listdir``/``scandir``, ``os.mkdir``,
    ``os.rename``, ``os.remove``...) raises ``PermissionError`` naming the path: the tile job fails
    loudly, and so does the run.
    """
    # Plain string operations: resolving paths would make file-system calls from inside the hook.
    roots = [os.path.abspath(root) for root in os.environ[GUARD].split(os.pathsep) if root]  # noqa: PTH100

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" and not event.startswith(("os.", "shutil.")):
            return
        for argument in args:
            if isinstance(argument, str | bytes | os.PathLike):
                path = os.path.abspath(os.fsdecode(argument))  # noqa: PTH100
                if any(path == root or path.startswith(root + os.sep) for root in roots):
                    msg = f"test guard: a Ray worker touched {path}"
                    raise PermissionError(msg)

    sys.addaudithook(hook)


# -- the cluster -----------------------------------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A head (no CPUs) and two one-CPU worker nodes on 127.0.0.1; shut down after the test."""
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray resolves 127.0.0.1 to this machine's outward address unless told it is a one-machine cluster
    # (tests/conftest.py tells drivers in subprocesses, through the environment).
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    assert not ray.is_initialized()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **LOOPBACK})
    try:
        for _ in range(WORKER_NODES):
            nodes.add_node(num_cpus=1, **LOOPBACK)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()


def _execution(cluster: Any, **ray: Any) -> dict[str, Any]:
    return {"runner": "ray", "max_retries": 2, "ray": {"address": cluster.address, **ray}}


def _train_config(dataset_root: Path, tmp_path: Path, execution: dict, callbacks: list[dict] | None = None) -> Path:
    config = base_config(dataset_root, tmp_path / "results", execution=execution)
    if callbacks:
        config["TrainModels"] = {**config["TrainModels"], "trainer": {"callbacks": callbacks}}
    return write_config(tmp_path / "c.yaml", config)


def _only_run(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "results").glob("*/*/*/v0")
    return run


def _metrics(run: Path, evaluation: str = "v0") -> dict[str, float]:
    return json.loads((run / "eval" / evaluation / "metrics.json").read_text())


def _trained_on(run: Path) -> dict[str, str]:
    """Tile -> the Ray node (id prefix) its ``trained in`` line in run.log names."""
    lines = [line for line in (run / "run.log").read_text().splitlines() if " trained in " in line]
    return {line.split(": ", 1)[1].split()[0]: line.split(", Ray node ")[1].split()[0] for line in lines}


def _starts(folder: Path) -> list[tuple[str, str, float]]:
    """(tile, node id, wall-clock seconds) of every attempt at a tile, from :class:`MarkStart`'s files."""
    starts = []
    for path in folder.iterdir():
        stem, nanoseconds = path.name.rsplit(".", 1)
        tile, node = stem.split("@")
        starts.append((tile, node, int(nanoseconds) / 1e9))
    return starts


def _verified(run: Path) -> dict[str, Any]:
    """The manifest's tiles, after checking every recorded tile's checkpoint against its digest."""
    manifest = json.loads((run / "manifest.json").read_text())
    for tile, entry in manifest["tiles"].items():
        assert file_digest(run / "weights" / f"{tile}.ckpt") == entry["checkpoint"], f"{tile} recorded unverified"
    return manifest


# -- tests -----------------------------------------------------------------------------------------


def test_workers_without_the_run_directory_train_eval_and_predict_through_the_object_store(
    cluster: Any, dataset_root: Path, tmp_path: Path, trained_run: Path
) -> None:
    """``object_store``: tiles spread over both nodes, whose workers never touch the run directory or the data.

    The guard hook makes any worker's file operation under the results folder or the dataset raise.
    The run trains, evaluates and predicts with serial's metrics and predictions; the same guarded
    workers with ``storage: shared`` fail at once, so the guard is what the first runs got past.
    """
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    runtime_env = {
        "worker_process_setup_hook": f"{__name__}.guard_paths",
        "env_vars": {GUARD: os.pathsep.join([str(tmp_path / "results"), str(dataset_root)]), "TMPDIR": str(worker_tmp)},
    }
    ray_keys = {"storage": "object_store", "runtime_env": runtime_env}
    assert main(["train", "--config", str(_train_config(dataset_root, tmp_path, _execution(cluster, **ray_keys)))]) == 0
    run = _only_run(tmp_path)
    assert len(_verified(run)["tiles"]) == TILES
    assert _metrics(run) == pytest.approx(_metrics(trained_run), abs=1e-6)
    worker_nodes = {node.node_id[:12] for node in cluster.worker_nodes}
    trained_on = _trained_on(run)
    assert len(trained_on) == TILES and set(trained_on.values()) == worker_nodes  # every tile, both nodes
    log = (run / "run.log").read_text()
    assert "Ray object store: " in log and " MB of their files received." in log
    assert not list(worker_tmp.iterdir())  # the jobs' private folders are gone

    ray_options = [
        *("--execution.runner", "ray", "--execution.ray.address", cluster.address),
        *("--execution.ray.storage", "object_store", "--execution.ray.runtime_env", json.dumps(runtime_env)),
    ]
    shutil.rmtree(run / "predictions")  # every tile predicts the test split again, on the workers
    assert main(["eval", "--root", str(run), *ray_options]) == 0
    assert _metrics(run, "v1") == pytest.approx(_metrics(trained_run), abs=1e-6)
    images = str(dataset_root / CATEGORY / "test")
    for name, options in (("serial", ["--execution.runner", "serial"]), ("ray", ray_options)):
        output = ["--output", str(tmp_path / name), "--visualization.save", "false"]
        assert main(["predict", "--root", str(run), "--data", images, *output, *options]) == 0
    assert (tmp_path / "ray" / "predictions.csv").read_text() == (tmp_path / "serial" / "predictions.csv").read_text()

    # The same guarded workers, with the run directory as shared storage: the guard stops the first tile.
    config = _train_config(dataset_root, tmp_path, _execution(cluster, **{**ray_keys, "storage": "shared"}))
    assert main(["train", "--config", str(config)]) == 1
    failed = run.parent / "v1"
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"
    assert "PermissionError: test guard: a Ray worker touched " in (failed / "run.log").read_text()


class NodeKiller(threading.Thread):
    """Kills ``victim`` (SIGKILL, every process of the node) once a tile runs on it; then watches the manifest.

    Records when it killed, when the last tile was recorded, and checks on every change of the
    manifest that each tile recorded has its verified checkpoint.
    """

    def __init__(self, cluster: Any, victim: Any, marks: Path, results: Path) -> None:
        super().__init__(daemon=True)
        self.cluster, self.victim, self.marks, self.results = cluster, victim, marks, results
        self.killed_at: float | None = None
        self.killed_wall: float | None = None
        self.last_tile_at: float | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not any(node == self.victim.node_id for _, node, _ in _starts(self.marks)):
                time.sleep(0.1)
            time.sleep(0.5)  # the tile is fitting now
            self.killed_at, self.killed_wall = time.monotonic(), time.time()
            self.cluster.remove_node(self.victim, allow_graceful=False)
            recorded = 0
            while not self.stop.is_set() and recorded < TILES:
                runs = list(self.results.glob("*/*/*/v0"))
                tiles = len(_verified(runs[0])["tiles"]) if runs else 0
                if tiles > recorded:
                    recorded, self.last_tile_at = tiles, time.monotonic()
                time.sleep(0.1)
        except BaseException as error:  # reported by the test
            self.error = error


@pytest.mark.parametrize("storage", ["shared", "object_store"])
def test_a_worker_node_killed_mid_run_has_its_tiles_rerun_on_the_others(
    cluster: Any, dataset_root: Path, tmp_path: Path, trained_run: Path, storage: str
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    mark = {"class_path": f"{__name__}.MarkStart", "init_args": {"folder": str(marks)}}
    config = _train_config(dataset_root, tmp_path, _execution(cluster, storage=storage), [mark])
    victim = min(cluster.worker_nodes, key=lambda node: node.node_id)
    killer = NodeKiller(cluster, victim, marks, tmp_path / "results")
    killer.start()
    try:
        assert main(["train", "--config", str(config)]) == 0
    finally:
        killer.stop.set()
        killer.join(timeout=30)
    assert killer.error is None, killer.error
    run = _only_run(tmp_path)
    manifest = _verified(run)
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == TILES
    assert _metrics(run) == pytest.approx(_metrics(trained_run), abs=1e-6)
    trained_on, starts = _trained_on(run), _starts(marks)
    survivors = {node.node_id[:12] for node in cluster.worker_nodes}  # the victim is no longer listed
    lost = {tile for tile, node, _ in starts if node == victim.node_id and trained_on[tile] != victim.node_id[:12]}
    assert lost  # the tile fitting on the victim when it died, run again...
    assert all(trained_on[tile] in survivors for tile in lost)  # ...and trained on another node
    assert set(trained_on) == {f"tile_r{row}_c{col}" for row in range(2) for col in range(2)}
    assert killer.killed_at is not None and killer.last_tile_at is not None and killer.killed_wall is not None
    rerun = min(at for tile, node, at in starts if tile in lost and node != victim.node_id) - killer.killed_wall
    print(  # noqa: T201 - the numbers of docs/distributed.md's fault table
        f"\nnode lost ({storage}): lost tile started again {rerun:.1f} s and the last tile was recorded "
        f"{killer.last_tile_at - killer.killed_at:.1f} s after the kill; tiles re-run: {len(lost)}; "
        f"attempts: {len(starts)} for {TILES} tiles"
    )


def test_a_lost_head_fails_the_run_in_one_line_and_resume_finishes_it(
    cluster: Any, dataset_root: Path, tmp_path: Path, trained_run: Path
) -> None:
    pause = {"class_path": "tests.e2e.test_reliability.PauseAfterFit", "init_args": {"seconds": 2.0}}
    # One tile at a time: the tiles after the head is lost are never submitted.
    execution = {**_execution(cluster), "workers": 1}
    config = _train_config(dataset_root, tmp_path, execution, [pause])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "anomalib_tiled", "train", "--config", str(config)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest_path = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None and manifest_path is None:
        found = list((tmp_path / "results").glob("*/*/*/v0/manifest.json"))
        if found and json.loads(found[0].read_text())["tiles"]:
            manifest_path = found[0]
        time.sleep(0.2)
    assert manifest_path is not None, driver.communicate()
    killed_at = time.monotonic()
    cluster.remove_node(cluster.head_node, allow_graceful=False)
    try:
        _, stderr = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail("the driver hung after the head was lost")
    failed_after = time.monotonic() - killed_at
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert driver.returncode == 1, stderr
    assert len(errors) == 1 and errors[0].startswith("error: execution.ray.address: the Ray cluster's head (127.0.0.1:")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "failed" and 1 <= len(manifest["tiles"]) < TILES
    kept = {tile: entry["checkpoint"] for tile, entry in manifest["tiles"].items()}

    run = manifest_path.parent
    assert main(["train", "--resume", str(run), "--execution.runner", "serial"]) == 0
    manifest = _verified(run)
    assert manifest["status"] == "trained" and len(manifest["tiles"]) == TILES
    assert all(manifest["tiles"][tile]["checkpoint"] == digest for tile, digest in kept.items())
    assert _metrics(run) == pytest.approx(_metrics(trained_run), abs=1e-6)
    print(f"\nhead lost: the run failed {failed_after:.1f} s after the kill; {len(kept)} tile(s) kept")  # noqa: T201
