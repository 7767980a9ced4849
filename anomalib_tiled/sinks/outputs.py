"""Outputs of an evaluation or a prediction: metrics files, ``predictions.csv``, result pictures, maps.

Merged predictions are streamed through *sinks* (anything with ``update(batch)``: the metric suite,
the :class:`OutputWriter`, the report collector), a few images at a time, so memory stays flat.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from anomalib_tiled.merge.merging import MergedBatch
from anomalib_tiled.progress import Task
from anomalib_tiled.run.directory import atomic_path, atomic_write_text
from anomalib_tiled.settings import VisualizationConfig
from anomalib_tiled.sinks.visualization import ResultPicture, ResultVisualizer, output_name
from anomalib_tiled.tiling import TileGrid

CSV_COLUMNS = ["image_path", "pred_score", "pred_label", "gt_label", "result_image", "anomaly_map"]


@dataclass
class Prediction:
    """Merged prediction of one image written by ``TiledEnsembleEngine.predict``.

    Attributes:
        image_path: Source image.
        pred_score: Image anomaly score.
        pred_label: Predicted label (True = anomalous), or None without thresholds.
        anomaly_map_path: ``.npy`` file with the full-resolution anomaly map.
        image_file: Result picture, or None when visualisation is off.
    """

    image_path: str
    pred_score: float
    pred_label: bool | None
    anomaly_map_path: Path
    image_file: Path | None

    @property
    def anomaly_map(self) -> np.ndarray:
        """The anomaly map (loaded on access, so many predictions do not fill RAM)."""
        return np.load(self.anomaly_map_path)


class Sink(Protocol):
    """Consumer of merged predictions."""

    def update(self, batch: MergedBatch) -> None:
        """Take one batch."""


def stream(batches: Iterable[MergedBatch], sinks: list[Sink], task: Task) -> None:
    """Feed every merged batch to every sink, reporting progress in images."""
    for batch in batches:
        for sink in sinks:
            sink.update(batch)
        task.advance(len(batch.image_path))


class OutputWriter:
    """Writes ``predictions.csv``, result pictures and (for ``predict``) the anomaly maps.

    Use it as a context manager: pictures are drawn by a small thread pool while merging goes on.

    Args:
        output: Output folder (``eval/vN`` or ``predict/vN``).
        grid: Tile grid, drawn on the pictures.
        visualization: Picture settings.
        display_range: Anomaly-map values mapped to the ends of the colour map.
        maps_dir: Where anomaly maps go as ``.npy`` files, or None not to keep them.
    """

    def __init__(
        self,
        output: Path,
        grid: TileGrid,
        visualization: VisualizationConfig,
        display_range: tuple[float, float],
        maps_dir: Path | None = None,
    ) -> None:
        self.output = output
        self.visualization = visualization
        self.maps_dir = maps_dir
        self.visualizer = ResultVisualizer(grid, visualization.max_side, visualization.grid, display_range)
        self.rows = io.StringIO()
        self.table = csv.writer(self.rows)
        self.table.writerow(CSV_COLUMNS)
        self.predictions: list[Prediction] = []
        self.index = 0

    def __enter__(self) -> OutputWriter:  # noqa: PYI034 - final in practice; Self needs Python 3.11
        self.visualizer.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.visualizer.__exit__(*exc_info)

    def update(self, batch: MergedBatch) -> None:
        """Write the outputs of one batch."""
        for offset, path in enumerate(batch.image_path):
            name = output_name(path, self.index)
            label = None if batch.pred_label is None else bool(batch.pred_label[offset])
            score = float(batch.pred_score[offset])
            picture = self._picture(batch, offset, name, score, label)
            map_file = self._map_file(batch, offset, name)
            if map_file is not None:
                self.predictions.append(Prediction(path, score, label, map_file, picture))
            self.table.writerow(
                [
                    path,
                    f"{score:.6f}",
                    "" if label is None else int(label),
                    "" if batch.gt_label is None else int(batch.gt_label[offset]),
                    "" if picture is None else picture.relative_to(self.output),
                    "" if map_file is None else map_file.relative_to(self.output),
                ]
            )
            self.index += 1

    def _picture(self, batch: MergedBatch, offset: int, name: str, score: float, label: bool | None) -> Path | None:
        if not self.visualization.save:
            return None
        picture = self.output / "images" / f"{name}.png"
        caption = f"score {score:.3f}" + ("" if label is None else f"  {'ANOMALOUS' if label else 'normal'}")
        self.visualizer.submit(
            ResultPicture(
                batch.image_path[offset],
                batch.anomaly_map[offset],
                None if batch.pred_mask is None else batch.pred_mask[offset],
                None if batch.gt_mask is None else batch.gt_mask[offset],
                caption,
                picture,
            ),
        )
        return picture

    def _map_file(self, batch: MergedBatch, offset: int, name: str) -> Path | None:
        if self.maps_dir is None:
            return None
        map_file = self.maps_dir / f"{name}.npy"
        with atomic_path(map_file) as temporary, temporary.open("wb") as handle:
            np.save(handle, batch.anomaly_map[offset].numpy())
        return map_file

    def finish(self) -> list[Prediction]:
        """Write ``predictions.csv``; the predictions whose maps were kept."""
        atomic_write_text(self.output / "predictions.csv", self.rows.getvalue())
        return self.predictions


def write_metrics(results: dict[str, float], directory: Path) -> None:
    """Write ``metrics.json`` and ``metrics.csv`` (atomically) into ``directory``."""
    atomic_write_text(directory / "metrics.json", json.dumps(results, indent=2) + "\n")
    rows = ["metric,value", *(f"{name},{value:.6f}" for name, value in results.items())]
    atomic_write_text(directory / "metrics.csv", "\n".join(rows) + "\n")
