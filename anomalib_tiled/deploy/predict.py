"""``anomalib tiled predict --model ARTIFACT``: what run-based ``predict`` writes, from an exported ensemble.

The outputs are those of :func:`anomalib_tiled.stages.predict.predict_images` — ``predictions.csv``,
``maps/*.npy`` and result pictures, written by the same :class:`~anomalib_tiled.sinks.outputs.OutputWriter`
— with maps at each image's own resolution (the inferencer's contract).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from anomalib_tiled.data.sources import collect_images, read_rgb
from anomalib_tiled.deploy.inferencer import TiledInferencer
from anomalib_tiled.merge.merging import MergedBatch
from anomalib_tiled.progress import ProgressListener, Task
from anomalib_tiled.run.directory import next_version_dir
from anomalib_tiled.settings import VisualizationConfig
from anomalib_tiled.sinks.outputs import OutputWriter, Prediction

BATCH_SIZE = 8
"""Images per call: enough for the runtimes to batch, few enough for flat memory."""


def predict_with_artifact(
    inferencer: TiledInferencer,
    data_path: str | Path,
    output: Path | None,
    listener: ProgressListener,
    visualization: dict | None = None,
) -> list[Prediction]:
    """Predict images into ``output`` (default: a new ``predict/vN`` beside the artifact).

    Args:
        inferencer: The loaded artifact.
        data_path: A folder (searched recursively), an image file, or a glob pattern.
        output: Output folder.
        listener: Progress reporting.
        visualization: Picture settings to change (``save``, ``max_side``, ``grid``); the run's otherwise.

    Returns:
        One :class:`~anomalib_tiled.sinks.outputs.Prediction` per image.
    """
    paths = collect_images(data_path)
    out = Path(output) if output is not None else next_version_dir(inferencer.directory / "predict")
    out.mkdir(parents=True, exist_ok=True)
    metadata = inferencer.metadata
    pictures = replace(VisualizationConfig(**metadata.visualization), **(visualization or {}))
    display_range = (metadata.display_range[0], metadata.display_range[1])
    with (
        OutputWriter(out, inferencer.grid, pictures, display_range, out / "maps") as writer,
        Task(listener, "Predicting images", len(paths)) as task,
    ):
        for chunk, images in same_size_batches(paths, BATCH_SIZE):
            result = inferencer.predict(images)
            writer.update(
                MergedBatch(
                    image_path=chunk,
                    anomaly_map=torch.from_numpy(result.anomaly_map),
                    pred_score=torch.from_numpy(result.pred_score),
                    pred_mask=torch.from_numpy(result.pred_mask),
                    pred_label=torch.from_numpy(result.pred_label),
                )
            )
            task.advance(len(chunk))
    predictions = writer.finish()
    listener.message(f"Predictions of {len(predictions)} images written to {out}")
    return predictions


def same_size_batches(paths: list[str], size: int) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """Consecutive images decoded in batches of at most ``size``, a new batch at every change of image size."""
    chunk: list[str] = []
    images: list[torch.Tensor] = []
    for path in paths:
        image = read_rgb(path)
        if images and (len(images) == size or image.shape != images[0].shape):
            yield chunk, images
            chunk, images = [], []
        chunk.append(path)
        images.append(image)
    if images:
        yield chunk, images
