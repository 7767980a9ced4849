"""Splits: set a data module up once, decode every image once per run, and link identical splits.

Any anomalib image data module (MVTecAD, Folder, Visa...) is set up once with the run's seed, so
every tile position sees the same split. Each split is then decoded, checked and resized to the
tiled image size *once* into an ``(N, H, W, C)`` uint8 ``.npy`` file; every tile's dataset reads
only the row band it needs with ``os.pread`` (no memory map, so the cache never counts towards the
process's resident memory). Paths, labels and masks of each split are kept in the run directory
(``splits/<split>``) so evaluation needs no data module to find its ground truth again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF  # noqa: N812 - torchvision's own alias
from torchvision.tv_tensors import Mask

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.sources import UNKNOWN_LABEL, DatasetSource, FileSource, as_rgb
from anomalib_tiled.errors import DataError
from anomalib_tiled.progress import ProgressListener, Task
from anomalib_tiled.run.directory import RunDirectory, atomic_write_text
from anomalib_tiled.tiling import Size

logger = logging.getLogger(__name__)


NORMAL_SPLITS = ("train", "calibration")
"""Splits of normal training images: no pixel ground truth is kept for them."""


def split_fingerprint(image_paths: list[str], labels: list[int]) -> str:
    """Identity of a split's contents (image paths and labels), known before decoding anything."""
    return hashlib.sha256(json.dumps([list(image_paths), list(labels)]).encode()).hexdigest()[:16]


@dataclass
class SplitRecord:
    """Images of one split at the tiled image size: paths, labels and (optionally) masks.

    Attributes:
        directory: ``splits/<split>`` in the run.
        image_paths: Source image paths.
        mask_paths: Source mask paths (empty string when none).
        labels: ``0`` normal, ``1`` anomalous, ``-1`` unknown.
        has_masks: Whether pixel ground truth exists (``masks.npy``).
    """

    directory: Path
    image_paths: list[str]
    mask_paths: list[str]
    labels: list[int]
    has_masks: bool

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def masks(self) -> NpyFile | None:
        """``(N, H, W)`` uint8 masks, or None without pixel ground truth."""
        return NpyFile(self.directory / "masks.npy") if self.has_masks else None

    @property
    def fingerprint(self) -> str:
        """Identity of the split's contents, to tell whether stored predictions match."""
        return split_fingerprint(self.image_paths, self.labels)

    @classmethod
    def load(cls, directory: Path) -> SplitRecord:
        """Read a split written by :func:`cache_split`."""
        index = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        return cls(directory, index["image_paths"], index["mask_paths"], index["labels"], index["has_masks"])

    def save(self) -> None:
        """Write ``index.json`` (last, atomically: its presence marks the split complete)."""
        index = {
            "image_paths": self.image_paths,
            "mask_paths": self.mask_paths,
            "labels": self.labels,
            "has_masks": self.has_masks,
        }
        atomic_write_text(self.directory / "index.json", json.dumps(index) + "\n")


