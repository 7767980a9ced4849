"""The accuracy benchmark's tables, resumption and command line (no training)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks import accuracy
from benchmarks.harness.accuracy_report import aggregate, load_cells, mean_std, write_tables
from benchmarks.harness.cli import EXIT_USAGE


def _cell(out: Path, dataset: str, model: str, seed: int, side: str, rows: dict[str, Any]) -> None:
    path = out / "cells" / dataset / model / f"seed{seed}" / f"{side}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = {"dataset": dataset, "model": model, "seed": seed, "side": side, "rows": rows}
    path.write_text(json.dumps(cell), encoding="utf-8")


def _ok(image_auroc: float, aupro: float) -> dict[str, Any]:
    metrics = {"image_AUROC": image_auroc, "pixel_AUROC": 0.9, "pixel_AUPRO": aupro, "pixel_F1Score": 0.5}
    return {"ok": True, "error": None, "metrics": metrics, "wall_s": 1.0}


def _failed(reason: str) -> dict[str, Any]:
    return {"ok": False, "error": reason, "metrics": {}, "wall_s": 1.0}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    for seed, value in enumerate([0.8, 0.9, 1.0]):
        _cell(
            tmp_path,
            "textures",
            "padim",
            seed,
            "ours",
            {"ours max_map": _ok(value, 0.7), "ours mean_tiles": _ok(0.5, 0.6)},
        )
    _cell(tmp_path, "textures", "padim", 0, "upstream", {"upstream": _ok(0.75, 0.65)})
    _cell(tmp_path, "textures", "padim", 1, "upstream", {"upstream": _failed("upstream: exit status 1: boom")})
    _cell(tmp_path, "nonsquare", "padim", 0, "upstream", {"upstream": _failed("upstream: stages X failed")})
    return tmp_path


def test_mean_std_over_seeds(out: Path) -> None:
    tables = aggregate(load_cells(out))
    row = tables["textures"][("padim", "ours max_map")]
    assert row.seeds == [0, 1, 2]
    assert row.values["image_AUROC"] == pytest.approx([0.8, 0.9, 1.0])
    expected = f"{statistics.fmean([0.8, 0.9, 1.0]):.3f} ± {statistics.stdev([0.8, 0.9, 1.0]):.3f}"
    assert mean_std(row.values["image_AUROC"]) == expected == "0.900 ± 0.100"
    assert mean_std([0.5]) == "0.500 ± 0.000"
    assert mean_std([]) == "-"


def test_table_lists_rows_and_failed_cells(out: Path) -> None:
    text = write_tables(out).read_text(encoding="utf-8")
    assert "## textures" in text and "## nonsquare" in text
    assert "| padim | ours max_map | 0.900 ± 0.100 | 0.900 ± 0.000 | 0.700 ± 0.000 | 0.500 ± 0.000 | 3/3 |" in text
    assert "| padim | upstream | 0.750 ± 0.000 | 0.900 ± 0.000 | 0.650 ± 0.000 | 0.500 ± 0.000 | 1/2 |" in text
    assert "- padim / upstream / seed 1: upstream: exit status 1: boom" in text
    assert "| padim | upstream | - | - | - | - | 0/1 |" in text
    assert "- padim / upstream / seed 0: upstream: stages X failed" in text


def test_unreadable_cell_is_listed(out: Path) -> None:
    (out / "cells" / "textures" / "padim" / "seed0" / "single.json").write_text("{", encoding="utf-8")
    assert "## Unreadable cell files" in write_tables(out).read_text(encoding="utf-8")


def test_report_only_rebuilds_the_tables(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert accuracy.main(["--out", str(out), "--report-only"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "accuracy.md")
    assert (out / "accuracy.md").is_file()


def test_report_only_without_cells_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert accuracy.main(["--out", str(tmp_path), "--report-only"]) == EXIT_USAGE
    assert "no cell files" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datasets", "textures,moon"], "--datasets: unknown value(s) ['moon']"),
        (["--models", "resnet"], "--models: unknown value(s) ['resnet']"),
        (["--sides", "theirs"], "--sides: unknown value(s) ['theirs']"),
        (["--seeds", "a,b"], "--seeds: expected comma-separated whole numbers"),
        (["--variants", "topk"], "--variants: unknown value(s) ['topk']"),
        (["--variant", "novalue"], "--variant: expected NAME=VALUE"),
        (["--train-override", "=3"], "--train-override: expected NAME=VALUE"),
        (["--workers", "0"], "--workers: expected a whole number >= 1"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        accuracy.parse_args(argv)
    assert stop.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_variants_and_overrides_are_data() -> None:
    args = accuracy.parse_args(
        [
            "--variant",
            "topk=--merge.image_score topk_map --merge.top_k 0.01",
            "--variants",
            "raw_max,topk",
            "--train-override",
            "TrainModels.calibration_share=0.2",
        ]
    )
    assert args.variant_names == ["raw_max", "topk"]
    assert args.variant_table["topk"] == ["--merge.image_score", "topk_map", "--merge.top_k", "0.01"]
    assert args.overrides == (("TrainModels.calibration_share", 0.2),)
    assert accuracy.ours_tag(args.overrides).startswith("ours-")
    assert accuracy.ours_tag(()) == "ours"


def test_overrides_reach_ours_config(tmp_path: Path) -> None:
    args = accuracy.parse_args(["--train-override", "TrainModels.calibration_share=0.2"])
    matrix = accuracy.Matrix(args, launcher=None)  # type: ignore[arg-type] - nothing is launched
    from benchmarks.harness.accuracy_data import build

    data = build("nonsquare", tmp_path)
    config = matrix.workload(data, "padim", 1).ours_config(tmp_path / "runs")
    assert config["TrainModels"]["calibration_share"] == 0.2
    assert config["TrainModels"]["metrics"]["pixel"] == ["AUROC", "F1Score", "AUPRO"]
    assert config["visualization"]["save"] is False
    assert config["tiling"]["image_size"] == [224, 320]
    assert matrix.workload(data, "padim", 1, single=True).size_hw == [96, 128]
