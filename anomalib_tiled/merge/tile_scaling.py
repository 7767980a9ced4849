"""Tile scaling: every tile model's raw values put on one scale of *normal* variation before merging.

Each tile model has its own features and its own score scale (its own Gaussian, its own memory
bank), so raw maps from different positions are not comparable: merged raw, the position with the
widest raw range decides every image's score. A scaling learned from normal images the tile model
did not fit on (the run's ``calibration`` split: ``TrainModels.calibration_share`` of the training
images, held out) maps each position's values through ``(value - shift) / scale``:

* ``normal_zscore``: shift = mean, scale = standard deviation of the normal values;
* ``normal_quantile``: shift = median, scale = the :data:`UPPER_QUANTILE` quantile minus the
  median (robust to a heavy upper tail).

Maps and scores are scaled separately (a score need not be a map value). The transform is affine and
increasing, so per-tile rankings are unchanged, and it is a pair of tensor operations, so exported
graphs carry it as buffers (:class:`TileScales`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from anomalib_tiled.settings import TileScaling

UPPER_QUANTILE = 0.99
"""Quantile of normal values that ``normal_quantile`` maps to 1 (its median maps to 0)."""

MAX_SAMPLES = 2**22
"""Normal map values kept per tile position for quantiles (4 Mi floats, 16 MiB): memory stays flat."""


@dataclass
class NormalScale:
    """Affine scaling ``(value - shift) / scale`` of one tile position's maps and scores."""

    map_shift: float
    map_scale: float
    score_shift: float
    score_scale: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)

    @staticmethod
    def maps_of(scale: NormalScale | None, maps: torch.Tensor) -> torch.Tensor:
        """``maps`` scaled by ``scale`` (unchanged when None)."""
        return maps if scale is None else (maps - scale.map_shift) / scale.map_scale

    @staticmethod
    def scores_of(scale: NormalScale | None, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` scaled by ``scale`` (unchanged when None)."""
        return scores if scale is None else (scores - scale.score_shift) / scale.score_scale

    def value_range(self, low: float, high: float) -> tuple[float, float]:
        """A raw map value range on the scaled axis (the transform is increasing)."""
        return (low - self.map_shift) / self.map_scale, (high - self.map_shift) / self.map_scale


class NormalScaleEstimator:
    """Learns one tile position's :class:`NormalScale` from its predictions on normal images.

    Args:
        method: ``normal_zscore`` or ``normal_quantile``.
        n_images: Images that will be streamed (to spread :data:`MAX_SAMPLES` over them).
        seed: Seed of the pixel subsample kept for quantiles.
    """

    def __init__(self, method: TileScaling, n_images: int, seed: int = 0) -> None:
        if method == TileScaling.NONE:
            msg = "NormalScaleEstimator: method 'none' learns nothing"
            raise ValueError(msg)
        self.method = TileScaling(method)
        self.per_image = max(1, MAX_SAMPLES // max(1, n_images))
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.count = 0
        self.total = torch.zeros((), dtype=torch.float64)
        self.total_sq = torch.zeros((), dtype=torch.float64)

    def update(self, maps: torch.Tensor, scores: torch.Tensor) -> None:
        """Add ``(N, h, w)`` maps and ``(N,)`` scores of normal tiles."""
        values = maps.detach().flatten(1).double()
        self.count += values.numel()
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.scores.append(scores.detach().flatten().double())
        if self.method == TileScaling.NORMAL_QUANTILE:
            if values.shape[1] > self.per_image:
                picks = torch.rand(values.shape, generator=self.generator).topk(self.per_image, dim=1).indices
                values = values.gather(1, picks)
            self.samples.append(values.flatten().float())

    def compute(self) -> NormalScale:
        """The learned scaling.

        Raises:
            ValueError: If no normal predictions were added.
        """
        if self.count == 0:
            msg = "no normal calibration predictions to learn the tile scaling from"
            raise ValueError(msg)
        scores = torch.cat(self.scores)
        if self.method == TileScaling.NORMAL_ZSCORE:
            mean = float(self.total / self.count)
            variance = max(float(self.total_sq / self.count) - mean**2, 0.0)
            map_shift, map_scale = mean, variance**0.5
            score_shift, score_scale = float(scores.mean()), float(scores.std(correction=0))
        else:
            map_shift, map_scale = _median_and_spread(torch.cat(self.samples).numpy())
            score_shift, score_scale = _median_and_spread(scores.numpy())
        return NormalScale(map_shift, _positive(map_scale, map_shift), score_shift, _positive(score_scale, score_shift))


def _median_and_spread(values: np.ndarray) -> tuple[float, float]:
    median, upper = np.quantile(values, [0.5, UPPER_QUANTILE])
    return float(median), float(upper - median)


def _positive(scale: float, shift: float) -> float:
    """A usable divisor: constant normal values (a degenerate tile model) leave values unscaled in size."""
    floor = 1e-6 * max(abs(shift), 1.0)
    return scale if scale > floor else max(abs(shift), 1.0)


class TileScales(nn.Module):
    """The scalings of every tile position, applied to a batch of tile predictions.

    A module, so that an exported graph carries the statistics as buffers.

    Args:
        scales: One scaling per tile position, in grid order.
    """

    def __init__(self, scales: list[NormalScale]) -> None:
        super().__init__()
        self.scales = scales
        for name in ("map_shift", "map_scale", "score_shift", "score_scale"):
            values = torch.tensor([getattr(scale, name) for scale in scales], dtype=torch.float32)
            self.register_buffer(name, values)

    def forward(self, maps: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale ``(B, n_tiles, h, w)`` maps and ``(B, n_tiles)`` scores."""
        maps = (maps - self.map_shift[:, None, None]) / self.map_scale[:, None, None]
        return maps, (scores - self.score_shift) / self.score_scale

    def value_range(self, ranges: list[tuple[float, float]]) -> tuple[float, float]:
        """The range of scaled map values, from each position's raw range (in grid order)."""
        scaled = [scale.value_range(*span) for scale, span in zip(self.scales, ranges, strict=True)]
        return min(low for low, _ in scaled), max(high for _, high in scaled)
