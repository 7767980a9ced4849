"""Writers of the three artifact formats, following anomalib's ``ExportMixin`` conventions.

* ``torch``: the ``torch.export`` program itself (``model.pt2``), which runs without this package;
* ``onnx``: ``torch.onnx.export`` with the dynamo exporter, as anomalib 2.7 requires (opset 18). A
  protobuf file cannot exceed 2 GB, so large ensembles (many PatchCore or Padim tiles) keep their
  weights in ``model.onnx.data`` beside it;
* ``openvino``: the ONNX file converted by ``ov.convert_model`` and saved with ``ov.save_model``, as
  ``ExportMixin.to_openvino`` does; ``fp16`` compresses the weights (``compress_to_fp16``), ``int8``
  compresses them with NNCF's ``compress_weights``, ``int8_ptq`` quantises weights and activations
  with NNCF's post-training quantisation on quantisation images.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from anomalib_tiled.data.sources import read_rgb
from anomalib_tiled.errors import ExportError
from anomalib_tiled.export.artifact import INPUT_NAME, MODEL_FILES, OUTPUT_NAMES, Compression, ExportFormat

ONNX_OPSET = 18
ONNX_INLINE_LIMIT = 1_500_000_000
"""Weights (bytes) kept inside ``model.onnx``; beyond, they go to ``model.onnx.data`` (the protobuf
limit is 2 GB for the whole file, and the exporter's constant folding can add to the weights)."""

QUANTIZED_OPS = frozenset({"Convolution", "GroupConvolution"})
"""OpenVINO operations ``int8_ptq`` quantises (see :func:`_quantize`)."""

INT8_QUANTIZATION_IMAGES = 300
"""StageStats images NNCF reads at most (its own default ``subset_size``)."""


def save_torch(program: torch.export.ExportedProgram, directory: Path) -> Path:
    """Write ``model.pt2``."""
    path = directory / MODEL_FILES[ExportFormat.TORCH]
    torch.export.save(program, path)
    return path


def save_onnx(program: torch.export.ExportedProgram, directory: Path, example: tuple[torch.Tensor]) -> Path:
    """Write ``model.onnx`` (and ``model.onnx.data`` for ensembles past the protobuf limit).

    Args:
        program: The traced ensemble.
        directory: Output folder.
        example: The example input it was traced with.
    """
    path = directory / MODEL_FILES[ExportFormat.ONNX]
    weights = sum(t.numel() * t.element_size() for t in (*program.state_dict.values(), *program.constants.values()))
    # The exporter prints its progress to stdout, which belongs to the command's result.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            program,
            example,
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=weights > ONNX_INLINE_LIMIT,
            verbose=False,
        )
    return path


def save_openvino(
    program: torch.export.ExportedProgram,
    directory: Path,
    example: tuple[torch.Tensor],
    compression: Compression,
    quantization_images: Sequence[str] = (),
) -> Path:
    """Write ``model.xml`` and ``model.bin``, compressed as asked.

    Args:
        program: The traced ensemble.
        directory: Output folder.
        example: The example input it was traced with.
        compression: ``none``, ``fp16`` or ``int8_ptq``.
        quantization_images: Image files ``int8_ptq`` quantises activations on.
    """
    import openvino as ov  # noqa: PLC0415 - an optional dependency, loaded when asked for

    path = directory / MODEL_FILES[ExportFormat.OPENVINO]
    with tempfile.TemporaryDirectory() as onnx_directory:
        model = ov.convert_model(save_onnx(program, Path(onnx_directory), example))
        if compression in {Compression.INT8, Compression.INT8_PTQ}:
            model = _quantize(model, compression, quantization_images)
        ov.save_model(model, path, compress_to_fp16=compression == Compression.FP16)
    return path


def _quantize(model: object, compression: Compression, images: Sequence[str]) -> object:
    """NNCF int8 compression: the weights alone, or (``int8_ptq``) weights and activations measured on ``images``."""
    try:
        import nncf  # noqa: PLC0415 - an optional dependency, loaded when asked for
    except ImportError:
        msg = (
            f"--compression {compression.value}: NNCF is not installed; pip install 'anomalib-tiled[export]' (or nncf)"
        )
        raise ExportError(msg) from None
    if compression == Compression.INT8:
        return nncf.compress_weights(model)
    if not images:
        msg = "--compression int8_ptq: no quantisation images; pass --data with normal images of the product"
        raise ExportError(msg)
    dataset = nncf.Dataset(images[:INT8_QUANTIZATION_IMAGES], _quantization_input)
    # Only the convolutions of the feature extractors: the scoring after them (Padim's Mahalanobis
    # distances, PatchCore's neighbour search, merging, normalisation) amplifies int8 rounding most.
    others = {op.get_type_name() for op in model.get_ops()} - QUANTIZED_OPS  # type: ignore[attr-defined]
    ignored = nncf.IgnoredScope(types=sorted(others))
    return nncf.quantize(model, dataset, subset_size=min(len(images), INT8_QUANTIZATION_IMAGES), ignored_scope=ignored)


def _quantization_input(path: str) -> np.ndarray:
    return read_rgb(path)[None].numpy()


def write_model(
    program: torch.export.ExportedProgram,
    directory: Path,
    export_format: ExportFormat,
    example: tuple[torch.Tensor],
    compression: Compression = Compression.NONE,
    quantization_images: Sequence[str] = (),
) -> Path:
    """Write the artifact of ``export_format`` into ``directory``; the path of its model file."""
    if export_format == ExportFormat.TORCH:
        return save_torch(program, directory)
    if export_format == ExportFormat.ONNX:
        return save_onnx(program, directory, example)
    return save_openvino(program, directory, example, compression, quantization_images)
