"""The exported ensemble as one ``nn.Module``: its forward pass is all of ``predict``.

Every step calls the code ``predict`` itself runs, so the graph cannot drift from it: the tile
models are anomalib modules (their ``forward`` runs the pre-processor's export transform, then the
inference model; tile models with an identical feature extractor run it once, batched, through the
same :class:`~anomalib_tiled.execution.shared.SharedExtractorTiles` as ``predict``),
:func:`~anomalib_tiled.run.store.tile_outputs` shapes their outputs, and
:func:`~anomalib_tiled.merge.merging.post_process` scales, normalises, merges, smooths, pools and thresholds
with the run's statistics. Only the image resize is rewritten as exportable tensor ops
(:mod:`~anomalib_tiled.export.resize`).
"""

from __future__ import annotations

import torch
from anomalib.models import AnomalibModule
from anomalib.models.components.base.export_mixin import ExportMixin
from torch import nn

from anomalib_tiled.data.splits import pixel_levels
from anomalib_tiled.errors import ExportError
from anomalib_tiled.execution.shared import SharedExtractorTiles, tile_units
from anomalib_tiled.export.resize import resize_antialiased
from anomalib_tiled.merge.merging import TileMerger, TilePredictions, post_process
from anomalib_tiled.merge.statistics import Statistics
from anomalib_tiled.run.store import tile_outputs

GraphOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class TiledEnsembleGraph(nn.Module):
    """Resize, tile, run every tile model, merge, smooth, pool, normalise and threshold.

    Tile models whose feature extractors are identical by content run as one unit
    (:class:`~anomalib_tiled.execution.shared.SharedExtractorTiles`): the graph holds that extractor
    once and calls it once per batch, with every tile on the batch axis; the others run one by one.

    Args:
        models: Trained tile models in grid order (those of a shared group lose their own extractor).
        merger: Blending, pooling and seam smoothing of the run.
        statistics: The run's normalisation and threshold statistics.
    """

    def __init__(self, models: list[AnomalibModule], merger: TileMerger, statistics: Statistics) -> None:
        super().__init__()
        units = tile_units(models)
        self.indices = [indices for indices, _ in units]
        self.units = nn.ModuleList([unit for _, unit in units])
        self.merger = merger
        self.statistics = statistics
        stages = [*(statistics.tiles or []), *([statistics.image] if statistics.image else [])]
        # Registered so that the statistics travel as buffers of the graph, not as loose constants.
        self.stage_stats = nn.ModuleList([stage.post_processor for stage in stages])
        self.scales = statistics.scales
        # The grid caches its blending weights on first use: fill the caches with real tensors now,
        # or the tracer would fill them with its fake ones.
        grid = merger.grid
        grid.untile(torch.zeros(1, len(grid), *grid.tile_size), merger.blending)

    @property
    def shared_tiles(self) -> int:
        """Tile models that run after a shared feature extractor."""
        return sum(len(unit.tiles) for unit in self.units if isinstance(unit, SharedExtractorTiles))

    def forward(self, image: torch.Tensor) -> GraphOutputs:
        """Predict a batch.

        Args:
            image: ``(B, 3, H, W)`` float images in [0, 1], any ``H`` and ``W``.

        Returns:
            ``anomaly_map`` and ``pred_mask`` ``(B, h, w)`` at the trained size, ``pred_score`` and
            ``pred_label`` ``(B,)``.
        """
        grid = self.merger.grid
        # The 8-bit levels of predict's image cache, so the tile models see the same pixels.
        image = pixel_levels(resize_antialiased(image, grid.image_size)) / 255
        tiles = grid.tile(image)
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for indices, unit in zip(self.indices, self.units, strict=True):
            for index, output in zip(indices, unit([tiles[:, :, index] for index in indices]), strict=True):
                outputs[index] = tile_outputs(output.anomaly_map, output.pred_score, grid.tile_size)
        maps, scores = zip(*(outputs[position.index] for position in grid), strict=True)
        predictions = TilePredictions(torch.stack(maps, dim=1), torch.stack(scores, dim=1))
        batch = post_process(predictions, self.merger, self.statistics, [])
        return batch.anomaly_map, batch.pred_score, batch.pred_label, batch.pred_mask


def check_exportable(model_class: type[AnomalibModule]) -> None:
    """Fail when anomalib declares the model class not exportable.

    anomalib marks such models (VLM-AD, AnomalyVFM...) by overriding ``ExportMixin.to_onnx`` with a
    stub that only logs "not supported".

    Raises:
        ExportError: Naming the model.
    """
    if model_class.to_onnx is not ExportMixin.to_onnx:
        msg = (
            f"TrainModels.model: anomalib cannot export {model_class.__name__} models (its to_onnx says export is "
            "not supported); use 'anomalib tiled predict --root' with this run, or train an exportable model"
        )
        raise ExportError(msg)


def trace(graph: TiledEnsembleGraph, model_name: str) -> tuple[torch.export.ExportedProgram, int | None]:
    """``torch.export`` program of the graph for any image size, and the batch size it is fixed to.

    Any batch size when the tile models allow it; otherwise batches of one: some models branch on
    the batch size (PatchCore searches its memory bank in chunks of patches), which no graph can hold.

    Args:
        graph: The ensemble, in eval mode.
        model_name: Tile model class name, for the error message.

    Returns:
        The program, and None (any batch size) or 1.

    Raises:
        ExportError: If the tile models cannot be traced (first line of the cause).
    """
    size = graph.merger.grid.image_size
    spatial = {2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)}
    cause: Exception | None = None
    for batch, dims in ((None, {0: torch.export.Dim("batch", min=1), **spatial}), (1, spatial)):
        try:
            with torch.no_grad():
                return torch.export.export(graph, example_input(batch, size), dynamic_shapes=(dims,)), batch
        except Exception as error:  # noqa: BLE001, PERF203 - any tracer error is the model's; two tries only
            cause = error
    detail = next((line for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
    msg = (
        f"TrainModels.model: the {model_name} tile models cannot be traced for export ({detail}); "
        "use 'anomalib tiled predict --root' with this run"
    )
    raise ExportError(msg) from cause


def example_input(batch: int | None, size: tuple[int, int]) -> tuple[torch.Tensor]:
    """Example batch of the tracer and the ONNX exporter: trained-size images (two when the batch is free)."""
    return (torch.rand(batch or 2, 3, *size),)
