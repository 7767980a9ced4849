"""The grid-scaling benchmark's pure parts: options, model specs, the per-tile fit, phases from the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import grid_scaling
from benchmarks.grid_scaling import GridResult, fitted_per_tile, model_spec, pairs, parse_args, tile_phases
from benchmarks.harness.backbones import link_shared_backbones


def test_quick_is_a_small_smoke_test() -> None:
    args = parse_args(["--quick", "--out", "x"])
    assert (args.size, args.grid_counts, args.backbone_names, args.model_names) == (
        256,
        [4, 16],
        ["resnet18"],
        ["padim"],
    )


def test_unknown_grids_are_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_args(["--grids", "4,9"])
    assert stop.value.code == 2
    assert "--grids" in capsys.readouterr().err


def test_padim_is_not_paired_with_wide_resnet50() -> None:
    args = parse_args(["--models", "patchcore,padim", "--backbones", "wide_resnet50_2,resnet18.tv_in1k"])
    assert pairs(args) == [
        ("wide_resnet50_2", "patchcore"),
        ("resnet18.tv_in1k", "patchcore"),
        ("resnet18.tv_in1k", "padim"),
    ]


def test_model_specs_load_pretrained_weights_except_for_the_random_backbone() -> None:
    assert model_spec("patchcore", "wide_resnet50_2")["init_args"] == {
        "layers": ["layer2", "layer3"],
        "coreset_sampling_ratio": 0.1,
        "backbone": "wide_resnet50_2",
        "pre_trained": True,
    }
    assert model_spec("padim", "resnet18")["init_args"]["pre_trained"] is False


def test_the_per_tile_cost_is_the_slope_over_the_grids() -> None:
    results = [GridResult("b", "m", tiles, 0, {"tile_stage_s": 10.0 + 0.5 * tiles}) for tiles in (4, 16, 64)]
    results.append(GridResult("b", "m", 256, 0, error="out of memory"))
    intercept, slope = fitted_per_tile(results)
    assert (intercept, slope) == pytest.approx((10.0, 0.5))
    assert fitted_per_tile(results[:1]) is None


def test_tile_phases_add_up_over_the_tiles(tmp_path: Path) -> None:
    tiles = {f"tile_{i}": {"seconds": 3.0, "phases": {"setup": 1.0, "fit": 1.5, "save": 0.5}} for i in range(3)}
    (tmp_path / "manifest.json").write_text(json.dumps({"tiles": tiles}))
    assert tile_phases(tmp_path) == {"setup": 3.0, "fit": 4.5, "save": 1.5}


def test_shared_backbones_are_linked_once(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "hub" / "models--timm--resnet18.tv_in1k"
    shared.mkdir(parents=True)
    home = tmp_path / "home"
    for _ in range(2):
        link_shared_backbones(home, tmp_path / "shared")
    assert (home / "hub" / shared.name).resolve() == shared.resolve()


def test_the_figures_read_every_number_a_grid_has() -> None:
    numbers = {
        "train_wall_s": 10.0,
        "overhead_s": 8.0,
        "run_dir_bytes": 2**20,
        "train_peak_rss": 2**21,
        "run": {"latency_s": 1.0},
        "openvino": {"latency_s": 0.5, "peak_rss": 2**20},
        "artifact_bytes": 2**22,
    }
    values = [figure(GridResult("b", "m", 4, 0, numbers)) for figure in grid_scaling.FIGURES.values()]
    assert values == [10.0, 2.0, 1.0, 2.0, 1.0, 0.5, 1.0, 4.0]
