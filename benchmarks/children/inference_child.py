"""Child process of the inference benchmark: time one contender on decoded images, write JSON.

Run by path (``python inference_child.py --kind KIND --target PATH --images DIR --result OUT.json``),
so that its peak memory is its own. Kinds:

* ``run``: run-based ``TiledEnsembleEngine.from_run(RUN).predict(...)`` (pictures off): latency is one
  ``predict`` call per image (tile models loaded in turn, as ``predict`` does), throughput one call on
  a folder of all the images;
* ``torch``, ``onnx``, ``openvino``: ``TiledInferencer(ARTIFACT).predict(...)`` on images decoded
  beforehand at their own resolution (the artifact resizes them): latency at batch 1, throughput at
  batch 8;
* ``floor_export``: anomalib's own ``to_openvino`` export of one tile model (tile 0 of the run);
* ``floor``: that single-tile OpenVINO model on tile-sized inputs, times the number of tiles: what
  the ensemble would cost if the tile models ran with no overhead at all;
* ``backbone``: the run's model class with its backbone, built for the whole image at full
  resolution: its feature extractor's pass over one image (torch, and OpenVINO converted from it):
  the floor of backbone work of any model at that resolution;
* ``weights``: bytes of the run's first tile model: its feature extractor's and everything else's.

Loading is not timed; two warm-up calls precede the timed ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WARMUP = 2
THROUGHPUT_BATCH = 8
OPENVINO_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}
KINDS = ("run", "torch", "onnx", "openvino", "floor_export", "floor", "backbone", "weights")


def timed(function: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``function`` after the warm-up calls."""
    for _ in range(WARMUP):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_artifact(target: Path, images: list[Path], repeats: int) -> dict[str, float]:
    """Latency (batch 1) and throughput (batch 8) of an exported ensemble."""
    from anomalib_tiled.data.sources import read_rgb  # noqa: PLC0415
    from anomalib_tiled.deploy import TiledInferencer  # noqa: PLC0415 - imported after parsing

    inferencer = TiledInferencer(target)
    decoded = [read_rgb(path) for path in images]
    latency = statistics.median(timed(lambda image=image: inferencer.predict(image), repeats) for image in decoded)
    batches = [decoded[start : start + THROUGHPUT_BATCH] for start in range(0, len(decoded), THROUGHPUT_BATCH)]
    total = timed(lambda: [inferencer.predict(batch) for batch in batches], max(1, repeats // 2))
    return {"latency_s": latency, "throughput_ips": len(decoded) / total}


def measure_run(target: Path, images: list[Path], repeats: int) -> dict[str, float]:
    """Latency and throughput of run-based ``predict`` (outputs written to a scratch folder)."""
    import dataclasses  # noqa: PLC0415

    from anomalib_tiled import TiledEnsembleEngine  # noqa: PLC0415
    from anomalib_tiled.run.config import read_run_config  # noqa: PLC0415
    from anomalib_tiled.run.directory import RunDirectory  # noqa: PLC0415
    from anomalib_tiled.settings import VisualizationConfig  # noqa: PLC0415

    settings = read_run_config(RunDirectory.open(target)).settings
    post = dataclasses.replace(settings.postprocessing, visualization=VisualizationConfig(save=False))
    engine = TiledEnsembleEngine.from_run(target, dataclasses.replace(settings, postprocessing=post))
    scratch = Path(tempfile.mkdtemp(prefix="run-predict-"))
    folder = scratch / "images"
    folder.mkdir()
    for image in images:
        shutil.copyfile(image, folder / image.name)
    try:
        latency = statistics.median(
            timed(lambda image=image: engine.predict(image, scratch / "out"), max(1, repeats // 4))
            for image in images[:2]
        )
        total = timed(lambda: engine.predict(folder, scratch / "out"), 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"latency_s": latency, "throughput_ips": len(images) / total}


def export_floor(target: Path, output: Path) -> dict[str, float]:
    """The OpenVINO export anomalib itself makes (``to_openvino``) of the run's first tile model, at the tile size."""
    import openvino as ov  # noqa: PLC0415

    from anomalib_tiled.execution.models import ModelFactory  # noqa: PLC0415
    from anomalib_tiled.run.config import read_run_config  # noqa: PLC0415
    from anomalib_tiled.run.directory import RunDirectory  # noqa: PLC0415

    run = RunDirectory.open(target)
    config = read_run_config(run)
    position = config.settings.grid.positions[0]
    tile = (position.height, position.width)
    model = ModelFactory.from_spec(config.model_spec).load(run.verify_checkpoint(position.name), tile).eval()
    path = model.to_openvino(output, input_size=tile)
    # anomalib traces with a batch of 2 so that dynamo keeps the batch symbolic; a model that branches
    # on the batch size (PatchCore) comes out fixed to batches of 2 instead: export it for batches of one.
    if ov.Core().read_model(path).input(0).get_partial_shape()[0].is_static:
        path = model.to_openvino(output, input_size=tile, onnx_kwargs={"dynamic_axes": {}})
    return {"tiles": len(config.settings.grid), "tile_height": tile[0], "tile_width": tile[1], "model": str(path)}


def measure_floor(target: Path, repeats: int) -> dict[str, float]:
    """One tile model (``floor_export``'s result in ``target``) times the number of tiles."""
    import numpy as np  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415

    spec = json.loads((target / "floor.json").read_text(encoding="utf-8"))
    compiled = ov.Core().compile_model(spec["model"], "CPU", OPENVINO_FP32)
    tiles, size = spec["tiles"], (spec["tile_height"], spec["tile_width"])
    one = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    latency = timed(lambda: compiled(one), repeats) * tiles
    if compiled.input(0).get_partial_shape()[0].is_static:  # exported for batches of one: 8 calls
        per_image = timed(lambda: [compiled(one) for _ in range(THROUGHPUT_BATCH)], repeats) / THROUGHPUT_BATCH * tiles
    else:
        batch = np.repeat(one, THROUGHPUT_BATCH, axis=0)
        per_image = timed(lambda: compiled(batch), repeats) / THROUGHPUT_BATCH * tiles
    return {"latency_s": latency, "throughput_ips": 1.0 / per_image}


def _extractor(target: Path, size: tuple[int, int] | None) -> tuple[Any, tuple[int, int]]:
    """The feature extractor of a model like the run's (built for ``size``, default the whole image), and the size."""
    from anomalib_tiled.execution.models import ModelFactory  # noqa: PLC0415
    from anomalib_tiled.run.config import read_run_config  # noqa: PLC0415
    from anomalib_tiled.run.directory import RunDirectory  # noqa: PLC0415

    config = read_run_config(RunDirectory.open(target))
    size = size or config.settings.grid.image_size
    model = ModelFactory.from_spec(config.model_spec).build(size, [])
    return model.model.feature_extractor.eval(), size


def measure_backbone(target: Path, repeats: int) -> dict[str, float]:
    """One pass of the run's backbone over a whole image at full resolution, torch and OpenVINO."""
    import openvino as ov  # noqa: PLC0415
    import torch  # noqa: PLC0415

    extractor, size = _extractor(target, None)
    image = torch.rand(1, 3, *size)
    with torch.no_grad():
        torch_latency = timed(lambda: extractor(image), repeats)
        compiled = ov.Core().compile_model(ov.convert_model(extractor, example_input=image), "CPU", OPENVINO_FP32)
    latency = timed(lambda: compiled(image.numpy()), repeats)
    return {"latency_s": latency, "torch_latency_s": torch_latency, "throughput_ips": 1.0 / latency}


def measure_weights(target: Path) -> dict[str, float]:
    """Bytes of the first tile model's tensors: its feature extractor's, and the rest (its own)."""
    from anomalib_tiled.execution.models import ModelFactory  # noqa: PLC0415
    from anomalib_tiled.run.config import read_run_config  # noqa: PLC0415
    from anomalib_tiled.run.directory import RunDirectory  # noqa: PLC0415

    run = RunDirectory.open(target)
    config = read_run_config(run)
    position = config.settings.grid.positions[0]
    model = ModelFactory.from_spec(config.model_spec).load(
        run.verify_checkpoint(position.name), (position.height, position.width)
    )
    state = model.state_dict()
    extractor = {f"model.feature_extractor.{key}" for key in model.model.feature_extractor.state_dict()}
    size = {key: value.numel() * value.element_size() for key, value in state.items()}
    backbone = sum(value for key, value in size.items() if key in extractor)
    return {"backbone_bytes": backbone, "own_bytes": sum(size.values()) - backbone}


def main() -> None:
    """Measure one contender; write its numbers as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--target", type=Path, required=True, help="run directory, artifact folder or floor folder")
    parser.add_argument("--images", type=Path, required=True, help="folder of the images to predict")
    parser.add_argument(
        "--run", type=Path, default=None, help="floor_export: the run whose first tile model is exported"
    )
    parser.add_argument("--count", type=int, default=16, help="images measured")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the numbers")
    args = parser.parse_args()
    images = sorted(p for p in args.images.rglob("*.png"))[: args.count]
    if args.kind == "run":
        result = measure_run(args.target, images, args.repeats)
    elif args.kind == "floor_export":
        result = export_floor(args.run, args.target)
        (args.target / "floor.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    elif args.kind == "floor":
        result = measure_floor(args.target, args.repeats)
    elif args.kind == "backbone":
        result = measure_backbone(args.target, args.repeats)
    elif args.kind == "weights":
        result = measure_weights(args.target)
    else:
        result = measure_artifact(args.target, images, args.repeats)
    args.result.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
