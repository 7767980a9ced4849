"""Shared feature extractors: grouping by content, the batched unit against each model's own forward, the jobs.

Tile models are built directly (``pre_trained: false``, tiny tiles); "pretrained" ones are made by
copying one model's extractor state into the others, as a pretrained backbone gives every tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.models import Padim, Patchcore
from torch import nn

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.tiles import GroupTileDataset, TileDataset
from anomalib_tiled.execution.batched import PredictGroupJob
from anomalib_tiled.execution.jobs import PredictTileJob, TileContext
from anomalib_tiled.execution.models import ModelFactory
from anomalib_tiled.execution.planner import TilePlanner
from anomalib_tiled.execution.shared import (
    SharedExtractorTiles,
    extractor_digest,
    group_by_extractor,
    share_extractor,
)
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.tiling import TileGrid
from tests.fakes import make_record

TILE = 32
TOLERANCE = 1e-5


def tile_model(model_class: type, seed: int, **overrides: Any) -> Any:
    """A fitted, random-init tile model as ``ModelFactory`` makes them (no post-processing), in eval mode."""
    torch.manual_seed(seed)
    arguments = {"backbone": "resnet18", "pre_trained": False, "post_processor": False, "evaluator": False}
    arguments |= {"visualizer": False, "pre_processor": model_class.configure_pre_processor(image_size=(TILE, TILE))}
    arguments |= {"n_features": 20} if model_class is Padim else {"num_neighbors": 3}
    model = model_class(**(arguments | overrides))
    model.model.train()
    with torch.no_grad():
        model.model(model.pre_processor(torch.rand(4, 3, TILE, TILE)))
    if model_class is Padim:
        model.model.fit()
    else:
        model.model.subsample_embedding(0.5)
    return model.eval()


def with_one_extractor(models: list[Any]) -> list[Any]:
    """The models with the first one's extractor weights, as a pretrained backbone gives every tile."""
    state = models[0].model.feature_extractor.state_dict()
    for model in models[1:]:
        model.model.feature_extractor.load_state_dict(state)
    return models


def layout(models: list[Any]) -> list[tuple[tuple[int, ...], bool]]:
    return [(group.indices, group.shared) for group in group_by_extractor(models)]


def test_identical_extractors_group_and_per_tile_random_ones_do_not() -> None:
    models = [tile_model(Padim, seed) for seed in range(4)]
    assert layout(models) == [((0,), False), ((1,), False), ((2,), False), ((3,), False)]
    assert all(group.digest is not None for group in group_by_extractor(models))
    models[0].model.feature_extractor.load_state_dict(models[2].model.feature_extractor.state_dict())
    assert layout(models) == [((0, 2), True), ((1,), False), ((3,), False)]
    assert layout(with_one_extractor(models)) == [((0, 1, 2, 3), True)]


def test_any_difference_of_content_or_configuration_splits_a_group() -> None:
    models = with_one_extractor([tile_model(Padim, seed) for seed in range(3)])
    bn = models[1].model.feature_extractor.feature_extractor.bn1
    bn.running_mean[0] += 1e-6
    assert layout(models) == [((0, 2), True), ((1,), False)]
    models[1].model.feature_extractor.load_state_dict(models[0].model.feature_extractor.state_dict())
    models[2].model.feature_extractor.layers = ["layer1", "layer2"]
    assert layout(models) == [((0, 1), True), ((2,), False)]


def test_models_that_cannot_run_as_a_head_stay_alone() -> None:
    models = with_one_extractor([tile_model(Padim, seed) for seed in range(4)])
    models[1].pre_processor = nn.Identity()  # not anomalib's PreProcessor: its effect cannot be replayed
    models[2].post_processor = nn.Identity()  # post-processing of its own after forward
    assert extractor_digest(models[1]) is None and extractor_digest(models[2]) is None
    assert layout(models) == [((0, 3), True), ((1,), False), ((2,), False)]


