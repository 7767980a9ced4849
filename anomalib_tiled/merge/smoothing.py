"""Seam smoothing: Gaussian blur restricted to the bands around tile borders.

Tile models are trained independently, so their maps can disagree where tiles meet. The merged map
is blurred with a Gaussian and the blurred values replace the original ones inside the seam bands
(``width x tile size`` around every interior tile border). The band mask depends only on the
geometry and is computed once per grid.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF  # noqa: N812 - torchvision's own alias

from anomalib_tiled.tiling import TileGrid


class SeamSmoother:
    """Smooths the seams of merged anomaly maps.

    Args:
        grid: The tile grid the maps were merged from.
        sigma: Standard deviation of the Gaussian, in pixels.
        width: Band width as a fraction of the tile size.
    """

    def __init__(self, grid: TileGrid, sigma: float, width: float) -> None:
        self.mask = grid.seam_mask(width)
        self.sigma = float(sigma)
        # Odd kernel covering +-3 sigma, as anomalib's GaussianBlur2d does.
        self.kernel_size = 2 * math.ceil(3 * self.sigma) + 1

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``(B, H, W)`` maps; pixels outside the seam bands are unchanged."""
        blurred = TF.gaussian_blur(maps[:, None], [self.kernel_size] * 2, [self.sigma] * 2)[:, 0]
        return torch.where(self.mask.to(maps.device), blurred, maps)
