"""Prediction store: raw tile predictions of a split, streamed to disk.

For every split and tile position the store holds ``<tile>.maps.npy`` (``N x tile_h x tile_w``
float32 anomaly maps) and ``<tile>.scores.npy`` (``N`` float32 scores), written batch by batch as a
Lightning callback receives them, so RAM does not grow with the number of images. A small
``<tile>.json`` written last (atomically) marks a tile complete and records which split it belongs
to (the split fingerprint) and the value range the binned metrics need.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn import functional as F  # noqa: N812

from anomalib_tiled.data.npyfile import NpyFile
from anomalib_tiled.run.directory import RunDirectory, atomic_write_text
from anomalib_tiled.tiling import TilePosition


class PredictionStore:
    """Tile predictions of one split.

    Args:
        directory: ``predictions/<split fingerprint>`` in the run.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def file_path(self, tile: str, kind: str) -> Path:
        """Path of one of a tile's files (``maps.npy``, ``scores.npy``, ``json``)."""
        return self.directory / f"{tile}.{kind}"

    def is_complete(self, tile: str, fingerprint: str) -> bool:
        """Whether predictions of ``tile`` exist for the split identified by ``fingerprint``."""
        meta = self.file_path(tile, "json")
        if not meta.is_file():
            return False
        info = json.loads(meta.read_text(encoding="utf-8"))
        return info.get("fingerprint") == fingerprint and all(
            self.file_path(tile, kind).is_file() for kind in ("maps.npy", "scores.npy")
        )

    def maps(self, tile: str) -> NpyFile:
        """Anomaly maps of a tile, ``(N, tile_h, tile_w)``."""
        return NpyFile(self.file_path(tile, "maps.npy"))

    def scores(self, tile: str) -> np.ndarray:
        """Scores of a tile, ``(N,)``."""
        return np.load(self.file_path(tile, "scores.npy"))

    def info(self, tile: str) -> dict[str, Any]:
        """Recorded value ranges and fingerprint of a tile."""
        return json.loads(self.file_path(tile, "json").read_text(encoding="utf-8"))

    def value_range(self, tiles: list[str], kind: str = "map") -> tuple[float, float]:
        """Smallest and largest stored map (or score) value over ``tiles``.

        Merged values are convex combinations of tile values (and seam smoothing keeps that), so
        this range bounds every merged value of the split.
        """
        infos = [self.info(tile) for tile in tiles]
        return min(i[f"{kind}_min"] for i in infos), max(i[f"{kind}_max"] for i in infos)

    def open_tile(self, tile: str, count: int, tile_size: tuple[int, int]) -> TileWriter:
        """Start (re)writing the predictions of one tile."""
        return TileWriter(self, tile, count, tile_size)

    def reader(self, tiles: list[str]) -> StoreReader:
        """Random access to the predictions of ``tiles``, image by image."""
        return StoreReader(self, tiles)


def run_store(run: RunDirectory, fingerprint: str) -> PredictionStore:
    """Store of a run's split; stored by split content, so identical splits (test = val) share it."""
    return PredictionStore(run.predictions_dir(fingerprint))


class StoreReader:
    """Reads all tile predictions of one image at a time; scores are loaded once (small)."""

    def __init__(self, store: PredictionStore, tiles: list[str]) -> None:
        self.maps = [store.maps(tile) for tile in tiles]
        self.scores = torch.from_numpy(np.stack([store.scores(tile) for tile in tiles], axis=1))

    def __len__(self) -> int:
        return len(self.scores)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps ``(n_tiles, tile_h, tile_w)`` and scores ``(n_tiles,)`` of image ``index``."""
        maps = np.stack([tile_maps.read(index)[0] for tile_maps in self.maps])
        return torch.from_numpy(maps), self.scores[index]


class TileWriter:
    """Writes one tile's predictions to partial files; :meth:`finish` publishes them."""

    def __init__(self, store: PredictionStore, tile: str, count: int, tile_size: tuple[int, int]) -> None:
        store.directory.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.tile = tile
        self.count = count
        self.tile_size = tile_size
        self.partial_maps = store.directory / f".{tile}.maps.npy.partial"
        self.maps = NpyFile.create(self.partial_maps, (count, *tile_size), np.float32)
        self.scores = np.full(count, np.nan, dtype=np.float32)
        self.cursor = 0
        self.range = {"map_min": math.inf, "map_max": -math.inf, "score_min": math.inf, "score_max": -math.inf}

    def write(self, anomaly_map: torch.Tensor | None, pred_score: torch.Tensor | None) -> None:
        """Append a batch of raw model outputs."""
        if anomaly_map is None:
            msg = f"{self.tile}: the model returned no anomaly_map; the tiled ensemble needs anomaly maps to merge"
            raise RuntimeError(msg)
        maps, scores = tile_outputs(
            anomaly_map.detach().float().cpu(),
            None if pred_score is None else pred_score.detach().float().cpu(),
            self.tile_size,
        )
        if self.cursor + len(maps) > self.count:
            msg = f"{self.tile}: received more predictions than the split's {self.count} images"
            raise RuntimeError(msg)
        self.maps.write(self.cursor, maps.numpy())
        self.scores[self.cursor : self.cursor + len(maps)] = scores.numpy()
        self.cursor += len(maps)
        for kind, values in (("map", maps), ("score", scores)):
            self.range[f"{kind}_min"] = min(self.range[f"{kind}_min"], float(values.min()))
            self.range[f"{kind}_max"] = max(self.range[f"{kind}_max"], float(values.max()))

    def finish(self, fingerprint: str) -> None:
        """Publish the files; fails if the split was not predicted completely."""
        if self.cursor != self.count:
            msg = f"{self.tile}: predicted {self.cursor} of {self.count} images"
            raise RuntimeError(msg)
        os.replace(self.partial_maps, self.store.file_path(self.tile, "maps.npy"))
        scores_path = self.store.file_path(self.tile, "scores.npy")
        partial_scores = scores_path.with_name(f".{scores_path.name}.partial")
        with partial_scores.open("wb") as handle:
            np.save(handle, self.scores)
        os.replace(partial_scores, scores_path)
        info = {"fingerprint": fingerprint, "count": self.count, **self.range}
        atomic_write_text(self.store.file_path(self.tile, "json"), json.dumps(info) + "\n")


