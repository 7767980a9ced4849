"""Export a trained run as one deployable artifact: ``torch``, ``onnx`` or ``openvino``.

The artifact's single forward pass does everything ``predict`` does: resize to the trained image
size, cut the tiles, run every tile model (its pre-processing included), blend-merge, smooth the
seams, pool the image score, normalise with the statistics learned on validation and threshold.
:class:`anomalib_tiled.deploy.TiledInferencer` runs it; ``docs/deploy.md`` has the recipe.

Example:
    >>> from anomalib_tiled.export import export_run
    >>> export_run("results/Padim/MVTecAD/bottle/v0", "openvino")  # doctest: +SKIP
    PosixPath('results/Padim/MVTecAD/bottle/v0/export/v0')
"""

from anomalib_tiled.export.artifact import ArtifactMetadata, Compression, ExportFormat, read_metadata
from anomalib_tiled.export.exporter import export_run

__all__ = ["ArtifactMetadata", "Compression", "ExportFormat", "export_run", "read_metadata"]
