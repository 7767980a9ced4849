"""Command behaviour users rely on: runs move between machines, reports, and what the console shows."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from tqdm import tqdm

from anomalib_tiled import TiledEnsembleEngine
from anomalib_tiled.cli import main
from anomalib_tiled.cli.console import ConsoleProgress, command_environment
from anomalib_tiled.data.synthetic import CATEGORY
from anomalib_tiled.settings import TileScaling
from tests.conftest import IMAGE_SIZE, REPO, TILE_SIZE, base_config, write_config


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, symlinks=True)
    return copy


def _latest(folder: Path) -> Path:
    return max(folder.glob("v*"), key=lambda path: int(path.name[1:]))


def _metrics(folder: Path) -> dict[str, float]:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a GPU-trained run on a machine without a GPU")
def test_a_gpu_trained_run_is_evaluated_and_predicted_on_a_cpu(
    run_copy: Path, dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("accelerator: cpu", "accelerator: gpu"))
    # Tile predictions are dropped so that evaluation runs every tile model again, on the CPU.
    shutil.rmtree(run_copy / "predictions")
    assert main(["eval", "--root", str(run_copy)]) == 2
    assert "accelerator: 'gpu' requested but no CUDA GPU is available" in capsys.readouterr().err
    assert main(["eval", "--root", str(run_copy), "--accelerator", "cpu"]) == 0
    assert _metrics(_latest(run_copy / "eval")) == pytest.approx(_metrics(run_copy / "eval" / "v0"), abs=1e-6)
    images = str(dataset_root / CATEGORY / "test" / "blob")
    output = tmp_path / "predicted"
    assert main(["predict", "--root", str(run_copy), "--data", images, "--output", str(output)]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    command = ["predict", "--root", str(run_copy), "--data", images, "--output", str(output), "--accelerator", "cpu"]
    assert main(command) == 0
    assert len((output / "predictions.csv").read_text().splitlines()) == 1 + len(list(Path(images).glob("*.png")))


@pytest.mark.slow
def test_every_evaluation_writes_a_report_that_report_rebuilds(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    evaluation = _latest(run_copy / "eval")  # other tests may have evaluated the shared run again
    page = (evaluation / "report.html").read_text(encoding="utf-8")
    metrics = _metrics(evaluation)
    for name, value in metrics.items():
        assert f'<td>{name}</td><td class="value">{value:.4f}</td>' in page
    galleries = sorted((evaluation / "gallery").glob("*.png"))
    assert galleries and all(f'src="gallery/{picture.name}"' in page for picture in galleries)
    (evaluation / "report.html").unlink()
    assert main(["report", "--root", str(run_copy)]) == 0
    assert (evaluation / "report.html").read_text(encoding="utf-8") == page
    assert f"Report: {evaluation / 'report.html'}" in capsys.readouterr().err
    (run_copy / "eval" / "v0" / "report.html").unlink()
    assert main(["report", "--root", str(run_copy), "--eval", "v0"]) == 0
    assert (run_copy / "eval" / "v0" / "report.html").is_file()
    (evaluation / "report_data.json").unlink()
    assert main(["report", "--root", str(run_copy)]) == 1
    assert "no report_data.json in" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_writes_a_gallery_of_the_top_scored_images(run_copy: Path, dataset_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "predicted"
    images = dataset_root / CATEGORY / "test"
    assert main(["predict", "--root", str(run_copy), "--data", str(images), "--output", str(output)]) == 0
    page = (output / "report.html").read_text(encoding="utf-8")
    assert "Highest-scored images" in page and "false positives" not in page.lower()
    assert '<table id="metrics">' in page
    assert sorted((output / "gallery").glob("top_*.png"))


@pytest.mark.slow
def test_train_console_is_quiet_and_reports_each_tile(dataset_root: Path, tmp_path: Path) -> None:
    """``anomalib tiled train`` on the demo config, output to files: no noise, one line per tile, a summary."""
    anomalib = Path(sys.executable).parent / "anomalib"
    overrides = [
        *("--data.init_args.root", str(dataset_root), "--data.init_args.category", CATEGORY),
        *("--tiling.image_size", f"[{IMAGE_SIZE},{IMAGE_SIZE}]", "--tiling.tile_size", str(TILE_SIZE)),
        *("--tiling.stride", str(TILE_SIZE), "--TrainModels.model.init_args.n_features", "20"),
        *("--default_root_dir", str(tmp_path / "results"), "--data.init_args.num_workers", "0"),
    ]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        status = subprocess.call(
            [str(anomalib), "tiled", "train", "--config", str(REPO / "configs" / "demo.yaml"), *overrides],
            stdout=out,
            stderr=err,
            cwd=tmp_path,
        )
    stderr = (tmp_path / "err").read_text()
    assert status == 0, stderr
    for noise in ("FutureWarning", "OpenVINO is possibly not installed", "This feature is experimental"):
        assert noise not in stderr and noise not in (tmp_path / "out").read_text()
    tile_lines = [line for line in stderr.splitlines() if re.match(r"\[\d/4\] tile_r\d_c\d done in", line)]
    assert len(tile_lines) == 4 and all("ETA" in line for line in tile_lines)
    summary = stderr.strip().splitlines()[-3:]
    assert summary[0].startswith("Metrics: image_AUROC ") and summary[1].startswith("Run: ")
    assert summary[2].startswith("Report: ") and Path(summary[2].removeprefix("Report: ")).is_file()
    # The Report line is the last thing train prints: nothing follows it on stdout.
    assert not (tmp_path / "out").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["serial", "processes"])
def test_train_into_a_file_shows_no_third_party_progress_bars(dataset_root: Path, tmp_path: Path, runner: str) -> None:
    """PatchCore's coreset sampler draws a tqdm bar; in a log file only our one line per tile shows."""
    model = {
        "class_path": "Patchcore",
        "init_args": {"backbone": "resnet18", "pre_trained": False, "coreset_sampling_ratio": 0.1},
    }
    cfg = base_config(dataset_root, tmp_path / "results", visualization={"save": False})
    cfg["TrainModels"] = {**cfg["TrainModels"], "model": model}
    cfg["execution"] = {"runner": runner}
    config = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with (tmp_path / "log").open("w") as log:
        command = [sys.executable, "-m", "anomalib_tiled", "train", "--config", str(config)]
        status = subprocess.call(command, stdout=log, stderr=log, env=env, cwd=tmp_path)
    text = (tmp_path / "log").read_bytes().decode()  # not read_text(): it would turn each "\r" into "\n"
    assert status == 0, text
    bars = [marker for marker in ("Selecting Coreset Indices", "\r", "it/s") if marker in text]
    assert not bars, f"{text.count(chr(13))} progress bar updates ({bars}) in:\n{text}"
    assert len(re.findall(r"^\[\d/4\] tile_r\d_c\d done in", text, re.MULTILINE)) == 4, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("Report: ") and Path(last.removeprefix("Report: ")).is_file(), text


