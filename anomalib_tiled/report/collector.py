"""Collects what the report shows while evaluation streams merged predictions, in flat memory.

Per image only scalars are kept (path, score, labels, one row of tile scores and tile labels).
Per-pixel information is reduced on the fly: pixel ROC and PRO into counts over fixed thresholds,
pictures into a few bounded galleries. :meth:`ReportCollector.finish` turns it all into
:class:`~anomalib_tiled.report.data.ReportData` and writes the gallery pictures and the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anomalib_tiled.merge.merging import MergedBatch
from anomalib_tiled.report.curves import image_curves, pixel_curves, score_histogram, tile_grid_summary
from anomalib_tiled.report.data import REPORT_DATA, Gallery, GalleryItem, ReportData
from anomalib_tiled.report.gallery import BoundedHeap, Candidate, gallery_picture
from anomalib_tiled.run.directory import atomic_write_text
from anomalib_tiled.sinks.aupro import region_overlap
from anomalib_tiled.sinks.binning import binned_confusion, binned_thresholds
from anomalib_tiled.sinks.visualization import output_name
from anomalib_tiled.tiling import TileGrid

CURVE_BINS = 1000
"""Thresholds of the pixel ROC and PRO curves (a plot needs no more; the metrics table is exact)."""

GALLERY_TITLES = {
    "top": "Highest-scored images",
    "false_positives": "Worst false positives (normal images predicted anomalous, highest score first)",
    "false_negatives": "Worst false negatives (anomalous images predicted normal, lowest score first)",
}


@dataclass
class ImageRecord:
    """The scalars kept for one image.

    Attributes:
        path: Source image.
        score: Image score.
        pred_label: Predicted label, or None.
        gt_label: Ground-truth label, or None.
        tile_scores: Score of each tile (row-major), or None.
        tile_labels: Whether each tile's ground truth has an anomalous pixel, or None.
    """

    path: str
    score: float
    pred_label: bool | None
    gt_label: bool | None
    tile_scores: tuple[float, ...] | None
    tile_labels: tuple[bool, ...] | None


class ReportCollector:
    """Accumulates an evaluation's report, batch by batch.

    Args:
        grid: Tile grid of the run.
        image_threshold: Image-score threshold (labels images without predicted labels), or None.
        pixel_range: Range of anomaly-map values; the pixel-curve thresholds and the heat-map
            colours span it.
        gallery_size: Pictures per gallery.
        max_side: Longest side of each gallery panel in pixels.
    """

    def __init__(
        self,
        grid: TileGrid,
        image_threshold: float | None,
        pixel_range: tuple[float, float],
        gallery_size: int = 6,
        max_side: int = 1024,
    ) -> None:
        self.grid = grid
        self.image_threshold = image_threshold
        self.pixel_range = pixel_range
        self.max_side = max_side
        self.records: list[ImageRecord] = []
        self.thresholds = binned_thresholds(pixel_range, CURVE_BINS)
        self.confusion = torch.zeros(CURVE_BINS, 2, 2, dtype=torch.long)
        self.overlap_sum = torch.zeros(CURVE_BINS, dtype=torch.float64)
        self.regions = 0
        self.galleries = {key: BoundedHeap(gallery_size) for key in GALLERY_TITLES}

    def update(self, batch: MergedBatch) -> None:
        """Add one batch of merged predictions, with whatever ground truth and tile scores are known."""
        tile_scores = batch.tile_scores
        pred_labels = self._pred_labels(batch)
        tile_labels = self._tile_labels(batch.gt_mask)
        if batch.gt_mask is not None:
            # The counts live on the CPU, whatever device the batch comes from.
            maps, masks = batch.anomaly_map.detach().cpu(), batch.gt_mask.detach().cpu()
            self.confusion += binned_confusion(maps, masks, self.thresholds)
            for anomaly_map, gt_mask in zip(maps, masks, strict=True):
                overlap, regions = region_overlap(anomaly_map, gt_mask, self.thresholds)
                self.overlap_sum += overlap
                self.regions += regions
        for offset, path in enumerate(batch.image_path):
            record = ImageRecord(
                path,
                float(batch.pred_score[offset]),
                _item(pred_labels, offset),
                _item(batch.gt_label, offset),
                None if tile_scores is None else tuple(tile_scores[offset].float().tolist()),
                None if tile_labels is None else tuple(tile_labels[offset].tolist()),
            )
            self.records.append(record)
            self._offer(record, batch, offset)

    def finish(
        self,
        directory: Path,
        metrics: dict[str, float],
        settings: dict[str, Any],
        timings: dict[str, float],
        note: str | None = None,
    ) -> ReportData:
        """Compute the report's content, write the gallery pictures and ``report_data.json``.

        Args:
            directory: Report folder; pictures go to its ``gallery/`` subfolder.
            metrics: Metric values of the evaluation (may be empty).
            settings: Run settings to list (model, grid, stages, seed, versions...); nested dicts
                are listed as dotted keys, and ``model``, ``data`` and ``category`` name the title.
            timings: Durations in seconds, by stage.
            note: Why metrics are missing, or anything the reader should know first; when None a
                note is written if the images are unlabeled or of one class only.

        Returns:
            The report data, ready for :func:`~anomalib_tiled.report.html.render_report`.
        """
        scores = torch.tensor([r.score for r in self.records], dtype=torch.float64)
        labels = torch.tensor([-1 if r.gt_label is None else int(r.gt_label) for r in self.records], dtype=torch.long)
        data = ReportData(
            title=_title(settings),
            metrics=dict(metrics),
            settings=dict(settings),
            timings=dict(timings),
            note=note if note is not None else _default_note(labels),
            image_threshold=self.image_threshold,
            counts=self._counts(labels),
            histogram=score_histogram(scores, labels, self.image_threshold),
            tile_grid=tile_grid_summary(self.grid, *self._tile_arrays()),
        )
        data.image_roc, data.image_pr, data.f1 = image_curves(scores, labels)
        data.pixel_roc, data.pro = pixel_curves(self.confusion, self.overlap_sum, self.regions)
        data.galleries = self._write_galleries(Path(directory))
        atomic_write_text(Path(directory) / REPORT_DATA, data.to_json())
        return data

    def _pred_labels(self, batch: MergedBatch) -> torch.Tensor | None:
        """Predicted labels, from the threshold when the batch has none."""
        if batch.pred_label is not None:
            return batch.pred_label.bool()
        if self.image_threshold is None:
            return None
        return batch.pred_score >= self.image_threshold

    def _tile_labels(self, gt_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``(B, n_tiles)``: whether each tile's slice of the ground truth has an anomalous pixel."""
        if gt_mask is None:
            return None
        return torch.stack([gt_mask[:, p.slices[0], p.slices[1]].flatten(1).any(1) for p in self.grid.positions], 1)

    def _offer(self, record: ImageRecord, batch: MergedBatch, offset: int) -> None:
        """Offer an image to the galleries it belongs to."""

        def make() -> Candidate:
            # Copies: the batch's tensors must not be kept alive by a gallery.
            return Candidate(
                record.path,
                record.score,
                record.pred_label,
                record.gt_label,
                batch.anomaly_map[offset].detach().cpu().clone(),
                None if batch.pred_mask is None else batch.pred_mask[offset].detach().cpu().clone(),
                None if batch.gt_mask is None else batch.gt_mask[offset].detach().cpu().clone(),
            )

        self.galleries["top"].offer(record.score, make)
        if record.gt_label is None or record.pred_label is None:
            return
        if not record.gt_label and record.pred_label:
            self.galleries["false_positives"].offer(record.score, make)
        elif record.gt_label and not record.pred_label:
            self.galleries["false_negatives"].offer(-record.score, make)

    def _tile_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, n_tiles)`` tile scores and labels (-1 unknown) of the images with tile scores."""
        rows = [r for r in self.records if r.tile_scores is not None]
        if not rows:
            return torch.zeros(0, len(self.grid)), torch.zeros(0, len(self.grid), dtype=torch.long)
        scores = torch.tensor([r.tile_scores for r in rows], dtype=torch.float64)
        labels = torch.tensor(
            [[-1] * len(self.grid) if r.tile_labels is None else [int(v) for v in r.tile_labels] for r in rows]
        )
        return scores, labels

    def _counts(self, labels: torch.Tensor) -> dict[str, int]:
        counts = {
            "images": len(self.records),
            "normal": int((labels == 0).sum()),
            "anomalous": int((labels == 1).sum()),
        }
        counts["unlabeled"] = int((labels < 0).sum())
        counts["gt_regions"] = self.regions
        return counts

    def _write_galleries(self, directory: Path) -> list[Gallery]:
        """Draw and write every gallery's pictures; galleries without labels to sort by are left out."""
        folder = directory / "gallery"
        galleries = []
        labelled = any(r.gt_label is not None for r in self.records)
        for key, heap in self.galleries.items():
            if key != "top" and not labelled:
                continue
            gallery = Gallery(key, GALLERY_TITLES[key])
            for rank, candidate in enumerate(heap.candidates()):
                name = f"gallery/{key}_{output_name(candidate.image_path, rank)}.png"
                folder.mkdir(parents=True, exist_ok=True)
                picture = gallery_picture(candidate, self.grid, self.pixel_range, self.max_side)
                picture.save(directory / name, format="PNG", compress_level=6)
                item = GalleryItem(
                    name, candidate.image_path, candidate.score, candidate.pred_label, candidate.gt_label
                )
                gallery.items.append(item)
            galleries.append(gallery)
        return galleries


def _title(settings: dict[str, Any]) -> str:
    """Report title, naming the model and data when the settings do."""
    subject = " / ".join(str(settings[key]) for key in ("model", "data", "category") if settings.get(key))
    return "Tiled anomaly detection report" + (f": {subject}" if subject else "")


def _item(values: torch.Tensor | None, offset: int) -> bool | None:
    return None if values is None else bool(values[offset])


def _default_note(labels: torch.Tensor) -> str | None:
    """What the reader should know when the images cannot be fully evaluated."""
    if labels.numel() == 0:
        return "No images were evaluated."
    if bool((labels < 0).all()):
        return "The images are unlabeled (prediction run): only scores, maps and the top-scored images are shown."
    if not bool((labels == 1).any()):
        return "No anomalous images in this split: image curves and most metrics cannot be computed."
    if not bool((labels == 0).any()):
        return "No normal images in this split: image curves cannot be computed."
    return None
