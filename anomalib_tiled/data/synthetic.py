"""A small synthetic high-resolution dataset with small defects, in MVTec AD layout.

The demo, the tests and the benchmarks' quick mode use it, so everything runs offline. Images are a
periodic texture with noise; anomalous images carry one small blob or scratch (about 2-4 % of the
image side) that is hard to see once the image is downscaled, which is what tiling is for.

Usage:
    python -m anomalib_tiled.data.synthetic --root datasets/synthetic --size 512
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORY = "texture"
DEFECTS = ("blob", "scratch")


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * math.pi, 2)
    pattern = 0.5 + 0.12 * np.sin(2 * math.pi * 12 * x + phase[0]) * np.sin(2 * math.pi * 12 * y + phase[1])
    shade = 0.08 * (x - 0.5) + 0.05 * (y - 0.5)
    gray = pattern + shade + rng.normal(0, 0.02, (size, size))
    tint = np.array([1.0, 0.92, 0.8], dtype=np.float32)
    return np.clip(gray[..., None] * tint, 0, 1)


def _defect(size: int, kind: str, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    margin = size // 8
    cx, cy = rng.integers(margin, size - margin, 2)
    if kind == "blob":
        radius = rng.uniform(0.012, 0.022) * size
        draw.ellipse([cx - radius, cy - radius * 0.8, cx + radius, cy + radius * 0.8], fill=255)
    else:
        length = rng.uniform(0.03, 0.05) * size
        angle = rng.uniform(0, math.pi)
        dx, dy = length * math.cos(angle), length * math.sin(angle)
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=max(2, size // 128))
    return mask


def make_dataset(
    root: str | Path,
    size: int = 256,
    n_train: int = 12,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    seed: int = 0,
    category: str = CATEGORY,
) -> Path:
    """Write the dataset to ``root/<category>`` (MVTec AD layout) and return that folder.

    Args:
        root: Dataset root (the ``root`` of anomalib's ``MVTecAD``/``Folder``).
        size: Image side in pixels.
        n_train: Normal training images.
        n_test_good: Normal test images.
        n_test_defect: Anomalous test images per defect type.
        seed: Random seed; the same seed writes the same images.
        category: Category folder name.

    Returns:
        The category folder.
    """
    rng = np.random.default_rng(seed)
    folder_root = Path(root) / category
    for split, kind, count in [("train", "good", n_train), ("test", "good", n_test_good)] + [
        ("test", defect, n_test_defect) for defect in DEFECTS
    ]:
        folder = folder_root / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = _texture(size, rng)
            if kind != "good":
                mask = _defect(size, kind, rng)
                weight = np.asarray(mask, dtype=np.float32)[..., None] / 255
                color = rng.choice([0.15, 0.95])
                image = image * (1 - weight) + color * weight
                mask_folder = folder_root / "ground_truth" / kind
                mask_folder.mkdir(parents=True, exist_ok=True)
                mask.save(mask_folder / f"{index:03d}_mask.png")
            Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return folder_root


def main() -> None:
    """Command line of :func:`make_dataset`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="datasets/synthetic", help="dataset root (default: datasets/synthetic)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-test-good", type=int, default=8)
    parser.add_argument("--n-test-defect", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = make_dataset(args.root, args.size, args.n_train, args.n_test_good, args.n_test_defect, args.seed)
    print(folder)


if __name__ == "__main__":
    main()
