"""HTML report: collector values, plots, JSON round trip, rendering, and a real browser."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_tiled.merge.merging import MergedBatch
from anomalib_tiled.report import ReportCollector, ReportData, load_report_data, plots, render_report
from anomalib_tiled.report.curves import PRO_FPR_LIMIT
from anomalib_tiled.report.data import Curve, Histogram, TileGridSummary
from anomalib_tiled.report.gallery import PANEL_GAP
from anomalib_tiled.sinks.metrics import MetricSuite
from anomalib_tiled.tiling import TileGrid

SIZE = 64
GRID = TileGrid.create(SIZE, 32)
THRESHOLD = 0.5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = {"model": "Padim", "grid": "2x2 tiles of 32 px", "stages": {"normalization": "image"}, "seed": 42}


Batches = list[MergedBatch]
"""A fake evaluation: batches of merged predictions with their tile scores."""


def source_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Small textured PNGs for the gallery to read."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 180, SIZE)[None, :, None] + np.linspace(0, 40, SIZE)[:, None, None]
    paths = []
    for index in range(count):
        pixels = np.clip(ramp + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{index:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def blob_mask(top: int, left: int, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


def make_batch(
    paths: list[str],
    anomalous: list[bool],
    seed: int,
    labelled: bool = True,
    perfect: bool = False,
) -> MergedBatch:
    """Random low maps; anomalous images get a blob of random strength, some normal ones a bright speck.

    With ``perfect``, the maps are the ground-truth masks. The last tile position's scores are noise,
    so the tile-grid view has a weak position to show.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    maps = uniform(0.0, 0.45, (len(paths), SIZE, SIZE))
    masks = torch.zeros(len(paths), SIZE, SIZE, dtype=torch.bool)
    for index, defect in enumerate(anomalous):
        top, left = (int(v) for v in torch.randint(0, SIZE - 8, (2,), generator=generator))
        if defect:
            masks[index] = blob_mask(top, left)
            maps[index][masks[index]] = float(uniform(0.35, 1.0)) * uniform(0.7, 1.0, (64,))
        elif float(uniform(0, 1)) < 0.4:
            maps[index][blob_mask(top, left, 3)] = float(uniform(0.5, 0.8))
    if perfect:
        maps = masks.float()
    tile_scores = GRID.tile(maps).amax(dim=(-2, -1))
    tile_scores[:, -1] = uniform(0.0, 1.0, (len(paths),))
    return MergedBatch(
        image_path=paths,
        anomaly_map=maps,
        pred_score=maps.amax(dim=(-2, -1)),
        pred_mask=maps >= THRESHOLD,
        gt_mask=masks if labelled else None,
        gt_label=torch.tensor(anomalous) if labelled else None,
        tile_scores=tile_scores,
    )


def synthetic(folder: Path, n_batches: int = 3, batch_size: int = 4, **kwargs: bool) -> Batches:
    paths = source_images(folder, n_batches * batch_size)
    batches = []
    for b in range(n_batches):
        chunk = paths[b * batch_size : (b + 1) * batch_size]
        batches.append(make_batch(chunk, [i % 2 == 1 for i in range(len(chunk))], seed=b, **kwargs))
    return batches


def collect(batches: Batches, gallery_size: int = 3, threshold: float | None = THRESHOLD) -> ReportCollector:
    collector = ReportCollector(GRID, threshold, (0.0, 1.0), gallery_size=gallery_size, max_side=128)
    for batch in batches:
        collector.update(batch)
    return collector


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportData]:
    """One rendered report of the synthetic evaluation."""
    folder = tmp_path_factory.mktemp("report")
    collector = collect(synthetic(folder / "images"))
    data = collector.finish(folder, {"image_AUROC": 0.97, "pixel_AUROC": 0.93}, SETTINGS, {"merge": 1.25})
    render_report(data, folder)
    return folder, data


def open_png(png: bytes) -> Image.Image:
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    return image.convert("RGB")


def has_colour(image: Image.Image, rgb: tuple[int, int, int], tolerance: int = 30) -> bool:
    pixels = np.asarray(image).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).any())


def non_white_fraction(image: Image.Image) -> float:
    return float((np.asarray(image) < 240).any(axis=-1).mean())


# ------------------------------------------------------------------------------------------------
# plots

TAB_BLUE = (31, 119, 180)
TRANSLUCENT_RED = (237, 158, 158)  # tab:red at the histograms' alpha, over white


