"""Image sources of a split: a data module's dataset, or plain image files for ``predict``."""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS  # the extensions anomalib accepts

from anomalib_tiled.errors import DataError

UNKNOWN_LABEL = -1
"""Label of an image whose class is not known (``predict``)."""


class DatasetSource:
    """Images of one split of an anomalib data module (its augmentations are not applied here).

    Args:
        dataset: The split's ``AnomalibDataset``.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = copy.copy(dataset)
        self.dataset.augmentations = None
        samples = dataset.samples
        self.image_paths = [str(path) for path in samples.image_path]
        mask_paths = samples["mask_path"] if "mask_path" in samples else [""] * len(samples)
        self.mask_paths = [path if isinstance(path, str) else "" for path in mask_paths]
        self.has_masks = dataset.task.value == "segmentation"
        self.labels = [int(label) for label in samples.label_index]
        self.indices = list(range(len(self.image_paths)))

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> Any:
        """Decoded image, mask and label of one sample."""
        return self.dataset[self.indices[index]]

    def subset(self, indices: list[int]) -> DatasetSource:
        """The samples at ``indices`` (in that order), as a source of their own."""
        part = copy.copy(self)
        part.indices = [self.indices[i] for i in indices]
        part.image_paths = [self.image_paths[i] for i in indices]
        part.mask_paths = [self.mask_paths[i] for i in indices]
        part.labels = [self.labels[i] for i in indices]
        return part


class FileSource:
    """Unlabeled image files (``predict``).

    Args:
        image_paths: Image files.
    """

    has_masks = False

    def __init__(self, image_paths: list[str]) -> None:
        self.image_paths = image_paths
        self.mask_paths = [""] * len(image_paths)
        self.labels = [UNKNOWN_LABEL] * len(image_paths)

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> Any:
        """Decoded image of one file."""
        from anomalib.data import ImageItem  # noqa: PLC0415
        from anomalib.data.utils import read_image  # noqa: PLC0415

        path = self.image_paths[index]
        return ImageItem(image=read_image(path, as_tensor=True), image_path=path)


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """A ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` image as ``(3, H, W)``: tile models take three channels."""
    if image.ndim == 2:
        image = image[None]
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` float tensor in [0, 1], decoded as ``predict`` decodes it."""
    return as_rgb(FileSource([str(path)]).load(0).image)


def collect_images(pattern: str | Path) -> list[str]:
    """Image files of a folder (recursively), a single file, or a glob pattern, sorted.

    Raises:
        DataError: If nothing matches.
    """
    path = Path(pattern)
    if path.is_dir():
        candidates = [str(p) for p in path.rglob("*")]
    elif path.is_file():
        candidates = [str(path)]
    else:
        candidates = glob.glob(str(pattern), recursive=True)
    images = sorted(p for p in candidates if Path(p).suffix.lower() in IMG_EXTENSIONS and Path(p).is_file())
    if not images:
        msg = f"--data: no images match '{pattern}'; give a folder, an image file or a glob such as 'images/*.png'"
        raise DataError(msg)
    return images
