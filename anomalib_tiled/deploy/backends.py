"""Runtimes of the three artifact formats, behind one call: ``backend(images) -> {output name: array}``.

* ``torch``: the ``torch.export`` program (``torch.export.load(...).module()``);
* ``onnx``: an ONNX Runtime session (CPU, or CUDA when asked and available);
* ``openvino``: the IR compiled by OpenVINO for ``device`` (``CPU``, ``GPU``, ``NPU``, ``AUTO``).

OpenVINO's CPU plugin computes in bf16 on processors that support it unless told otherwise; the
artifact is run in the precision it was exported in (f32, also for fp16-compressed weights) unless
``config`` says otherwise, so that its results match ``predict``'s.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalib_tiled.errors import ExportError
from anomalib_tiled.export.artifact import INPUT_NAME, OUTPUT_NAMES, ArtifactMetadata, ExportFormat

Backend = Callable[[np.ndarray], dict[str, np.ndarray]]
OPENVINO_DEFAULTS = {"INFERENCE_PRECISION_HINT": "f32"}
_RUNTIMES = {ExportFormat.TORCH: "torch", ExportFormat.ONNX: "onnxruntime", ExportFormat.OPENVINO: "openvino"}


def open_backend(metadata: ArtifactMetadata, directory: Path, device: str, config: dict[str, Any] | None) -> Backend:
    """The runtime of the artifact's format, loaded for ``device``.

    Args:
        metadata: The artifact's metadata.
        directory: Its folder.
        device: ``CPU``, ``GPU``/``CUDA``, or any OpenVINO device name.
        config: OpenVINO properties, or ONNX Runtime session-option attributes.

    Raises:
        ExportError: If the runtime of the format is not installed.
    """
    export_format = ExportFormat(metadata.format)
    runtime = _RUNTIMES[export_format]
    if importlib.util.find_spec(runtime) is None:
        msg = (
            f"--model: {metadata.format} artifacts run on {runtime}, which is not installed; "
            "pip install 'anomalib-tiled[export]'"
        )
        raise ExportError(msg)
    path = directory / metadata.model_file
    if export_format == ExportFormat.TORCH:
        backend = _torch_backend(path, device)
    elif export_format == ExportFormat.ONNX:
        backend = _onnx_backend(path, device, config or {})
    else:
        backend = _openvino_backend(path, device, {**OPENVINO_DEFAULTS, **(config or {})})
    return backend if metadata.batch_size is None else _in_batches(backend, metadata.batch_size)


def _in_batches(backend: Backend, size: int) -> Backend:
    """Feed a graph fixed to ``size`` images per call (see ``ArtifactMetadata.batch_size``)."""

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        parts = [backend(images[start : start + size]) for start in range(0, len(images), size)]
        return {name: np.concatenate([part[name] for part in parts]) for name in OUTPUT_NAMES}

    return run


def _torch_backend(path: Path, device: str) -> Backend:
    target = torch.device("cuda" if device.upper() in {"GPU", "CUDA"} else "cpu")
    module = torch.export.load(path).module().to(target)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = module(torch.from_numpy(images).to(target))
        return {name: value.cpu().numpy() for name, value in zip(OUTPUT_NAMES, outputs, strict=True)}

    return run


def _onnx_backend(path: Path, device: str, config: dict[str, Any]) -> Backend:
    import onnxruntime as ort  # noqa: PLC0415 - optional dependency

    options = ort.SessionOptions()
    for name, value in config.items():
        setattr(options, name, value)
    providers = ["CPUExecutionProvider"]
    if device.upper() in {"GPU", "CUDA"} and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}), strict=True))

    return run


def _openvino_backend(path: Path, device: str, config: dict[str, Any]) -> Backend:
    import openvino as ov  # noqa: PLC0415 - optional dependency

    core = ov.Core()
    model = core.read_model(str(path))
    compiled = _StaticShapes(lambda shape: core.compile_model(_reshaped(model, shape), device, config))

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        target = compiled.for_shape(images.shape)
        result = target(images)
        return {name: result[target.output(name)] for name in OUTPUT_NAMES}

    return run


def _reshaped(model: Any, shape: tuple[int, ...] | None) -> Any:
    """The model with a static input shape (None: as exported, dynamic)."""
    if shape is None:
        return model
    static = model.clone()
    static.reshape({INPUT_NAME: list(shape)})
    return static


class _StaticShapes:
    """One compiled model at a time, for the shape of the latest input.

    OpenVINO's CPU plugin runs the artifact's resize and merge much faster with static shapes (the
    resize of a 900 px image took 9 ms instead of 16 ms), and a line feeds one camera resolution. A
    new shape recompiles (seconds); after ``MAX_SHAPES`` shapes the dynamic model serves them all.
    Only one compiled model is kept: each holds its own copy of the weights.
    """

    MAX_SHAPES = 4

    def __init__(self, compile_for: Callable[[tuple[int, ...] | None], Any]) -> None:
        self.compile_for = compile_for
        self.shape: tuple[int, ...] | None = ()
        self.seen = 0
        self.compiled: Any = None

    def for_shape(self, shape: tuple[int, ...]) -> Any:
        """The compiled model for inputs of ``shape``."""
        wanted = tuple(shape) if self.seen < self.MAX_SHAPES or self.shape == tuple(shape) else None
        if wanted != self.shape:
            self.compiled = None  # free the previous weights before compiling the next ones
            self.compiled = self.compile_for(wanted)
            self.shape = wanted
            self.seen += wanted is not None
        return self.compiled
