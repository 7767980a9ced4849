"""Result images: one PNG per image, at native resolution (capped), built with anomalib's drawing helpers.

Left panel: the image with the ground-truth outline (green) where known. Right panel: the anomaly
heat-map over the image, the predicted-mask outline (red) and faint tile-grid lines; the score and
predicted label are written on top.

Pictures are drawn and encoded by a small thread pool (PIL releases the GIL while it decodes,
resizes and encodes), overlapping with merging and metrics in the main thread; at most a few are in
flight, so memory stays flat.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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
        with Image.open(picture.image_path) as source:
            image = source.convert("RGB")
        scale = min(1.0, self.max_side / max(image.size))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)

        left = image.copy()
        if picture.gt_mask is not None and bool(picture.gt_mask.any()):
            _outline(left, picture.gt_mask, size, GT_COLOR)

        low, high = self.display_range
        heat = ((picture.anomaly_map.float() - low) / (high - low)).clamp(0, 1).mul(255).byte().numpy()
        heat_image = apply_colormap(Image.fromarray(heat, "L").resize(size, Image.Resampling.BILINEAR))
        right = Image.blend(image, heat_image.convert("RGB"), HEAT_ALPHA)
        if picture.pred_mask is not None and bool(picture.pred_mask.any()):
            _outline(right, picture.pred_mask, size, PRED_COLOR)
        if self.draw_grid:
            self._grid_lines(right)
        right = add_text_to_image(right, picture.caption, size=max(12, size[1] // 28))

        canvas = Image.new("RGB", (size[0] * 2, size[1]))
        canvas.paste(left, (0, 0))
        canvas.paste(right.convert("RGB"), (size[0], 0))
        return canvas

    def _grid_lines(self, image: Image.Image) -> None:
        draw = ImageDraw.Draw(image, "RGBA")
        scale_y = image.height / self.grid.image_size[0]
        scale_x = image.width / self.grid.image_size[1]
        for position in self.grid:
            top, left = position.top * scale_y, position.left * scale_x
            bottom, right = (position.top + position.height) * scale_y, (position.left + position.width) * scale_x
            draw.rectangle([left, top, right - 1, bottom - 1], outline=GRID_COLOR)


def _outline(image: Image.Image, mask: torch.Tensor, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    """Draw the contour of ``mask`` (resized to ``size``) onto ``image`` in place."""
    pixels = Image.fromarray(mask.to(torch.uint8).mul(255).numpy().astype(np.uint8), "L")
    contour = visualize_mask(pixels.resize(size, Image.Resampling.NEAREST), mode="contour", color=color)
    image.paste(contour, (0, 0), contour)


def output_name(image_path: str, index: int) -> str:
    """File stem of an image's outputs: unique even when sources share a file name."""
    path = Path(image_path)
    return f"{index:05d}_{path.parent.name}_{path.stem}"