@pytest.mark.parametrize("terminal", [False, True])
def test_third_party_progress_bars_are_off_only_while_a_command_prints_to_a_file(
    terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with command_environment(ConsoleProgress(Console(file=io.StringIO(), force_terminal=terminal))):
        assert tqdm(range(1), file=io.StringIO()).disable is not terminal
        # Worker processes started meanwhile import tqdm with the same default.
        assert (os.environ.get("TQDM_DISABLE") == "1") is not terminal
    assert not tqdm(range(1), file=io.StringIO()).disable
    assert "TQDM_DISABLE" not in os.environ


@pytest.mark.slow
def test_a_run_whose_config_says_merge_calibration_is_read_with_the_new_name(run_copy: Path) -> None:
    """Runs written before ``merge.calibration`` was renamed ``merge.tile_scaling`` keep their scaling."""
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["merge"]["calibration"] = config["merge"].pop("tile_scaling")
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    trained = TiledEnsembleEngine.from_run(run_copy).settings.postprocessing.merge.tile_scaling
    assert trained == TileScaling(config["merge"]["calibration"])
    assert main(["eval", "--root", str(run_copy)]) == 0
    first, again = (
        json.loads((folder / "metrics.json").read_text())
        for folder in (run_copy / "eval" / "v0", _latest(run_copy / "eval"))
    )
    assert again == pytest.approx(first, abs=1e-6)


@pytest.mark.slow
def test_a_run_written_before_tile_scaling_is_still_evaluated_with_raw_tiles(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """Version 0.1 runs hold no images out and their config.yaml lacks the new keys."""
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    del config["TrainModels"]["calibration_share"], config["merge"]["tile_scaling"], config["merge"]["top_k"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = json.loads((run_copy / "manifest.json").read_text())
    del manifest["splits"]["calibration"]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))

    assert main(["eval", "--root", str(run_copy)]) == 0
    assert json.loads((_latest(run_copy / "eval") / "stats.json").read_text())["normal"] is None
    assert TiledEnsembleEngine.from_run(run_copy).settings.training.calibration_share == 0
    assert main(["eval", "--root", str(run_copy), "--merge.tile_scaling", "normal_quantile"]) == 2
    assert "but the run holds none out" in capsys.readouterr().err
