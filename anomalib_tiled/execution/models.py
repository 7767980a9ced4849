"""Tile models: fresh anomalib models sized to the tiles, and trained ones loaded from checkpoints.

One fresh model per tile position is built from the configured class and init args with its
pre-processor sized to the tile. Post-processing, evaluation and visualisation of single tiles are
switched off in the tile models: the ensemble normalises, thresholds, evaluates and draws the
*merged* predictions itself. Only when a callback monitors an ``image_*``/``pixel_*`` metric (e.g.
``EarlyStopping(monitor=pixel_AUROC)``) does a tile model get an evaluator computing that metric on
its validation tiles.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.utils.serialization import anomalib_safe_globals

from anomalib_tiled.config.components import validation_metrics
from anomalib_tiled.config.model_spec import ModelSpec
from anomalib_tiled.errors import ConfigError
from anomalib_tiled.run.weights import SharedWeights, has_references, join
from anomalib_tiled.tiling import Size


class ModelFactory(ModelSpec):
    """Builds fresh tile models of one anomalib model class, and loads trained ones.

    Args:
        model_class: The anomalib model class.
        init_args: Keyword arguments of the model (``pre_processor`` may be given; the post-processor,
            evaluator and visualiser are the ensemble's).
    """

    def build(self, tile_size: Size, monitored_metrics: list[str]) -> AnomalibModule:
        """A new, untrained model for tiles of ``tile_size``.

        Args:
            tile_size: ``(height, width)`` of the tiles.
            monitored_metrics: ``image_<Metric>``/``pixel_<Metric>`` names callbacks monitor; the
                model computes them on its validation tiles.

        Raises:
            ConfigError: If the model rejects its init args.
        """
        kwargs = dict(self.init_args)
        if kwargs.get("pre_processor", True) is True:
            kwargs["pre_processor"] = _tile_pre_processor(self.model_class, tile_size)
        kwargs["post_processor"] = False
        kwargs["visualizer"] = False
        kwargs["evaluator"] = (
            Evaluator(val_metrics=validation_metrics(monitored_metrics)) if monitored_metrics else False
        )
        try:
            return self.model_class(**kwargs)
        except Exception as error:  # noqa: BLE001 - whatever the model raises, the cause is its init args
            detail = " ".join(str(error).split())
            msg = f"TrainModels.model.init_args: {self.name} cannot be built with {self.init_args}: {detail}"
            raise ConfigError(msg) from None

    def load(self, checkpoint: Path, tile_size: Size) -> AnomalibModule:
        """A trained tile model from its checkpoint (``weights_only=True`` through anomalib's loader).

        A checkpoint referencing shared weights is reassembled in memory first, so anomalib's
        loader gets the checkpoint as it was before its large tensors were shared.

        Args:
            checkpoint: The tile's checkpoint (verified, with its shared files, by the run directory).
            tile_size: ``(height, width)`` of the tiles: models whose layers depend on the input
                size (FastFlow) are built for it, as they were for training.

        Raises:
            RunDirectoryError: If a shared file the checkpoint references is missing or unreadable.
        """
        overrides: dict[str, Any] = {"post_processor": False, "evaluator": False, "visualizer": False}
        if self.init_args.get("pre_processor", True) is True:
            overrides["pre_processor"] = _tile_pre_processor(self.model_class, tile_size)
        # The checkpoint holds the weights: no need to fetch pretrained backbones again.
        if "pre_trained" in inspect.signature(self.model_class.__init__).parameters:
            overrides["pre_trained"] = False
        source = self._full_checkpoint(checkpoint)
        return self.model_class.load_from_checkpoint(source, map_location="cpu", weights_only=True, **overrides)

    def _full_checkpoint(self, checkpoint: Path) -> Path | io.BytesIO:
        """``checkpoint`` itself (runs without shared weights), else the full checkpoint in a buffer."""
        with anomalib_safe_globals(extra=self.model_class.checkpoint_safe_globals()):
            # Memory-mapped: only the references are read here, the tensors when they are copied.
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        if not has_references(state):
            return checkpoint
        buffer = io.BytesIO()
        torch.save(join(state, SharedWeights(checkpoint.parent), checkpoint), buffer)
        buffer.seek(0)
        return buffer


def _tile_pre_processor(model_class: type[AnomalibModule], tile_size: Size) -> Any:
    try:
        return model_class.configure_pre_processor(image_size=tile_size)
    except TypeError:
        return model_class.configure_pre_processor()
