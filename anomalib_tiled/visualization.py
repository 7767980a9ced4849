"""Result images: one PNG per image, at native resolution (capped), built with anomalib's drawing helpers.

Left panel: the image with the ground-truth outline (green) where known. Right panel: the anomaly
heat-map over the image, the predicted-mask outline (red) and faint tile-grid lines; the score and
predicted label are written on top.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.visualization.image.functional import add_text_to_image, apply_colormap, overlay_image, visualize_mask
from PIL import Image, ImageDraw
from torch.nn import functional as F  # noqa: N812

from anomalib_tiled.tiling import TileGrid

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)
GRID_COLOR = (255, 255, 255, 60)


class ResultVisualizer:
    """Draws result images.

    Args:
        grid: Tile grid, for the grid lines (in tiled-image coordinates).
        max_side: Longest side of each panel in pixels.
        draw_grid: Whether to draw the tile grid.
        display_range: Anomaly-map values mapped to the ends of the colour map.
    """

    def __init__(self, grid: TileGrid, max_side: int, draw_grid: bool, display_range: tuple[float, float]) -> None:
        self.grid = grid
        self.max_side = max_side
        self.draw_grid = draw_grid
        low, high = display_range
        self.display_range = (low, high if high > low else low + 1.0)

    def draw(
        self,
        image_path: str,
        anomaly_map: torch.Tensor,
        pred_mask: torch.Tensor | None,
        gt_mask: torch.Tensor | None,
        caption: str,
    ) -> Image.Image:
        """Two-panel result image of one prediction (maps at the tiled image size)."""
        with Image.open(image_path) as source:
            image = source.convert("RGB")
        scale = min(1.0, self.max_side / max(image.size))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image

        left = image.copy()
        if gt_mask is not None and bool(gt_mask.any()):
            left = overlay_image(left, visualize_mask(self._resize(gt_mask, size, "nearest"), mode="contour", color=GT_COLOR), alpha=1.0)

        low, high = self.display_range
        heat = ((anomaly_map.float() - low) / (high - low)).clamp(0, 1)
        heat_image = apply_colormap(Image.fromarray((self._resize(heat, size, "bilinear") * 255).byte().numpy(), "L"))
        right = overlay_image(image, heat_image, alpha=0.5).convert("RGBA")
        if pred_mask is not None and bool(pred_mask.any()):
            right = overlay_image(right, visualize_mask(self._resize(pred_mask, size, "nearest"), mode="contour", color=PRED_COLOR), alpha=1.0)
        if self.draw_grid:
            right = self._grid_lines(right)
        right = add_text_to_image(right.convert("RGB"), caption)

        canvas = Image.new("RGB", (size[0] * 2, size[1]))
        canvas.paste(left.convert("RGB"), (0, 0))
        canvas.paste(right.convert("RGB"), (size[0], 0))
        return canvas

    def save(self, picture: Image.Image, path: Path) -> None:
        """Write a PNG quickly (low compression)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG", compress_level=1)

    @staticmethod
    def _resize(values: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
        resized = F.interpolate(values.float()[None, None], size=(size[1], size[0]), mode=mode)[0, 0]
        return resized if mode != "nearest" else (resized > 0.5).to(torch.uint8) * 255

    def _grid_lines(self, image: Image.Image) -> Image.Image:
        layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        scale_y = image.height / self.grid.image_size[0]
        scale_x = image.width / self.grid.image_size[1]
        for position in self.grid:
            top, left = position.top * scale_y, position.left * scale_x
            bottom, right = (position.top + position.height) * scale_y, (position.left + position.width) * scale_x
            draw.rectangle([left, top, right - 1, bottom - 1], outline=GRID_COLOR)
        return Image.alpha_composite(image, layer)


def output_name(image_path: str, index: int) -> str:
    """File stem of an image's outputs: unique even when sources share a file name."""
    path = Path(image_path)
    return f"{index:05d}_{path.parent.name}_{path.stem}"