def tile_outputs(
    anomaly_map: torch.Tensor, pred_score: torch.Tensor | None, tile_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A tile model's raw outputs as the ensemble merges them (exported graphs share this).

    Args:
        anomaly_map: ``(B, 1, h, w)`` or ``(B, h, w)`` map, at any resolution.
        pred_score: ``(B,)`` scores, or None (then the maximum of each map).
        tile_size: ``(tile_h, tile_w)`` of the tiles.

    Returns:
        ``(B, tile_h, tile_w)`` maps at the tile's resolution and ``(B,)`` scores.
    """
    maps = anomaly_map[:, 0] if anomaly_map.ndim == 4 else anomaly_map
    if tuple(maps.shape[-2:]) != tuple(tile_size):
        maps = F.interpolate(maps[:, None], size=tile_size, mode="bilinear", align_corners=False)[:, 0]
    scores = maps.amax(dim=(-2, -1)) if pred_score is None else pred_score.reshape(-1)
    return maps, scores


class TilePredictionWriter(Callback):
    """Lightning callback streaming a tile model's validation or predict outputs into the store.

    Validation outputs are captured while the model is being fitted, so the validation split is
    predicted once, by the validation loop itself. Each validation epoch rewrites the files, so the
    stored predictions are those of the final weights.

    Args:
        store: Store of the split.
        position: Tile position of the model.
        count: Number of images in the split.
        fingerprint: Identity of the split.
        stage: ``validate`` or ``predict``: the loop whose outputs are stored.
    """

    def __init__(
        self, store: PredictionStore, position: TilePosition, count: int, fingerprint: str, stage: str
    ) -> None:
        self.store = store
        self.position = position
        self.count = count
        self.fingerprint = fingerprint
        self.stage = stage
        self.writer: TileWriter | None = None
        self.last_written_step: int | None = None

    def _start(self) -> None:
        tile_size = (self.position.height, self.position.width)
        self.writer = self.store.open_tile(self.position.name, self.count, tile_size)

    def _write(self, outputs: Any, batch: Any) -> None:
        assert self.writer is not None
        source = outputs if getattr(outputs, "anomaly_map", None) is not None else batch
        self.writer.write(getattr(source, "anomaly_map", None), getattr(source, "pred_score", None))

    def _finish(self, trainer: Trainer) -> None:
        assert self.writer is not None
        self.writer.finish(self.fingerprint)
        self.writer = None
        self.last_written_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        if self.stage == "validate" and not trainer.sanity_checking:
            self._start()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        del pl_module, args
        if self.stage == "validate" and not trainer.sanity_checking:
            self._write(outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        if self.stage == "validate" and not trainer.sanity_checking:
            self._finish(trainer)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        if self.stage == "predict":
            self._start()

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        del trainer, pl_module, args
        if self.stage == "predict":
            self._write(outputs, batch)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        if self.stage == "predict":
            self._finish(trainer)


class GroupPredictionWriter(Callback):
    """Lightning callback streaming the predict outputs of tile models predicted together into the store.

    The module's ``predict_step`` returns one output per position, in the order of ``positions``;
    each position's files are written and published as :class:`TilePredictionWriter` does.

    Args:
        store: Store of the split.
        positions: Tile positions of the models, in the order of the outputs.
        count: Number of images in the split.
        fingerprint: Identity of the split.
    """

    def __init__(self, store: PredictionStore, positions: list[TilePosition], count: int, fingerprint: str) -> None:
        self.store = store
        self.positions = positions
        self.count = count
        self.fingerprint = fingerprint
        self.writers: list[TileWriter] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.writers = [self.store.open_tile(p.name, self.count, (p.height, p.width)) for p in self.positions]

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        del trainer, pl_module, batch, args
        for writer, output in zip(self.writers, outputs, strict=True):
            writer.write(output.anomaly_map, output.pred_score)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        for writer in self.writers:
            writer.finish(self.fingerprint)
        self.writers = []
