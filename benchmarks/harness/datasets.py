"""Benchmark datasets in MVTec AD layout: deterministic subsets and replicated test splits.

Files are *copied* into a scratch folder, not symlinked: anomalib 2.7's ``MVTecAD`` resolves every
file and drops those that resolve outside the dataset root (its guard against escaping symlinks),
so a folder of symlinks into the read-only source reads as "Found 0 images". A 40/45 subset of
MVTec AD bottle is about 60 MB, so copying costs well under a second.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL = "good"
QUICK_DATA = {"n_train": 10, "n_test_good": 4, "n_test_defect": 3}
"""Synthetic data of the ``--quick`` smoke tests: 10 normal training images, 4 normal + 2x3 anomalous test images."""


@dataclass(frozen=True)
class DatasetSummary:
    """What a built dataset holds.

    Attributes:
        root: Dataset root (``data.init_args.root``).
        category: Category folder below the root.
        n_train: Training images (all normal).
        n_test: Test images, normal and anomalous.
        n_test_anomalous: Anomalous test images (each with a mask).
    """

    root: Path
    category: str
    n_train: int
    n_test: int
    n_test_anomalous: int


def images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def spread(items: list[Path], count: int) -> list[Path]:
    """``count`` items evenly spread over ``items`` (first and last included), in order."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over groups in proportion to their sizes (largest remainder, ties by name)."""
    available = sum(sizes.values())
    if total >= available:
        return dict(sizes)
    exact = {name: total * size / available for name, size in sizes.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def mask_of(image: Path, category_dir: Path) -> Path:
    """The ground-truth mask of an anomalous MVTec AD test image."""
    mask = category_dir / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    if not mask.is_file():
        msg = f"{image}: no ground-truth mask at {mask}; the source is not in MVTec AD layout"
        raise FileNotFoundError(msg)
    return mask


def build_subset(
    source: Path,
    destination: Path,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    test_copies: int = 1,
) -> DatasetSummary:
    """Copy a deterministic subset of an MVTec AD category, optionally with its test split replicated.

    Training images are spread evenly over the sorted file list; test images are allocated to the
    ``good`` and defect folders in proportion to their sizes, then spread evenly within each. With
    ``test_copies > 1`` every selected test image (and mask) is written once per copy under the
    distinct names ``r<k>_<name>``, so the data module sees ``test_copies`` times as many images.

    Args:
        source: Category folder of the source (e.g. ``.../mvtec_ad/bottle``).
        destination: Dataset root to create; the category folder goes below it.
        n_train: Training images to keep (None: all).
        n_test: Test images to keep before replication (None: all).
        test_copies: Times the selected test split is repeated.

    Returns:
        What was written.
    """
    if test_copies < 1:
        msg = f"test_copies must be >= 1, got {test_copies}"
        raise ValueError(msg)
    train = images(source / "train" / NORMAL)
    kept_train = spread(train, n_train if n_train is not None else len(train))
    groups = {folder.name: images(folder) for folder in sorted((source / "test").iterdir()) if folder.is_dir()}
    sizes = {name: len(files) for name, files in groups.items()}
    counts = allocate(sizes, n_test) if n_test is not None else sizes
    kept_test = [image for name, files in groups.items() for image in spread(files, counts[name])]

    category_dir = destination / source.name
    if category_dir.exists():
        shutil.rmtree(category_dir)
    for image in kept_train:
        _copy(image, category_dir / "train" / NORMAL / image.name)
    anomalous = 0
    for copy in range(test_copies):
        prefix = f"r{copy}_" if test_copies > 1 else ""
        for image in kept_test:
            defect = image.parent.name
            _copy(image, category_dir / "test" / defect / f"{prefix}{image.name}")
            if defect != NORMAL:
                _copy(mask_of(image, source), category_dir / "ground_truth" / defect / f"{prefix}{image.stem}_mask.png")
                anomalous += 1
    return DatasetSummary(destination, source.name, len(kept_train), len(kept_test) * test_copies, anomalous)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def make_synthetic(destination: Path, size: int, n_train: int, n_test_good: int, n_test_defect: int, seed: int) -> Path:
    """Write the package's synthetic dataset (category ``texture``) and return its category folder."""
    from anomalib_tiled.data.synthetic import make_dataset  # noqa: PLC0415 - only the quick mode needs it

    return make_dataset(
        destination, size=size, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, seed=seed
    )
