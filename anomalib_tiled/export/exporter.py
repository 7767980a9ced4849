"""``export_run``: a trained run in, one deployable artifact and its ``metadata.json`` out."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from anomalib_tiled.data.sources import collect_images
from anomalib_tiled.data.splits import SplitRecord
from anomalib_tiled.errors import ConfigError, ExportError, RunDirectoryError
from anomalib_tiled.execution.models import ModelFactory
from anomalib_tiled.execution.shared import share_extractor
from anomalib_tiled.export.artifact import ArtifactMetadata, Compression, ExportFormat, grid_dict
from anomalib_tiled.export.formats import write_model
from anomalib_tiled.export.graph import TiledEnsembleGraph, check_exportable, example_input, trace
from anomalib_tiled.merge.merging import build_merger
from anomalib_tiled.merge.statistics import Statistics, statistics_for
from anomalib_tiled.progress import ProgressListener
from anomalib_tiled.run.config import check_frozen, read_run_config
from anomalib_tiled.run.directory import RunDirectory
from anomalib_tiled.run.log import RunLog
from anomalib_tiled.run.store import run_store
from anomalib_tiled.settings import EnsembleSettings, enum_value

# What each format needs besides torch (the dynamo ONNX exporter needs onnxscript).
BACKEND_MODULES = {
    ExportFormat.TORCH: (),
    ExportFormat.ONNX: ("onnx", "onnxscript"),
    ExportFormat.OPENVINO: ("onnx", "onnxscript", "openvino"),
}


def export_run(
    root: str | Path | RunDirectory | None,
    export_format: str | ExportFormat = ExportFormat.OPENVINO,
    *,
    compression: str | Compression = Compression.NONE,
    output: str | Path | None = None,
    settings: EnsembleSettings | None = None,
    quantization_images: str | Path | None = None,
    progress: ProgressListener | None = None,
) -> Path:
    """Export a trained run as one artifact whose forward pass does everything ``predict`` does.

    Args:
        root: The run directory (None: an engine without a trained run, which is an error).
        export_format: ``torch``, ``onnx`` or ``openvino``.
        compression: ``none``; for OpenVINO also ``fp16``, ``int8`` (weights) or ``int8_ptq`` (weights and activations).
        output: Artifact folder (default: a new ``<run>/export/vN``).
        settings: Post-processing to export instead of the run's own (statistics are learned again).
        quantization_images: Images ``int8_ptq`` quantises activations on (default: the run's validation images).
        progress: Receives progress messages.

    Returns:
        The artifact folder (model file(s) and ``metadata.json``).

    Raises:
        ConfigError: On an unknown format or compression, or settings that change the trained run.
        ExportError: If a backend is missing or the tile models cannot be exported.
        RunDirectoryError: If ``root`` is not a trained run.
    """
    export_format = enum_value(ExportFormat, export_format, "--format")
    compression = enum_value(Compression, compression, "--compression")
    _check_options(export_format, compression)
    listener = progress or ProgressListener()
    run, settings, factory = _open_run(root, settings)
    directory = Path(output) if output is not None else run.new_output_dir("export")
    directory.mkdir(parents=True, exist_ok=True)
    with RunLog(run.log_path):
        statistics = statistics_for(run, settings, directory)
        graph = _graph(run, settings, factory, statistics)
        shared = f" ({graph.shared_tiles} sharing one feature extractor)" if graph.shared_tiles else ""
        listener.message(f"Tracing {len(settings.grid)} {factory.name} tile models{shared} into one graph")
        program, batch = trace(graph, factory.name)
        images = _quantization_images(run, quantization_images) if compression == Compression.INT8_PTQ else ()
        listener.message(f"Writing the {export_format.value} artifact")
        example = example_input(batch, settings.grid.image_size)
        model_file = write_model(program, directory, export_format, example, compression, images)
        metadata = _metadata(run, settings, factory, statistics, model_file, export_format, compression, batch)
        metadata.write(directory)
    listener.message(f"Exported to {directory}")
    return directory


def _open_run(
    root: str | Path | RunDirectory | None, settings: EnsembleSettings | None
) -> tuple[RunDirectory, EnsembleSettings, ModelFactory]:
    """The trained run, the settings to export (checked against the run's) and its exportable model."""
    if root is None:
        msg = "no trained run to export: call fit() first or create the engine with TiledEnsembleEngine.from_run(path)"
        raise RunDirectoryError(msg)
    run = RunDirectory.open(root.root if isinstance(root, RunDirectory) else root)
    trained = read_run_config(run)
    if settings is not None:
        check_frozen(trained, settings)
    factory = ModelFactory.from_spec(trained.model_spec)
    check_exportable(factory.model_class)
    return run, settings or trained.settings, factory


def _graph(
    run: RunDirectory, settings: EnsembleSettings, factory: ModelFactory, statistics: Statistics
) -> TiledEnsembleGraph:
    """The ensemble of the run's verified tile checkpoints, in eval mode.

    Checkpoints are loaded one at a time, each model keeping an identical extractor loaded before
    it instead of its own, so a shared extractor is in memory once.
    """
    grid = settings.grid
    extractors: dict[str, Any] = {}
    models = []
    for position in grid:
        model = factory.load(run.verify_checkpoint(position.name), (position.height, position.width)).eval()
        share_extractor(model, extractors)
        models.append(model)
    return TiledEnsembleGraph(models, build_merger(grid, settings.postprocessing), statistics)


def _check_options(export_format: ExportFormat, compression: Compression) -> None:
    if compression != Compression.NONE and export_format != ExportFormat.OPENVINO:
        msg = (
            f"--compression: {compression.value} compresses OpenVINO artifacts only; "
            "use --format openvino or --compression none"
        )
        raise ConfigError(msg)
    missing = [name for name in BACKEND_MODULES[export_format] if importlib.util.find_spec(name) is None]
    if missing:
        msg = (
            f"--format {export_format.value}: {', '.join(missing)} not installed; pip install 'anomalib-tiled[export]'"
        )
        raise ExportError(msg)


def _quantization_images(run: RunDirectory, quantization_images: str | Path | None) -> Sequence[str]:
    """Images int8 quantisation measures activations on: ``quantization_images``, else the validation images."""
    if quantization_images is not None:
        return collect_images(quantization_images)
    split = run.split_dir("val")
    paths = SplitRecord.load(split).image_paths if (split / "index.json").is_file() else []
    existing = [path for path in paths if Path(path).is_file()]
    if not existing:
        msg = "--data: the run's validation images are gone; pass --data with normal images of the product"
        raise ExportError(msg)
    return existing


def _display_range(run: RunDirectory, settings: EnsembleSettings, statistics: Statistics) -> list[float]:
    """Colour-map range of result pictures: [0, 1] when normalised, else the validation maps' range."""
    fingerprint = run.manifest().get("splits", {}).get("val")
    if statistics.normalized or fingerprint is None:
        return [0.0, 1.0]
    return list(run_store(run, fingerprint).value_range([position.name for position in settings.grid]))


def _metadata(
    run: RunDirectory,
    settings: EnsembleSettings,
    factory: ModelFactory,
    statistics: Statistics,
    model_file: Path,
    export_format: ExportFormat,
    compression: Compression,
    batch: int | None,
) -> ArtifactMetadata:
    visualization = settings.postprocessing.visualization
    return ArtifactMetadata(
        format=export_format.value,
        compression=compression.value,
        model_file=model_file.name,
        model=factory.spec["class_path"],
        grid=grid_dict(settings.grid),
        normalized=statistics.normalized,
        batch_size=batch,
        display_range=_display_range(run, settings, statistics),
        visualization={"save": visualization.save, "max_side": visualization.max_side, "grid": visualization.grid},
        source=str(run.root),
        versions={package: _version(package) for package in ("anomalib", "torch", "anomalib-tiled", "openvino")},
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