def pixel_levels(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as the 8-bit levels of the image cache (as floats, 0 to 255).

    Tile models see cached images; exported graphs quantise the same way, so both see the same pixels.
    """
    return (images.clamp(0, 1) * 255).round()


class _Decoder:
    """Decode, check and resize one image of a source; runs in decoder threads."""

    def __init__(self, source: DatasetSource | FileSource, image_size: Size) -> None:
        self.source = source
        self.image_size = image_size

    def __call__(self, index: int) -> dict[str, Any]:
        # Errors come back as text so that the first bad file is reported as one line, in order.
        try:
            item = self.source.load(index)
        except Exception as error:  # noqa: BLE001 - any decoder error becomes one clear line
            return {"index": index, "error": f"{self.source.image_paths[index]}: cannot read image or mask ({error})"}
        image = as_rgb(item.image)
        label = UNKNOWN_LABEL if item.gt_label is None else int(item.gt_label)
        result: dict[str, Any] = {"index": index, "label": label, "source_size": tuple(image.shape[-2:])}
        if item.gt_mask is not None:
            mask = item.gt_mask.squeeze()
            if tuple(mask.shape) != tuple(image.shape[-2:]):
                return {
                    "index": index,
                    "error": (
                        f"mask {item.mask_path} is {mask.shape[-1]}x{mask.shape[-2]} but its image {item.image_path} "
                        f"is {image.shape[-1]}x{image.shape[-2]}; masks must have their image's size"
                    ),
                }
            resized_mask = TF.resize(Mask(mask[None].to(torch.uint8)), list(self.image_size))
            result["mask"] = (resized_mask[0] > 0).to(torch.uint8).numpy()
        resized = TF.resize(image.float(), list(self.image_size), antialias=True)
        result["image"] = pixel_levels(resized).to(torch.uint8).permute(1, 2, 0).numpy()
        return result


def cache_split(
    source: DatasetSource | FileSource,
    image_size: Size,
    directory: Path,
    cache_file: Path | None,
    num_workers: int,
    progress: Callable[[int], None] | None = None,
    *,
    with_masks: bool = True,
) -> SplitRecord:
    """Decode one split once: write its record (and, if asked, its image cache).

    Args:
        source: The split's images.
        image_size: Tiled image size ``(H, W)``.
        directory: ``splits/<split>`` folder for paths, labels and masks.
        cache_file: Where to write the ``(N, H, W, 3)`` uint8 image cache, or None to skip images.
        num_workers: Threads decoding in parallel (threads, not processes: PIL and torch release the
            GIL, and forked workers would duplicate the parent's memory).
        progress: Called after each image with the number of images done.
        with_masks: Keep pixel ground truth (not needed for training images).

    Returns:
        The split record.

    Raises:
        DataError: On an unreadable image or a mask that does not match its image.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size
    count = len(source)
    images = NpyFile.create(_partial(cache_file), (count, height, width, 3), np.uint8) if cache_file else None
    has_masks = with_masks and source.has_masks
    masks = None
    if has_masks:
        masks = NpyFile.create(_partial(directory / "masks.npy"), (count, height, width), np.uint8)
    labels = [UNKNOWN_LABEL] * count
    upsampled = 0
    workers = max(1, num_workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiled-decoder") as pool:
        decoded = _ordered_map(pool, _Decoder(source, image_size), range(count), window=2 * workers)
        for done, item in enumerate(decoded, start=1):
            _store_decoded(item, labels, images, masks)
            upsampled += item["source_size"][0] < height or item["source_size"][1] < width
            if progress is not None:
                progress(done)
    if upsampled:
        logger.warning(
            "%d image(s) are smaller than the tiled image size %s and were upsampled.", upsampled, image_size
        )
    for partial_file, final in ((images, cache_file), (masks, directory / "masks.npy")):
        if partial_file is not None and final is not None:
            os.replace(partial_file.path, final)
    record = SplitRecord(directory, source.image_paths, source.mask_paths, labels, has_masks)
    record.save()
    return record


def _ordered_map(pool: ThreadPoolExecutor, function: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.map`` with at most ``window`` results in flight, so memory does not grow with the split."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _store_decoded(item: dict[str, Any], labels: list[int], images: NpyFile | None, masks: NpyFile | None) -> None:
    if "error" in item:
        raise DataError(f"{item['error']}; fix or remove the file")
    index = item["index"]
    labels[index] = item["label"]
    if images is not None:
        images.write(index, item["image"][None])
    if masks is not None and "mask" in item:
        masks.write(index, item["mask"][None])


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


DEFAULT_BATCH_SIZE = 32
"""anomalib's default train and eval batch size, for data modules (and run configs) that do not say."""


def batch_size(datamodule: Any, stage: str) -> int:
    """The data module's ``train_batch_size`` or ``eval_batch_size`` (``stage``: ``train`` or ``eval``)."""
    return int(getattr(datamodule, f"{stage}_batch_size", None) or DEFAULT_BATCH_SIZE)


def decode_workers(datamodule: Any) -> int:
    """Threads decoding a split: the data module's ``num_workers``, at most this machine's cores."""
    return min(getattr(datamodule, "num_workers", 0) or 0, os.cpu_count() or 1)


def setup_splits(datamodule: Any, seed: int) -> dict[str, Any]:
    """Set the data module up once, with the run's seed, and return its non-empty splits.

    Args:
        datamodule: Any anomalib image data module.
        seed: Seed for its random splits (used when the data module has none).

    Returns:
        ``{"train": dataset, "val": dataset, "test": dataset}`` (splits that exist).

    Raises:
        DataError: If the data root is missing, setup fails or there are no training images.
    """
    root = getattr(datamodule, "root", None)
    if root is not None and not Path(root).exists():
        msg = f"data.init_args.root: {root} does not exist; point it at the dataset folder"
        raise DataError(msg)
    if getattr(datamodule, "seed", None) is None:
        datamodule.seed = seed
    try:
        datamodule.setup()
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - data modules raise anything; one clear line instead
        detail = " ".join(str(error).split())
        msg = f"data: {type(datamodule).__name__} could not be set up from root={root}: {detail}; check data.init_args"
        raise DataError(msg) from None
    splits = {name: getattr(datamodule, f"{name}_data", None) for name in ("train", "val", "test")}
    splits = {name: dataset for name, dataset in splits.items() if dataset is not None and len(dataset) > 0}
    if "train" not in splits:
        category = getattr(datamodule, "category", "")
        msg = (
            f"data: no training images found ({type(datamodule).__name__}, root={root}, category={category}); "
            "the dataset needs normal training images (e.g. <root>/<category>/train/good)"
        )
        raise DataError(msg)
    return splits


def calibration_indices(count: int, share: float, seed: int) -> list[int]:
    """Training images held out of fitting to learn the tile scales from: a seeded random ``share`` (at least one).

    Raises:
        DataError: If holding them out leaves no image to fit on.
    """
    if share <= 0:
        return []
    held = max(1, round(share * count))
    if held >= count:
        msg = (
            f"TrainModels.calibration_share: {share} of {count} training image(s) leaves none to fit on; "
            "lower it (0 holds none out) or add training images"
        )
        raise DataError(msg)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:held].tolist())


class SplitCache:
    """The decoded splits of one run.

    Records (paths, labels, masks) go to ``splits/<name>``; decoded images go to ``cache/`` while the
    tiles need them and are removed by :meth:`drop`. A split holding the same images as one already
    recorded (test = validation) is linked to it instead of being decoded again.

    Args:
        run: The run directory.
        image_size: Tiled image size ``(H, W)``.
        listener: Progress reporting.
    """

    def __init__(self, run: RunDirectory, image_size: Size, listener: ProgressListener) -> None:
        self.run = run
        self.image_size = image_size
        self.listener = listener

    @property
    def directory(self) -> Path:
        """Folder of decoded images."""
        return self.run.root / "cache"

    def decode(
        self, name: str, source: DatasetSource | FileSource, directory: Path, workers: int, *, images: bool = True
    ) -> tuple[SplitRecord, NpyFile | None]:
        """Decode a split once: its record in ``directory`` and (if ``images``) its image cache.

        Returns:
            The record and the image cache (None without images).
        """
        cache_file = self.directory / f"{split_fingerprint(source.image_paths, source.labels)}.images.npy"
        with Task(self.listener, f"Decoding {name} images", len(source)) as task:
            record = cache_split(
                source,
                self.image_size,
                directory,
                cache_file if images else None,
                workers,
                progress=task.update,
                with_masks=name not in NORMAL_SPLITS,
            )
        if images:
            logger.info("%s split: %d images decoded once into %s.", name, len(record), cache_file)
        return record, NpyFile(cache_file) if images else None

    def recorded(self, fingerprint: str, directory: Path) -> SplitRecord | None:
        """The split with this content: the one in ``directory``, else any other one linked into it."""
        if recorded_fingerprint(directory) == fingerprint:
            return SplitRecord.load(directory)
        splits = self.run.root / "splits"
        for other in sorted(splits.iterdir()) if splits.is_dir() else []:
            if other != directory and recorded_fingerprint(other) == fingerprint:
                return link_split(SplitRecord.load(other), directory)
        return None

    def drop(self) -> None:
        """Remove the decoded images (records stay)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def recorded_fingerprint(directory: Path) -> str | None:
    """Fingerprint of the split recorded in ``directory``, or None when there is none."""
    return SplitRecord.load(directory).fingerprint if (directory / "index.json").is_file() else None


def link_split(source: SplitRecord, directory: Path) -> SplitRecord:
    """Record, in ``directory``, a split that holds the same images as ``source`` (test = validation)."""
    directory.mkdir(parents=True, exist_ok=True)
    if source.has_masks:
        masks = directory / "masks.npy"
        masks.unlink(missing_ok=True)
        os.link(source.directory / "masks.npy", masks)
    record = SplitRecord(directory, source.image_paths, source.mask_paths, source.labels, source.has_masks)
    record.save()
    return record
