"""Data path: decode every image once per run, then serve tiles from a disk cache.

Any anomalib image data module (MVTecAD, Folder, Visa...) is set up once with the run's seed, so
every tile position sees the same split. Each split is then decoded, checked and resized to the
tiled image size *once* into an ``(N, H, W, C)`` uint8 ``.npy`` file; every tile's dataset reads
only the row band it needs with ``os.pread`` (no memory map, so the cache never counts towards the
process's resident memory). Paths, labels and masks of each split are kept in the run directory
(``splits/<split>``) so evaluation needs no data module to find its ground truth again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF  # noqa: N812 - torchvision's own alias
from torchvision.tv_tensors import Mask

from anomalib_tiled.errors import DataError
from anomalib_tiled.run import atomic_write_text
from anomalib_tiled.tiling import Size, TilePosition

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = -1


class NpyFile:
    """A ``.npy`` file of fixed shape read and written in row ranges with ``pread``/``pwrite``.

    The file stays a valid ``.npy`` (``numpy.load`` reads it) while no part of it is memory-mapped.

    Args:
        path: File path.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or np.dtype(dtype).hasobject:
            # Object arrays would be unpickled: never from a run directory.
            msg = f"{path}: not a plain numeric array file; the run directory is corrupt, train again"
            raise DataError(msg)
        self.shape: tuple[int, ...] = shape
        self.dtype = np.dtype(dtype)
        self.item_shape = shape[1:]
        self.item_bytes = int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> NpyFile:
        """Create a zero-filled (sparse) ``.npy`` file of ``shape``."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        with Path(path).open("wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            offset = handle.tell()
            handle.truncate(offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return cls(path)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, index: int, values: np.ndarray) -> None:
        """Write items ``index .. index + len(values)``."""
        data = np.ascontiguousarray(values, dtype=self.dtype)
        if data.shape[1:] != self.item_shape:
            msg = f"{self.path}: expected items of shape {self.item_shape}, got {data.shape[1:]}"
            raise ValueError(msg)
        with self.path.open("r+b") as handle:
            os.pwrite(handle.fileno(), data.tobytes(), self.offset + index * self.item_bytes)

    def read(self, index: int, count: int = 1) -> np.ndarray:
        """Items ``index .. index + count`` as ``(count, *item_shape)``."""
        return self._pread(index * self.item_bytes, count * self.item_bytes).reshape(count, *self.item_shape)

    def read_rows(self, index: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first item axis of item ``index``, as ``(stop - start, ...)``."""
        row_bytes = self.item_bytes // self.item_shape[0]
        raw = self._pread(index * self.item_bytes + start * row_bytes, (stop - start) * row_bytes)
        return raw.reshape(stop - start, *self.item_shape[1:])

    def _pread(self, position: int, size: int) -> np.ndarray:
        with self.path.open("rb") as handle:
            raw = os.pread(handle.fileno(), size, self.offset + position)
        if len(raw) != size:
            msg = f"{self.path}: file is truncated; delete it and run again"
            raise DataError(msg)
        return np.frombuffer(raw, dtype=self.dtype)


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

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> Any:
        """Decoded image, mask and label of one sample."""
        return self.dataset[index]


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


def collect_images(pattern: str | Path) -> list[str]:
    """Image files of a folder (recursively), a single file, or a glob pattern, sorted.

    Raises:
        DataError: If nothing matches.
    """
    import glob  # noqa: PLC0415

    from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: PLC0415 - the extensions anomalib accepts

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
        image = item.image
        if image.ndim == 2:
            image = image[None]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
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
        result["image"] = (resized.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
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


class TileDataset(Dataset):
    """The tile at one grid position of every image of a split, read from the image cache.

    Args:
        images: ``(N, H, W, 3)`` uint8 cache.
        record: The split's record (paths, labels, masks).
        position: Grid position to cut.
        augmentations: Optional torchvision transform applied to each tile (training only).
    """

    def __init__(
        self,
        images: NpyFile,
        record: SplitRecord,
        position: TilePosition,
        augmentations: Callable | None = None,
    ) -> None:
        self.images = images
        self.record = record
        self.masks = record.masks
        self.position = position
        self.augmentations = augmentations

    def __len__(self) -> int:
        return len(self.record)

    def __getitem__(self, index: int) -> Any:
        from anomalib.data import ImageItem  # noqa: PLC0415

        rows, cols = self.position.slices
        band = self.images.read_rows(index, rows.start, rows.stop)
        image = torch.from_numpy(band[:, cols].copy()).permute(2, 0, 1).float().div_(255)
        label = self.record.labels[index]
        gt_mask = None
        if self.masks is not None and label != UNKNOWN_LABEL:
            gt_mask = torch.from_numpy(self.masks.read_rows(index, rows.start, rows.stop)[:, cols].copy()).bool()
            # A tile is anomalous only if the defect reaches into it.
            label = int(gt_mask.any())
        if self.augmentations is not None:
            if gt_mask is not None:
                image, gt_mask = self.augmentations(image, Mask(gt_mask))
            else:
                image = self.augmentations(image)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=None if label == UNKNOWN_LABEL else torch.tensor(label),
            image_path=self.record.image_paths[index],
            mask_path=self.record.mask_paths[index] or None,
        )


def tile_loader(dataset: TileDataset, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """DataLoader of tiles; reading crops from the cache is cheap, so no worker processes."""
    from anomalib.data import ImageBatch  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=ImageBatch.collate, generator=generator
    )


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


def datamodule_spec(datamodule: Any) -> dict[str, Any]:
    """``{class_path, init_args}`` of a data module instance, as far as its attributes tell."""
    import inspect  # noqa: PLC0415

    from anomalib_tiled.config import as_yaml_value  # noqa: PLC0415

    cls = type(datamodule)
    init_args = {}
    for name in inspect.signature(cls.__init__).parameters:
        for attribute in (name, f"_{name}"):
            value = getattr(datamodule, attribute, None)
            if isinstance(value, str | int | float | bool | Path | list | tuple) or hasattr(value, "value"):
                init_args[name] = as_yaml_value(value)
                break
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
