"""Split cache: each split decoded once into an ``.npy`` image cache, its record kept, identical splits linked."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageItem
from hypothesis import given
from hypothesis import strategies as st
from torchvision.tv_tensors import Mask

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.data.sources import UNKNOWN_LABEL, FileSource
from anomalib_tiled.data.splits import SplitCache, SplitRecord, cache_split, split_fingerprint
from anomalib_tiled.errors import DataError
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.run.directory import RunDirectory
from tests.fakes import write_png

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _half_and_half(height: int = 8, width: int = 12) -> np.ndarray:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return pixels


class MaskedSource:
    """A split with pixel ground truth: 8x8 images, the anomalous ones with a 4x4 defect in the top-left corner."""

    has_masks = True

    def __init__(self, labels: list[int], mask_size: int = 8) -> None:
        self.labels = labels
        self.image_paths = [f"/data/test/{index:03d}.png" for index in range(len(labels))]
        self.mask_paths = [f"/data/ground_truth/{i:03d}_mask.png" if label else "" for i, label in enumerate(labels)]
        self.mask_size = mask_size

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> ImageItem:
        mask = torch.zeros(self.mask_size, self.mask_size, dtype=torch.bool)
        if self.labels[index]:
            mask[:4, :4] = True
        image = torch.full((3, 8, 8), index / 10)
        return ImageItem(
            image=image,
            gt_mask=Mask(mask),
            gt_label=torch.tensor(self.labels[index]),
            image_path=self.image_paths[index],
            mask_path=self.mask_paths[index],
        )


@pytest.fixture
def cache(tmp_path: Path) -> SplitCache:
    return SplitCache(RunDirectory(tmp_path / "run"), (4, 4), ProgressListener())


def test_files_are_decoded_resized_into_an_image_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = [
        write_png(tmp_path / "a.png", _half_and_half()),
        write_png(tmp_path / "gray.png", np.full((8, 12), 77)),  # one channel: repeated three times
        write_png(tmp_path / "small.png", np.full((2, 3, 3), (10, 20, 30))),  # smaller: upsampled
    ]
    seen = []
    with caplog.at_level(logging.WARNING):
        record = cache_split(
            FileSource(paths), (4, 6), tmp_path / "split", tmp_path / "cache" / "images.npy", 2, seen.append
        )
    images = np.load(tmp_path / "cache" / "images.npy")
    assert images.shape == (3, 4, 6, 3) and images.dtype == np.uint8
    assert (images[0, :, 0] == RED).all() and (images[0, :, -1] == BLUE).all()  # height x width x channel
    assert (images[0, :, 1, 0] > images[0, :, 4, 0]).all()  # red fades towards the blue half
    assert (images[1] == 77).all()
    assert (images[2] == (10, 20, 30)).all()
    assert "1 image(s) are smaller than the tiled image size (4, 6)" in caplog.text
    assert seen == [1, 2, 3]
    assert record.image_paths == paths and record.labels == [UNKNOWN_LABEL] * 3
    assert not record.has_masks and record.masks is None
    assert SplitRecord.load(tmp_path / "split") == record
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["images.npy"]  # no partial file left


def test_masks_are_resized_with_the_images(tmp_path: Path) -> None:
    record = cache_split(MaskedSource([0, 1, 1]), (4, 4), tmp_path / "split", None, 1)
    assert record.labels == [0, 1, 1] and record.has_masks
    masks = record.masks.read(0, 3)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(masks, [np.zeros((4, 4)), expected, expected])
    assert not list((tmp_path / "split").glob("*images*"))  # no image cache asked for
    unmasked = cache_split(MaskedSource([0, 1]), (4, 4), tmp_path / "train", None, 1, with_masks=False)
    assert not unmasked.has_masks and not (tmp_path / "train" / "masks.npy").exists()


def test_split_record_round_trips(tmp_path: Path) -> None:
    record = SplitRecord(tmp_path / "val", ["/d/ä 1.png", "/d/b.png"], ["/d/m.png", ""], [1, 0], has_masks=True)
    (tmp_path / "val").mkdir()
    record.save()
    loaded = SplitRecord.load(tmp_path / "val")
    assert loaded == record
    assert loaded.fingerprint == record.fingerprint == split_fingerprint(record.image_paths, record.labels)
    assert len(loaded) == 2


@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=8), st.sampled_from([-1, 0, 1])), min_size=1, max_size=6),
    st.data(),
)
def test_fingerprint_changes_with_paths_and_labels(items: list[tuple[str, int]], data: st.DataObject) -> None:
    paths, labels = [p for p, _ in items], [label for _, label in items]
    fingerprint = split_fingerprint(paths, labels)
    assert fingerprint == split_fingerprint(list(paths), list(labels))
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    index = data.draw(st.integers(0, len(items) - 1))
    other_label = data.draw(st.sampled_from([-1, 0, 1]).filter(lambda label: label != labels[index]))
    relabelled = [*labels[:index], other_label, *labels[index + 1 :]]
    assert split_fingerprint(paths, relabelled) != fingerprint
    renamed = [*paths[:index], paths[index] + "x", *paths[index + 1 :]]
    assert split_fingerprint(renamed, labels) != fingerprint
    assert split_fingerprint([*paths, "extra.png"], [*labels, 0]) != fingerprint


def test_recorded_links_a_split_with_the_same_content(cache: SplitCache) -> None:
    run = cache.run
    val, images = cache.decode("val", MaskedSource([0, 1]), run.split_dir("val"), 1)
    assert images is not None and images.shape == (2, 4, 4, 3)
    assert images.path == cache.directory / f"{val.fingerprint}.images.npy"
    assert cache.recorded(val.fingerprint, run.split_dir("val")) == val  # already there

    test = cache.recorded(val.fingerprint, run.split_dir("test"))
    assert test is not None and test.directory == run.split_dir("test")
    assert (test.image_paths, test.labels, test.mask_paths) == (val.image_paths, val.labels, val.mask_paths)
    linked = (run.split_dir("test") / "masks.npy").stat()
    original = (run.split_dir("val") / "masks.npy").stat()
    assert linked.st_ino == original.st_ino and original.st_nlink == 2  # a hard link, not a copy
    assert SplitRecord.load(run.split_dir("test")) == test

    assert cache.recorded("0000000000000000", run.split_dir("other")) is None
    assert not run.split_dir("other").exists()
    cache.drop()
    assert not cache.directory.exists() and (run.split_dir("val") / "index.json").is_file()


def test_recorded_finds_nothing_without_splits(cache: SplitCache) -> None:
    assert cache.recorded("0123456789abcdef", cache.run.split_dir("test")) is None


def test_training_images_are_decoded_without_masks(cache: SplitCache) -> None:
    record, images = cache.decode("train", MaskedSource([0, 0]), cache.run.split_dir("train"), 1, images=False)
    assert images is None and not record.has_masks
    assert not cache.directory.exists() or not list(cache.directory.iterdir())


def test_a_corrupt_image_is_one_data_error_naming_the_file(tmp_path: Path) -> None:
    good = write_png(tmp_path / "good.png", _half_and_half())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError) as error:
        cache_split(FileSource([good, str(broken), good]), (4, 6), tmp_path / "split", tmp_path / "images.npy", 2)
    message = str(error.value)
    assert message.startswith(f"{broken}: cannot read image or mask (") and message.endswith("fix or remove the file")
    assert "\n" not in message
    assert not (tmp_path / "split" / "index.json").exists()  # the split is not recorded as complete
    assert not (tmp_path / "images.npy").exists()


def test_a_mask_of_another_size_names_both_files(tmp_path: Path) -> None:
    source = MaskedSource([1, 0], mask_size=6)
    expected = "mask /data/ground_truth/000_mask.png is 6x6 but its image /data/test/000.png is 8x8"
    with pytest.raises(DataError, match=expected):
        cache_split(source, (4, 4), tmp_path / "split", None, 1)


def test_npy_cache_reads_row_bands(tmp_path: Path) -> None:
    """What each tile's dataset reads from the image cache: a band of rows of one image."""
    paths = [write_png(tmp_path / f"{i}.png", np.full((8, 12, 3), 40 * i)) for i in range(3)]
    cache_split(FileSource(paths), (4, 6), tmp_path / "split", tmp_path / "images.npy", 1)
    images = NpyFile(tmp_path / "images.npy")
    assert len(images) == 3 and images.item_shape == (4, 6, 3)
    band = images.read_rows(2, 1, 3)
    assert band.shape == (2, 6, 3) and (band == 80).all()