def test_every_plot_draws_its_data(report_dir: tuple[Path, ReportData]) -> None:
    _, data = report_dir
    drawn = {
        "image_roc": (plots.image_roc_plot(data.image_roc), TAB_BLUE),
        "image_pr": (plots.image_pr_plot(data.image_pr), TAB_BLUE),
        "pixel_roc": (plots.pixel_roc_plot(data.pixel_roc), TAB_BLUE),
        "pro": (plots.pro_plot(data.pro), TAB_BLUE),
        "f1": (plots.f1_threshold_plot(data.f1, THRESHOLD), TAB_BLUE),
        "histogram": (plots.score_histogram_plot(data.histogram, THRESHOLD), TRANSLUCENT_RED),
        "tile_grid": (plots.tile_grid_plot(data.tile_grid), (0, 0, 0)),
    }
    placeholder = open_png(plots.placeholder_png("y"))
    for name, (png, colour) in drawn.items():
        image = open_png(png)
        assert image.width >= 400 and image.height >= 300, name
        assert has_colour(image, colour), name
        # A real plot has far more ink than a placeholder sentence.
        assert non_white_fraction(image) > 3 * non_white_fraction(placeholder), name


@pytest.mark.parametrize(
    "draw",
    [
        lambda: plots.image_roc_plot(Curve(note="no anomalous images: the curve needs both classes")),
        lambda: plots.image_pr_plot(Curve()),
        lambda: plots.pixel_roc_plot(Curve(note="no pixels with ground truth")),
        lambda: plots.pro_plot(Curve(x=[0.0, float("nan")], y=[0.0])),  # malformed: must not raise
        lambda: plots.f1_threshold_plot(Curve(), None),
        lambda: plots.f1_threshold_plot(Curve([0.1, 0.2], [0.5, 0.7], [0.1, 0.2], 0.7), None),
        lambda: plots.score_histogram_plot(Histogram(note="no images"), None),
        lambda: plots.tile_grid_plot(TileGridSummary((2, 2), ["a", "b", "c", "d"], [None] * 4, ["none"] * 4)),
        lambda: plots.tile_grid_plot(TileGridSummary()),
    ],
)
def test_plots_of_degenerate_inputs_are_placeholders_not_errors(draw) -> None:
    image = open_png(draw())
    assert image.width >= 400
    assert non_white_fraction(image) > 0.001  # at least the reason is written


def test_tile_grid_makes_the_weak_position_stand_out() -> None:
    summary = TileGridSummary((2, 2), [f"t{i}" for i in range(4)], [0.99, 0.98, 0.52, 0.97], ["auroc"] * 4)
    image = open_png(plots.tile_grid_plot(summary))
    # RdYlGn: the weak cell is red, the good ones green.
    assert has_colour(image, (165, 0, 38), 40)
    assert has_colour(image, (0, 104, 55), 40)


# ------------------------------------------------------------------------------------------------
# collector values


def test_pixel_roc_runs_from_origin_to_one(report_dir: tuple[Path, ReportData]) -> None:
    _, data = report_dir
    roc = data.pixel_roc
    assert (roc.x[0], roc.y[0]) == (0.0, 0.0)
    assert (roc.x[-1], roc.y[-1]) == (1.0, 1.0)
    assert all(b >= a for a, b in zip(roc.x, roc.x[1:], strict=False))
    assert len(roc.x) <= 1002


def test_curve_areas_agree_with_the_metric_suite(tmp_path: Path) -> None:
    batches = synthetic(tmp_path)
    suite = MetricSuite(["AUROC"], ["AUROC"], (0.0, 1.0))
    for batch in batches:
        suite.update(batch)
    expected = suite.compute()
    data = collect(batches).finish(tmp_path, expected, {}, {})
    assert data.image_roc.area == pytest.approx(expected["image_AUROC"], abs=1e-6)
    assert 0.5 < data.pixel_roc.area < 1.0
    assert data.pixel_roc.area == pytest.approx(expected["pixel_AUROC"], abs=0.01)  # 1000 vs 32768 bins


def test_pro_of_a_perfect_map_is_one_at_low_fpr(tmp_path: Path) -> None:
    collector = collect(synthetic(tmp_path, perfect=True))
    data = collector.finish(tmp_path, {}, {}, {})
    pro = data.pro
    at_zero = [y for x, y in zip(pro.x, pro.y, strict=True) if x == 0.0]
    assert max(at_zero) == pytest.approx(1.0)
    assert pro.area == pytest.approx(1.0, abs=1e-6)
    assert data.pixel_roc.area == pytest.approx(1.0, abs=1e-6)
    assert collector.regions == 6  # one blob per anomalous image


