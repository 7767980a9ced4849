"""An exported ensemble on disk: the model file(s) and ``metadata.json``, which says how to run them.

Layout of an export folder (``<run>/export/vN`` by default)::

    metadata.json             format, compression, tile grid, statistics, file names
    model.pt2                 --format torch     (torch.export program)
    model.onnx[.data]         --format onnx      (weights in model.onnx.data past the 2 GB protobuf limit)
    model.xml + model.bin     --format openvino  (OpenVINO IR)

The graph takes ``image``, a ``(B, 3, H, W)`` float batch in [0, 1] of any size, and returns
``anomaly_map`` and ``pred_mask`` ``(B, h, w)`` at the trained image size, ``pred_score`` and
``pred_label`` ``(B,)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from anomalib_tiled.errors import RunDirectoryError
from anomalib_tiled.run.directory import atomic_write_text
from anomalib_tiled.tiling import TileGrid

METADATA_FILE = "metadata.json"
METADATA_FORMAT = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "pred_score", "pred_label", "pred_mask")


class ExportFormat(str, Enum):
    """Artifact formats, named as anomalib's ``--export_type``."""

    TORCH = "torch"
    ONNX = "onnx"
    OPENVINO = "openvino"


class Compression(str, Enum):
    """Compression of OpenVINO artifacts, named as anomalib's ``CompressionType``.

    ``fp16`` and ``int8`` store the weights in 16 or 8 bits and compute in float; ``int8_ptq`` also
    quantises the activations of the feature extractors (NNCF post-training quantisation).
    """

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_PTQ = "int8_ptq"


MODEL_FILES = {ExportFormat.TORCH: "model.pt2", ExportFormat.ONNX: "model.onnx", ExportFormat.OPENVINO: "model.xml"}


@dataclass
class ArtifactMetadata:
    """What ``metadata.json`` holds.

    Attributes:
        format: ``torch``, ``onnx`` or ``openvino``.
        compression: ``none``, ``fp16`` or ``int8_ptq``.
        model_file: The model file, relative to the folder.
        model: Class path of the tile models.
        grid: ``image_size``, ``tile_size`` and ``stride`` of the tile grid.
        batch_size: Images per call the graph is fixed to, or None for any number.
        normalized: Whether maps and scores are on the normalised [0, 1] scale (0.5 is the threshold).
        display_range: Map values at the ends of the colour map of result pictures.
        visualization: The run's picture settings (``save``, ``max_side``, ``grid``).
        source: The run directory the artifact was exported from.
        versions: Versions of the libraries that exported it.
    """

    format: str
    compression: str
    model_file: str
    model: str
    grid: dict[str, list[int]]
    normalized: bool
    display_range: list[float]
    batch_size: int | None = None
    visualization: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=lambda: [INPUT_NAME])
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    metadata_format: int = METADATA_FORMAT

    @property
    def tile_grid(self) -> TileGrid:
        """The tile grid of the ensemble."""
        return TileGrid.create(self.grid["image_size"], self.grid["tile_size"], self.grid["stride"])

    def write(self, directory: Path) -> Path:
        """Write ``metadata.json`` into ``directory`` (atomically)."""
        path = directory / METADATA_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path


def grid_dict(grid: TileGrid) -> dict[str, list[int]]:
    """The tile grid as ``metadata.json`` spells it."""
    return {"image_size": list(grid.image_size), "tile_size": list(grid.tile_size), "stride": list(grid.stride)}


def read_metadata(path: str | Path) -> tuple[ArtifactMetadata, Path]:
    """Metadata and folder of an artifact given as its folder, its ``metadata.json`` or its model file.

    Raises:
        RunDirectoryError: If no readable ``metadata.json`` is found there.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    metadata_path = directory / METADATA_FILE
    fix = "pass the folder written by 'anomalib tiled export'"
    if not metadata_path.is_file():
        msg = f"--model: {path} is not an exported tiled ensemble (no {METADATA_FILE} beside it); {fix}"
        raise RunDirectoryError(msg)
    try:
        values = json.loads(metadata_path.read_text(encoding="utf-8"))
        metadata = ArtifactMetadata(**values)
    except (OSError, ValueError, TypeError) as error:
        msg = f"--model: {metadata_path} is unreadable ({' '.join(str(error).split())}); export the run again"
        raise RunDirectoryError(msg) from None
    if not (directory / metadata.model_file).is_file():
        msg = f"--model: {directory / metadata.model_file} is missing; {fix} with all its files"
        raise RunDirectoryError(msg)
    return metadata, directory