@pytest.mark.parametrize("model_class", [Padim, Patchcore])
def test_a_shared_group_predicts_what_each_tile_model_predicts_and_holds_one_extractor(model_class: type) -> None:
    models = with_one_extractor([tile_model(model_class, seed) for seed in range(3)])
    generator = torch.Generator().manual_seed(0)
    tiles = [torch.rand(2, 3, TILE, TILE, generator=generator) for _ in models]
    with torch.inference_mode():
        expected = [model(batch) for model, batch in zip(models, tiles, strict=True)]
    extractor_tensors = len(models[0].model.feature_extractor.state_dict())
    unit = SharedExtractorTiles(models).eval()
    with torch.inference_mode():
        got = unit(tiles)
    for want, have in zip(expected, got, strict=True):
        assert (want.anomaly_map - have.anomaly_map).abs().max() <= TOLERANCE
        assert (want.pred_score - have.pred_score).abs().max() <= TOLERANCE
    assert sum("feature_extractor" in name for name in unit.state_dict()) == extractor_tensors


def test_models_loaded_one_after_another_keep_one_copy_of_an_identical_extractor() -> None:
    models = with_one_extractor([tile_model(Padim, seed) for seed in range(3)])
    models.append(tile_model(Padim, 7))
    extractors: dict[str, nn.Module] = {}
    for model in models:
        share_extractor(model, extractors)
    held = [model.model.feature_extractor for model in models]
    assert held[0] is held[1] is held[2] and held[3] is not held[0] and len(extractors) == 2
    assert layout(models) == [((0, 1, 2), True), ((3,), False)]


def test_a_group_dataset_cuts_the_tiles_each_tile_dataset_cuts(tmp_path: Path) -> None:
    grid = TileGrid((48, 40), (TILE, TILE), (16, 8))
    record = make_record(tmp_path / "split", [0, 1, 0])
    pixels = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    images = NpyFile.create(tmp_path / "images.npy", pixels.shape, np.uint8)
    images.write(0, pixels)
    positions = list(grid)[1:]
    group = GroupTileDataset(images, record, positions)
    for index in range(len(record)):
        tiles = group[index]["tiles"]
        assert tiles.shape == (len(positions), 3, TILE, TILE)
        for j, position in enumerate(positions):
            assert torch.equal(tiles[j], TileDataset(images, record, position)[index].image)


class Runner:
    """A runner that runs nothing and says how many jobs it runs at once."""

    def __init__(self, parallelism: int | None) -> None:
        self.parallelism = parallelism


@pytest.mark.parametrize(
    ("model", "parallelism", "expected"),
    [
        ({"class_path": "Padim", "init_args": {"backbone": "resnet18"}}, 1, [("PredictGroupJob", 6)]),
        ({"class_path": "Patchcore"}, 2, [("PredictGroupJob", 3), ("PredictGroupJob", 3)]),
        ({"class_path": "Padim"}, 4, [("PredictTileJob", 1), ("PredictGroupJob", 2)] * 2),
        ({"class_path": "Padim"}, None, [("PredictTileJob", 1)] * 6),
        ({"class_path": "Padim", "init_args": {"pre_trained": False}}, 1, [("PredictTileJob", 1)] * 6),
        ({"class_path": "Fastflow"}, 1, [("PredictTileJob", 1)] * 6),
    ],
)
def test_the_planner_groups_only_tiles_that_may_share_and_as_many_groups_as_run_at_once(
    model: dict[str, Any], parallelism: int | None, expected: list[tuple[str, int]]
) -> None:
    grid = TileGrid((64, 96), (TILE, TILE), (TILE, TILE))
    context = TileContext(None, ModelFactory.from_spec(model), None, None)  # type: ignore[arg-type]
    planner = TilePlanner(context, grid, ProgressListener(), Runner(parallelism))
    jobs = planner.predict_jobs(None, list(grid))  # type: ignore[arg-type]
    assert [(type(job).__name__, len(getattr(job, "positions", [None]))) for job in jobs] == expected
    covered = [p for job in jobs for p in (job.positions if isinstance(job, PredictGroupJob) else [job.position])]
    assert covered == list(grid) and all(isinstance(job, PredictGroupJob | PredictTileJob) for job in jobs)
