"""Shared fixtures: a tiny synthetic dataset and configs that train in seconds on a CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from anomalib_tiled.data.synthetic import CATEGORY, make_dataset

# Tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray started by the tests (ray.init(), ray.cluster_utils.Cluster) stays on the loopback interface: unless
# told it is a one-machine cluster, Ray takes this machine's outward address as its nodes' address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

IMAGE_SIZE = 128
TILE_SIZE = 64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MVTec-layout dataset: 10 normal training images, 4 normal and 8 anomalous test images."""
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, size=IMAGE_SIZE, n_train=10, n_test_good=4, n_test_defect=4, seed=3)
    return root


def base_config(dataset_root: Path, results: Path, **overrides: Any) -> dict[str, Any]:
    """A complete guide-format config for the synthetic dataset; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "seed": 42,
        "accelerator": "cpu",
        "default_root_dir": str(results),
        "tiling": {"tile_size": TILE_SIZE, "stride": TILE_SIZE},
        "normalization_stage": "image",
        "thresholding": {"method": "F1AdaptiveThreshold", "stage": "image"},
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(dataset_root),
                "category": CATEGORY,
                "train_batch_size": 4,
                "eval_batch_size": 4,
                "num_workers": 0,
                "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            },
        },
        "SeamSmoothing": {"apply": True, "sigma": 1.5, "width": 0.1},
        "TrainModels": {
            "model": {
                "class_path": "Padim",
                "init_args": {"backbone": "resnet18", "pre_trained": False, "n_features": 20},
            },
            "metrics": {"image": ["AUROC", "F1Score"], "pixel": ["AUROC", "F1Score"]},
        },
        "visualization": {"save": True, "max_side": 128},
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as YAML and return the path."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run trained (and evaluated) through the CLI, shared by the tests that only read it."""
    from anomalib_tiled.cli import main

    work = tmp_path_factory.mktemp("trained")
    config = write_config(work / "config.yaml", base_config(dataset_root, work / "results"))
    assert main(["train", "--config", str(config)]) == 0
    runs = sorted((work / "results" / "Padim" / "MVTecAD" / CATEGORY).glob("v*"))
    assert len(runs) == 1
    return runs[0]


def interrupt_training(config: Path, results: Path) -> tuple[Path, str]:
    """Run ``python -m anomalib_tiled train`` in a subprocess and send it SIGINT once a tile is recorded.

    Returns:
        The run's ``manifest.json`` and the command's standard error (its exit status was 130).
    """
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "anomalib_tiled", "train", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    manifest_path = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        found = list(results.glob("*/*/*/v0/manifest.json"))
        if found and len(json.loads(found[0].read_text())["tiles"]) >= 1:
            manifest_path = found[0]
            break
        time.sleep(0.2)
    assert manifest_path is not None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    return manifest_path, stderr