def test_pro_agrees_with_anomalib(tmp_path: Path) -> None:
    from anomalib.metrics import AUPRO

    batches = synthetic(tmp_path)
    collector = collect(batches)
    reference = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=PRO_FPR_LIMIT)
    for batch in batches:
        reference.update(batch)
    assert collector.finish(tmp_path, {}, {}, {}).pro.area == pytest.approx(float(reference.compute()), abs=0.02)


def test_per_tile_labels_follow_the_ground_truth(tmp_path: Path) -> None:
    paths = source_images(tmp_path, 2)
    batch = make_batch(paths, [False, False], seed=0)
    batch.gt_mask[1] = blob_mask(40, 2, 4) | blob_mask(30, 30, 4)  # bottom-left, and across all four tiles
    batch.gt_label = torch.tensor([False, True])
    collector = ReportCollector(GRID, THRESHOLD, (0.0, 1.0))
    collector.update(batch)
    assert collector.records[0].tile_labels == (False, False, False, False)
    assert collector.records[1].tile_labels == (True, True, True, True)
    batch.gt_mask[1] = blob_mask(40, 2, 4)
    collector.update(batch)
    assert collector.records[3].tile_labels == (False, False, True, False)
    assert collector.records[3].tile_scores == tuple(batch.tile_scores[1].tolist())


def test_galleries_keep_exactly_the_worst_images(tmp_path: Path) -> None:
    paths = source_images(tmp_path / "images", 12)
    scores = torch.tensor([0.9, 0.2, 0.7, 0.8, 0.6, 0.3, 0.95, 0.1, 0.55, 0.65, 0.4, 0.52])
    truth = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    collector = ReportCollector(GRID, THRESHOLD, (0.0, 1.0), gallery_size=3, max_side=64)
    for start in range(0, 12, 4):
        batch = make_batch(paths[start : start + 4], truth[start : start + 4].tolist(), seed=start)
        batch.pred_score = scores[start : start + 4]
        collector.update(batch)
    kept = {key: [c.score for c in heap.candidates()] for key, heap in collector.galleries.items()}
    assert kept["top"] == pytest.approx([0.95, 0.9, 0.8])
    # Normal images predicted anomalous (score >= 0.5), highest first: 0.95, 0.9, 0.7 (not 0.6 or 0.55).
    assert kept["false_positives"] == pytest.approx([0.95, 0.9, 0.7])
    # Anomalous images predicted normal, lowest first.
    assert kept["false_negatives"] == pytest.approx([0.1, 0.2, 0.3])
    data = collector.finish(tmp_path, {}, {}, {})
    assert [g.key for g in data.galleries] == ["top", "false_positives", "false_negatives"]
    for gallery in data.galleries:
        assert len(gallery.items) == 3
        for item in gallery.items:
            with Image.open(tmp_path / item.file) as picture:
                assert picture.size == (3 * 64 + 2 * PANEL_GAP, 64)  # original | ground truth | heat map


def test_unlabeled_images_get_only_the_top_gallery_and_a_note(tmp_path: Path) -> None:
    collector = collect(synthetic(tmp_path / "images", labelled=False), threshold=None)
    data = collector.finish(tmp_path, {}, SETTINGS, {})
    assert [g.key for g in data.galleries] == ["top"]
    assert "unlabeled" in data.note
    assert data.image_roc.note and data.pixel_roc.note
    assert data.tile_grid.kinds == ["std"] * 4
    page = render_report(data, tmp_path).read_text(encoding="utf-8")
    assert "unlabeled" in page


