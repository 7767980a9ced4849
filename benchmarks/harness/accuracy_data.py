"""Datasets of the accuracy benchmark, in MVTec AD layout, each built once and deterministic by a seed.

* ``bottle``: a subset of MVTec AD bottle from ``../shared`` (skipped when it is absent);
* ``synthetic``: the package's own synthetic texture set;
* ``textures``: real texture photos bundled with scikit-image (no download). Normal images are random
  crops (and flips) of one photo; anomalous ones carry one small defect: a soft-edged disc of a
  *different* photo shifted 0.25-0.35 brighter or darker (``foreign``, 6-9 % of the side across), or
  a thin brighter or darker line (``scratch``, 6-10 % of the side long, 3 px wide). The mask is the
  defect. (Same-grey discs of 3-5 % were invisible on the busy grass even to the eye.);
* ``border``: the same on another photo with every defect centred on a tile border or the tile corner
  (the seams of the 2x2 grid), to test how tiles are stitched;
* ``nonsquare``: 224 x 320 (height x width) crops, tiled 128 with stride 96 (a 2x3 overlapping grid).

Every dataset is ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``
with masks of the image size (0/255). ``dataset.json`` next to the category marks a finished build.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from benchmarks.harness.datasets import build_subset, make_synthetic

DATASETS = ("bottle", "synthetic", "textures", "border", "nonsquare")
N_TRAIN = 32
N_TEST_GOOD = 14
N_TEST_PER_DEFECT = 7
BOTTLE_COUNTS = {"n_train": 40, "n_test": 30}
DEFECTS = ("foreign", "scratch")
MARKER = "dataset.json"


class DatasetUnavailableError(Exception):
    """A dataset that cannot be built on this machine (e.g. ``../shared`` is absent); one line why."""


@dataclass(frozen=True)
class BenchDataset:
    """A built dataset and the geometry it is benchmarked with.

    Attributes:
        name: Name in :data:`DATASETS`.
        root: Dataset root (``data.init_args.root``).
        category: Category folder below the root.
        image_size: ``(height, width)`` images are resized to before tiling.
        tile_size: Tile side.
        stride: Step between tiles.
        single_size: ``(height, width)`` of the single-model side: the longer side is the tile size.
        seed: Seed the data was generated with.
    """

    name: str
    root: Path
    category: str
    image_size: tuple[int, int]
    tile_size: int
    stride: int
    single_size: tuple[int, int]
    seed: int


@dataclass(frozen=True)
class TextureRecipe:
    """How a texture dataset is generated.

    Attributes:
        host: scikit-image photo of the normal texture.
        foreign: Photos the ``foreign`` patches are cut from.
        size: ``(height, width)`` of the images.
        on_border: Centre every defect on a tile border or corner (else anywhere, away from the edge).
        tile_size: Tile side.
        stride: Step between tiles.
    """

    host: str
    foreign: tuple[str, ...]
    size: tuple[int, int]
    on_border: bool
    tile_size: int
    stride: int


RECIPES = {
    "textures": TextureRecipe("grass", ("brick", "gravel"), (256, 256), on_border=False, tile_size=128, stride=128),
    "border": TextureRecipe("brick", ("grass", "gravel"), (256, 256), on_border=True, tile_size=128, stride=128),
    "nonsquare": TextureRecipe("gravel", ("grass", "brick"), (224, 320), on_border=False, tile_size=128, stride=96),
}


def single_size(image_size: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """Input size of the single model: the image scaled so its longer side is ``tile_size`` (multiples of 16).

    A single model then sees as many pixels per input as one tile model, on the whole image.
    """
    scale = tile_size / max(image_size)
    return (max(16, round(image_size[0] * scale / 16) * 16), max(16, round(image_size[1] * scale / 16) * 16))


def build(name: str, data_dir: Path, seed: int = 0, shared: Path | None = None) -> BenchDataset:
    """Build dataset ``name`` under ``data_dir/name`` unless a finished build with this seed is there.

    Raises:
        DatasetUnavailableError: For ``bottle`` without the shared MVTec AD data.
        ValueError: For an unknown name.
    """
    if name not in DATASETS:
        msg = f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}"
        raise ValueError(msg)
    root = data_dir / name
    marker = root / MARKER
    if marker.is_file():
        stored = json.loads(marker.read_text(encoding="utf-8"))
        if stored.get("seed") == seed:
            return _from_json(stored)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    dataset = _generate(name, root, seed, shared)
    marker.write_text(json.dumps(asdict(dataset), indent=2, default=str) + "\n", encoding="utf-8")
    return dataset


def _from_json(stored: dict) -> BenchDataset:
    return BenchDataset(
        **{
            **stored,
            "root": Path(stored["root"]),
            "image_size": tuple(stored["image_size"]),
            "single_size": tuple(stored["single_size"]),
        }
    )


def _generate(name: str, root: Path, seed: int, shared: Path | None) -> BenchDataset:
    square = (256, 256)
    if name == "bottle":
        source = (shared or Path("../shared")) / "data" / "mvtec_ad" / "bottle"
        if not (source / "train").is_dir():
            msg = f"bottle: shared MVTec AD data not found at {source} (pass --shared DIR)"
            raise DatasetUnavailableError(msg)
        # build_subset is deterministic (evenly spread files); the seed does not change it.
        category = build_subset(source, root, **BOTTLE_COUNTS).category
        return BenchDataset(name, root, category, square, 128, 128, single_size(square, 128), seed)
    if name == "synthetic":
        folder = make_synthetic(root, 256, N_TRAIN, N_TEST_GOOD, N_TEST_PER_DEFECT, seed)
        return BenchDataset(name, root, folder.name, square, 128, 128, single_size(square, 128), seed)
    recipe = RECIPES[name]
    write_textures(root / name, recipe, seed)
    geometry = (recipe.size, recipe.tile_size, recipe.stride, single_size(recipe.size, recipe.tile_size))
    return BenchDataset(name, root, name, *geometry, seed)


def write_textures(category_dir: Path, recipe: TextureRecipe, seed: int) -> None:
    """Write a texture dataset (see the module docstring) into ``category_dir``."""
    rng = np.random.default_rng(seed)
    host = _photo(recipe.host)
    foreign = [_photo(photo) for photo in recipe.foreign]
    for split, count in (("train", N_TRAIN), ("test", N_TEST_GOOD)):
        for index in range(count):
            _save_image(_crop(host, recipe.size, rng), category_dir / split / "good" / f"{index:03d}.png")
    for defect in DEFECTS:
        for index in range(N_TEST_PER_DEFECT):
            image = _crop(host, recipe.size, rng)
            centre = _centre(recipe, rng)
            if defect == "foreign":
                patch = _crop(foreign[index % len(foreign)], recipe.size, rng)
                image, mask = _paste_foreign(image, patch, centre, rng)
            else:
                image, mask = _scratch(image, centre, rng)
            _save_image(image, category_dir / "test" / defect / f"{index:03d}.png")
            mask_path = category_dir / "ground_truth" / defect / f"{index:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)


def _photo(name: str) -> np.ndarray:
    from skimage import data  # noqa: PLC0415 - scikit-image is a bench extra; only texture sets need it

    return getattr(data, name)().astype(np.float32) / 255.0


def _crop(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = size
    top = int(rng.integers(0, photo.shape[0] - height + 1))
    left = int(rng.integers(0, photo.shape[1] - width + 1))
    crop = photo[top : top + height, left : left + width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return np.ascontiguousarray(crop)


def tile_borders(length: int, tile_size: int, stride: int) -> list[int]:
    """Coordinates where one tile ends and the next begins (the seams of non-overlapping tiles)."""
    return list(range(stride, length - tile_size + 1, stride))


def _centre(recipe: TextureRecipe, rng: np.random.Generator) -> tuple[float, float, str]:
    """``(x, y, kind)`` of a defect centre; ``kind`` is ``vertical``, ``horizontal``, ``corner`` or ``free``."""
    height, width = recipe.size
    margin = 0.1 * min(height, width)
    x, y = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
    if not recipe.on_border:
        return x, y, "free"
    kind = ("vertical", "horizontal", "corner")[int(rng.integers(0, 3))]
    if kind in ("vertical", "corner"):
        x = float(rng.choice(tile_borders(width, recipe.tile_size, recipe.stride)))
    if kind in ("horizontal", "corner"):
        y = float(rng.choice(tile_borders(height, recipe.tile_size, recipe.stride)))
    return x, y, kind


def _paste_foreign(
    image: np.ndarray, patch: np.ndarray, centre: tuple[float, float, str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = centre
    radius = rng.uniform(0.03, 0.045) * min(image.shape)
    mask = _draw(image.shape, lambda draw: draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255))
    # Soft edge: the blend weight falls off over ~1 px; the mask stays the disc itself. The foreign
    # material is brighter or darker than the host, like a stain: same-grey discs of another
    # photo were invisible on the busy grass even to the eye.
    alpha = np.clip(gaussian_filter(mask.astype(np.float32), sigma=1.0), 0, 1)
    shift = float(rng.choice([-1.0, 1.0])) * rng.uniform(0.25, 0.35)
    return np.clip(image * (1 - alpha) + (patch + shift) * alpha, 0, 1), mask


def _scratch(
    image: np.ndarray, centre: tuple[float, float, str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    x, y, kind = centre
    half = rng.uniform(0.03, 0.05) * min(image.shape)
    # On a border the line crosses it (never runs along it), so it really straddles the seam.
    base = {"vertical": 0.0, "horizontal": math.pi / 2, "corner": math.pi / 4, "free": 0.0}[kind]
    spread = math.pi if kind == "free" else math.pi / 4
    angle = base + rng.uniform(-spread / 2, spread / 2)
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    mask = _draw(image.shape, lambda draw: draw.line([x - dx, y - dy, x + dx, y + dy], fill=255, width=3))
    delta = float(rng.choice([-1.0, 1.0])) * rng.uniform(0.45, 0.6)
    alpha = np.clip(gaussian_filter(mask.astype(np.float32), sigma=0.7), 0, 1)
    return np.clip(image + delta * alpha, 0, 1), mask


def _draw(shape: tuple[int, ...], paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _save_image(gray: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.repeat((np.clip(gray, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(path)
