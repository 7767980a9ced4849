"""Result images: one PNG per image, at native resolution (capped), built with anomalib's drawing helpers.

Left panel: the image with the ground-truth outline (green) where known. Right panel: the anomaly
heat-map over the image, the predicted-mask outline (red) and faint tile-grid lines; the score and
predicted label are written on top. The panels are drawn by small public functions
(:func:`ground_truth_panel`, :func:`heat_panel`...) that the HTML report's gallery shares.

Pictures are drawn and encoded by a small thread pool (PIL releases the GIL while it decodes,
resizes and encodes), overlapping with merging and metrics in the main thread; at most a few are in
flight, so memory stays flat.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from anomalib.visualization.image.functional import add_text_to_image, apply_colormap, visualize_mask
from PIL import Image, ImageDraw

from anomalib_tiled.tiling import TileGrid

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)
GRID_COLOR = (255, 255, 255, 70)
HEAT_ALPHA = 0.5


@dataclass
class ResultPicture:
    """What one result picture shows (maps and masks at the tiled image size)."""

    image_path: str
    anomaly_map: torch.Tensor
    pred_mask: torch.Tensor | None
    gt_mask: torch.Tensor | None
    caption: str
    output: Path


class ResultVisualizer:
    """Draws and writes result pictures.

    Args:
        grid: Tile grid, for the grid lines (in tiled-image coordinates).
        max_side: Longest side of each panel in pixels.
        draw_grid: Whether to draw the tile grid.
        display_range: Anomaly-map values mapped to the ends of the colour map.
        workers: Threads drawing pictures.
    """

    def __init__(
        self,
        grid: TileGrid,
        max_side: int,
        draw_grid: bool,
        display_range: tuple[float, float],
        workers: int = 2,
    ) -> None:
        self.grid = grid
        self.max_side = max_side
        self.draw_grid = draw_grid
        low, high = display_range
        self.display_range = (low, high if high > low else low + 1.0)
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> ResultVisualizer:  # noqa: PYI034 - final in practice; Self needs Python 3.11
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tiled-visualizer")
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._pool is not None
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, picture: ResultPicture) -> None:
        """Queue a picture; waits when too many are in flight (and re-raises their errors)."""
        assert self._pool is not None, "use ResultVisualizer as a context manager"
        while len(self._pending) >= 2 * self.workers:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self.write, picture))

    def write(self, picture: ResultPicture) -> None:
        """Draw one picture and write it as PNG."""
        canvas = self.draw(picture)
        picture.output.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(picture.output, format="PNG", compress_level=1)

    def draw(self, picture: ResultPicture) -> Image.Image:
        """Two-panel result image of one prediction."""
        image = load_image(picture.image_path, self.max_side)
        left = ground_truth_panel(image, picture.gt_mask)
        right = heat_panel(
            image,
            picture.anomaly_map,
            picture.pred_mask,
            self.display_range,
            self.grid if self.draw_grid else None,
            picture.caption,
        )
        return side_by_side([left, right])


def load_image(path: str | Path, max_side: int) -> Image.Image:
    """The image at ``path`` as RGB, scaled down so that its longest side is at most ``max_side``."""
    with Image.open(path) as source:
        image = source.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def ground_truth_panel(image: Image.Image, gt_mask: torch.Tensor | None, fill_alpha: float = 0.0) -> Image.Image:
    """A copy of ``image`` with the ground-truth outline, over a translucent fill when ``fill_alpha > 0``."""
    panel = image.copy()
    if gt_mask is not None and bool(gt_mask.any()):
        if fill_alpha > 0:
            draw_mask(panel, gt_mask, GT_COLOR, mode="fill", alpha=fill_alpha)
        draw_mask(panel, gt_mask, GT_COLOR)
    return panel


def heat_panel(
    image: Image.Image,
    anomaly_map: torch.Tensor,
    pred_mask: torch.Tensor | None,
    display_range: tuple[float, float],
    grid: TileGrid | None,
    caption: str,
) -> Image.Image:
    """Anomaly heat-map over ``image`` with the predicted-mask outline, the tile grid and a caption.

    Args:
        image: RGB image, already at the panel size.
        anomaly_map: ``(H, W)`` map at the tiled image size.
        pred_mask: ``(H, W)`` predicted mask, or None.
        display_range: Map values at the ends of the colour map (widened when empty).
        grid: Tile grid to draw, or None for no grid.
        caption: Text written in the top-left corner.

    Returns:
        The RGB panel, the size of ``image``.
    """
    low, high = display_range
    high = high if high > low else low + 1.0
    heat = ((anomaly_map.float() - low) / (high - low)).clamp(0, 1).mul(255).byte().numpy()
    heat_image = apply_colormap(Image.fromarray(heat, "L").resize(image.size, Image.Resampling.BILINEAR))
    panel = Image.blend(image, heat_image.convert("RGB"), HEAT_ALPHA)
    if pred_mask is not None and bool(pred_mask.any()):
        draw_mask(panel, pred_mask, PRED_COLOR)
    if grid is not None:
        draw_grid_lines(panel, grid)
    return add_text_to_image(panel, caption, size=max(12, image.height // 28)).convert("RGB")


def side_by_side(panels: list[Image.Image], gap: int = 0) -> Image.Image:
    """Panels of one height pasted left to right onto one RGB canvas, ``gap`` white pixels apart."""
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(panel.height for panel in panels)), "white")
    left = 0
    for panel in panels:
        canvas.paste(panel.convert("RGB"), (left, 0))
        left += panel.width + gap
    return canvas


def draw_grid_lines(image: Image.Image, grid: TileGrid) -> None:
    """Draw the outline of every tile of ``grid`` (scaled to ``image``) onto ``image`` in place."""
    draw = ImageDraw.Draw(image, "RGBA")
    scale_y = image.height / grid.image_size[0]
    scale_x = image.width / grid.image_size[1]
    for position in grid:
        top, left = position.top * scale_y, position.left * scale_x
        bottom, right = (position.top + position.height) * scale_y, (position.left + position.width) * scale_x
        draw.rectangle([left, top, right - 1, bottom - 1], outline=GRID_COLOR)


def draw_mask(
    image: Image.Image,
    mask: torch.Tensor,
    color: tuple[int, int, int],
    mode: Literal["contour", "fill"] = "contour",
    alpha: float = 0.5,
) -> None:
    """Draw ``mask`` (resized to ``image``) onto ``image`` in place, as a contour or a translucent fill."""
    pixels = Image.fromarray(mask.to(torch.uint8).mul(255).numpy().astype(np.uint8), "L")
    overlay = visualize_mask(pixels.resize(image.size, Image.Resampling.NEAREST), mode=mode, color=color, alpha=alpha)
    image.paste(overlay, (0, 0), overlay)


def output_name(image_path: str, index: int) -> str:
    """File stem of an image's outputs: unique even when sources share a file name."""
    path = Path(image_path)
    return f"{index:05d}_{path.parent.name}_{path.stem}"
