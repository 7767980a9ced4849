"""``TiledInferencer``: run an exported tiled ensemble like anomalib's ``OpenVINOInferencer``/``TorchInferencer``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import NumpyImageBatch
from PIL.Image import Image as PILImage
from torch.nn import functional as F  # noqa: N812

from anomalib_tiled.data.sources import as_rgb, read_rgb
from anomalib_tiled.deploy.backends import open_backend
from anomalib_tiled.errors import DataError
from anomalib_tiled.export.artifact import read_metadata
from anomalib_tiled.tiling import TileGrid

ImageInput = str | Path | np.ndarray | torch.Tensor | PILImage
"""One image: a file, an ``(H, W[, C])`` array or PIL image, a ``(C, H, W)`` tensor; or a batch of them."""


class TiledInferencer:
    """Predicts images with an exported tiled ensemble, on the backend its format calls for.

    Args:
        path: The folder written by ``anomalib tiled export`` (or its ``metadata.json`` or model file).
        device: ``CPU`` (default), ``GPU``/``CUDA``, or any OpenVINO device (``AUTO``, ``NPU``...).
        config: OpenVINO properties or ONNX Runtime session options (e.g. ``{"INFERENCE_PRECISION_HINT":
            "bf16"}`` to trade accuracy for speed on CPUs with bf16 units).

    Example:
        >>> inferencer = TiledInferencer("results/Padim/MVTecAD/bottle/v0/export/v0")  # doctest: +SKIP
        >>> result = inferencer.predict("bottle.png")  # doctest: +SKIP
        >>> result.pred_score, result.pred_label, result.anomaly_map.shape  # doctest: +SKIP
        (array([0.83], dtype=float32), array([ True]), (1, 900, 900))
    """

    def __init__(self, path: str | Path, device: str = "CPU", config: dict[str, Any] | None = None) -> None:
        self.metadata, self.directory = read_metadata(path)
        self.device = device
        self.backend = open_backend(self.metadata, self.directory, device, config)

    @property
    def grid(self) -> TileGrid:
        """The ensemble's tile grid (its ``image_size`` is the trained image size)."""
        return self.metadata.tile_grid

    def predict(self, image: ImageInput | Sequence[ImageInput]) -> NumpyImageBatch:
        """Predict one image or a batch of images of one size.

        Images are resized to the trained image size inside the artifact; maps and masks come back at
        the input resolution.

        Args:
            image: A file path, array, PIL image or tensor; a ``(B, C, H, W)`` tensor or array; or a
                list of those.

        Returns:
            ``NumpyImageBatch`` with ``image``, ``pred_score``, ``pred_label``, ``anomaly_map``,
            ``pred_mask`` and (for files) ``image_path``.

        Raises:
            DataError: If the images of a batch differ in size.
        """
        images, paths = as_batch(image)
        outputs = self.backend(images.numpy())
        size = tuple(images.shape[-2:])
        anomaly_map = torch.from_numpy(outputs["anomaly_map"]).float()
        pred_mask = torch.from_numpy(outputs["pred_mask"].astype(bool))
        if tuple(anomaly_map.shape[-2:]) != size:
            anomaly_map = F.interpolate(anomaly_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            pred_mask = F.interpolate(pred_mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()
        return NumpyImageBatch(
            image=images.numpy(),
            pred_score=outputs["pred_score"].astype(np.float32).reshape(-1),
            pred_label=outputs["pred_label"].astype(bool).reshape(-1),
            anomaly_map=anomaly_map.numpy(),
            pred_mask=pred_mask.numpy(),
            image_path=paths,
        )


def as_batch(image: ImageInput | Sequence[ImageInput]) -> tuple[torch.Tensor, list[str] | None]:
    """``(B, 3, H, W)`` float32 images in [0, 1], and the file paths when files were given.

    Raises:
        DataError: If the images differ in size.
    """
    items = list(image) if isinstance(image, list | tuple) else [image]
    paths = [str(item) for item in items] if all(isinstance(item, str | Path) for item in items) else None
    tensors: list[torch.Tensor] = []
    for item in items:
        tensor = read_rgb(item) if isinstance(item, str | Path) else _as_tensor(item)
        tensors.extend(tensor if tensor.ndim == 4 else [tensor])
    sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
    if len(sizes) > 1:
        msg = f"predict: the images of a batch must share one size, got {sizes}; predict them in batches of one size"
        raise DataError(msg)
    return torch.stack([as_rgb(t) for t in tensors]).float().contiguous(), paths


def _as_tensor(image: np.ndarray | torch.Tensor | PILImage) -> torch.Tensor:
    """A ``(C, H, W)`` or ``(B, C, H, W)`` float tensor in [0, 1] from an array, PIL image or tensor."""
    if isinstance(image, PILImage):
        image = np.asarray(image.convert("RGB"))
    # A copy of arrays: they may be read-only (PIL's are), which torch warns about.
    tensor = image if isinstance(image, torch.Tensor) else torch.tensor(image)
    if (
        isinstance(image, np.ndarray)
        and tensor.ndim >= 3
        and tensor.shape[-1] in {1, 3}
        and tensor.shape[-3] not in {1, 3}
    ):
        tensor = tensor.movedim(-1, -3)  # arrays are channel-last (H, W, C), as OpenCV and PIL give them
    if not tensor.is_floating_point():
        tensor = tensor.float() / 255
    return tensor
