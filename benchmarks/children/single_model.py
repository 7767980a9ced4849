"""Child process of the benchmark: one anomalib model on whole (downscaled) images, the accuracy reference.

Run by path (``python single_model.py --spec SPEC.json --result OUT.json``). It trains and tests one
model with plain ``anomalib.engine.Engine`` at ``image_size`` (e.g. 256 px: what a single model sees
without tiling) on the same data, seed and model arguments as the tiled runs, and writes the test
metrics and the wall-clock time at the end of fitting to ``OUT.json``.

``SPEC.json`` holds ``model`` (``{class_path, init_args}``), ``data`` (``{class_path, init_args}``),
``image_size`` (``[height, width]``), ``seed``, ``accelerator``, ``default_root_dir`` and optionally
``aupro``: with it the model's evaluator is anomalib's default four test metrics plus pixel AUPRO
(:func:`evaluators.build_evaluator`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any


def import_model_class(class_path: str) -> type:
    """Model class from ``Padim`` (a name in ``anomalib.models``) or ``package.module.Padim``."""
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name or "anomalib.models"), name)


def main() -> None:
    """Fit and test one model; write its metrics as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="JSON: model, data, image_size, seed, ...")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the metrics and timestamps")
    args = parser.parse_args()
    spec: dict[str, Any] = json.loads(args.spec.read_text(encoding="utf-8"))

    # Imported after parsing, so that --help and argument errors do not wait ~10 s for anomalib.
    from anomalib.data import get_datamodule  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    seed_everything(spec["seed"], workers=True)
    model_class = import_model_class(spec["model"]["class_path"])
    pre_processor = model_class.configure_pre_processor(image_size=tuple(spec["image_size"]))
    extra: dict[str, Any] = {}
    if spec.get("aupro"):
        from evaluators import build_evaluator  # noqa: PLC0415 - sibling module (run by path)

        extra["evaluator"] = build_evaluator(aupro=True)
    model = model_class(**spec["model"]["init_args"], pre_processor=pre_processor, **extra)
    datamodule = get_datamodule(spec["data"])
    engine = Engine(accelerator=spec["accelerator"], devices=1, default_root_dir=spec["default_root_dir"])
    result: dict[str, Any] = {"imported": time.time()}
    engine.fit(model=model, datamodule=datamodule)
    result["fit_end"] = time.time()
    (metrics,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    result["test_end"] = time.time()
    result["metrics"] = {name: float(value) for name, value in metrics.items()}
    args.result.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