def _tensor_bytes(value: object, seen: set[int]) -> int:
    """Bytes of every tensor reachable from ``value`` (objects, containers), each counted once."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__"):
        return _tensor_bytes(vars(value), seen)
    return 0


def test_memory_stays_flat_in_the_number_of_images(tmp_path: Path) -> None:
    paths = source_images(tmp_path, 4)
    collector = ReportCollector(GRID, THRESHOLD, (0.0, 1.0), gallery_size=2)
    sizes = {}
    for index in range(40):
        collector.update(make_batch(paths, [False, True, False, True], seed=index))
        if index + 1 in (10, 40):
            assert all(len(heap) == 2 for heap in collector.galleries.values())
            sizes[index + 1] = _tensor_bytes(collector, set())
    assert sizes[10] == sizes[40] > 0
    # Per image, only scalars: path, score, labels and one row of tile scores and tile labels.
    assert len(collector.records) == 160
    assert all(isinstance(v, (str, float, bool, tuple)) or v is None for v in vars(collector.records[-1]).values())


def test_report_data_round_trips_through_json_and_re_renders(
    report_dir: tuple[Path, ReportData], tmp_path: Path
) -> None:
    folder, data = report_dir
    assert load_report_data(folder) == data
    assert load_report_data(folder / "report_data.json") == ReportData.from_json(data.to_json())
    assert len((folder / "report_data.json").read_text(encoding="utf-8")) < 200_000
    # `anomalib tiled report` re-renders from the JSON alone: the same page.
    again = render_report(load_report_data(folder), tmp_path)
    assert again.read_text(encoding="utf-8") == (folder / "report.html").read_text(encoding="utf-8")


def test_report_without_anomalous_images_renders_with_the_note(tmp_path: Path) -> None:
    paths = source_images(tmp_path / "images", 4)
    collector = ReportCollector(GRID, THRESHOLD, (0.0, 1.0), max_side=64)
    collector.update(make_batch(paths, [False] * 4, seed=1))
    note = "No anomalous images in the test split: image AUROC <is> undefined."
    data = collector.finish(tmp_path, {}, SETTINGS, {}, note=note)
    page = render_report(data, tmp_path).read_text(encoding="utf-8")
    assert "No anomalous images in the test split: image AUROC &lt;is&gt; undefined." in page
    assert '<table id="metrics">' in page and "No metric could be computed" in page
    assert page.count('class="plot"') == 7
    assert "No anomalous images" in collector.finish(tmp_path, {}, SETTINGS, {}).note  # written when none is given


def test_missing_tile_scores_and_source_images_do_not_stop_the_report(tmp_path: Path) -> None:
    paths = source_images(tmp_path / "images", 4)
    batch = make_batch(paths, [False, True, False, True], seed=2)
    batch.tile_scores = None
    Path(paths[0]).unlink()  # a source moved after evaluation
    collector = ReportCollector(GRID, THRESHOLD, (0.0, 1.0), gallery_size=4, max_side=64)
    collector.update(batch)
    data = collector.finish(tmp_path, {}, {}, {})
    assert data.tile_grid.note == "no tile scores were recorded"
    assert len(data.galleries[0].items) == 4
    page = render_report(data, tmp_path).read_text(encoding="utf-8")
    assert page.count('class="plot"') == 7  # the tile-grid plot says why it is empty instead
    for item in data.galleries[0].items:  # the moved source too gets a valid picture
        assert f'src="{item.file}"' in page
        open_png((tmp_path / item.file).read_bytes())


# ------------------------------------------------------------------------------------------------
# a real browser


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.ids: set[str] = set()
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "img":
            self.images.append(attributes)
        if tag == "section":
            self.sections.append(attributes.get("class", ""))


def _chromium() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium); CI must run the browser test")
        pytest.skip("chromium is not installed")
    return binary


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow
def test_report_opens_in_a_real_browser(report_dir: tuple[Path, ReportData], tmp_path: Path) -> None:
    binary = _chromium()
    folder, data = report_dir
    url = (folder / "report.html").as_uri()
    dom = _Dom()
    dom.feed(_browser(binary, tmp_path / "profile", "--dump-dom", url).stdout)
    assert {"metrics", "settings", "timings"} <= dom.ids
    plot_images = [img for img in dom.images if "plot" in img.get("class", "").split()]
    assert len(plot_images) == 7
    assert dom.sections.count("gallery") == 3
    gallery_files = [img["src"] for img in dom.images if img["src"].startswith("gallery/")]
    assert gallery_files == [item.file for gallery in data.galleries for item in gallery.items]
    assert len(gallery_files) >= 4
    for img in dom.images:  # no broken image: every source decodes as a PNG
        source = img["src"]
        if source.startswith("data:image/png;base64,"):
            open_png(base64.b64decode(source.split(",", 1)[1]))
        else:
            open_png((folder / source).read_bytes())

    screenshot = tmp_path / "screenshot.png"
    _browser(binary, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", url)
    image = open_png(screenshot.read_bytes())
    assert image.size == (1280, 2000)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 500
    assert non_white_fraction(image) > 0.03  # plots are mostly white too; a blank page has ~0
    assert has_colour(image, TAB_BLUE, 10)  # the curves were painted
