"""Child process of the benchmark: anomalib's built-in tiled ensemble, train then evaluate.

Run by path (``python upstream_tiled.py --config CFG --result OUT.json``) in a scratch working
directory, because anomalib's pipelines write ``runs/pipeline.log`` relative to the working
directory. It does what upstream's ``tools/tiled_ensemble`` scripts do: ``TrainTiledEnsemble().run``,
then ``EvalTiledEnsemble(root_dir).run`` on the same config, and writes the run directory and the
wall-clock time at each stage boundary to ``OUT.json``. Metrics are *not* taken from here: the
parent reads the ``metric_results.csv`` the evaluation pipeline writes, so a stage that failed
(which upstream only logs) shows up as missing metrics.

The one change to upstream's behaviour (``--pass-init-args``): anomalib 2.7's tiled-ensemble model
helper calls ``get_model(model_args, pre_processor=..., visualizer=False)``; when ``model_args`` has
``init_args``, ``get_model`` turns them into an OmegaConf ``DictConfig`` and merges the keyword
arguments into it, which fails because a ``PreProcessor`` is not a valid OmegaConf value. The patch
replaces the ``get_model`` name *inside* ``anomalib.pipelines.tiled_ensemble.components.utils.
helper_functions`` only (in this process only) with a wrapper that drops ``init_args`` from the spec
and passes them as keyword arguments instead, so the model receives exactly the configured
arguments. Nothing else is changed.

``--aupro`` (accuracy benchmark): upstream's metrics job computes the ``test_metrics`` of the tile
model's evaluator (``MetricsCalculationJobGenerator`` builds a throw-away tile model and takes its
``evaluator``). The same ``get_model`` wrapper then also passes ``evaluator=`` anomalib's default
four test metrics plus pixel ``AUPRO`` (:func:`evaluators.build_evaluator`), so upstream reports AUPRO
computed by anomalib's own metric on its merged predictions; training and merging are untouched.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def patch_get_model(*, pass_init_args: bool, aupro: bool) -> None:
    """Wrap ``get_model`` inside upstream's model helper (see the module docstring); no-op if neither flag."""
    if not (pass_init_args or aupro):
        return
    from anomalib.models import AnomalibModule, get_model  # noqa: PLC0415 - see main()
    from anomalib.pipelines.tiled_ensemble.components.utils import helper_functions  # noqa: PLC0415
    from evaluators import build_evaluator  # noqa: PLC0415 - sibling module (run by path)

    def wrapped_get_model(model: Any, *args: Any, **kwargs: Any) -> AnomalibModule:
        if aupro:
            kwargs.setdefault("evaluator", build_evaluator(aupro=True))
        if pass_init_args and isinstance(model, dict) and model.get("init_args"):
            spec = {key: value for key, value in model.items() if key != "init_args"}
            return get_model(spec, *args, **{**model["init_args"], **kwargs})
        return get_model(model, *args, **kwargs)

    helper_functions.get_model = wrapped_get_model


def main() -> None:
    """Train and evaluate upstream's tiled ensemble; write stage timestamps as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="upstream tiled-ensemble config (YAML)")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for run directory and timestamps")
    parser.add_argument("--pass-init-args", action="store_true", help="apply the init_args workaround")
    parser.add_argument("--aupro", action="store_true", help="also compute pixel AUPRO in the metrics job")
    args = parser.parse_args()

    # Imported after parsing, so that --help and argument errors do not wait ~10 s for anomalib.
    from anomalib.pipelines.tiled_ensemble import EvalTiledEnsemble, TrainTiledEnsemble  # noqa: PLC0415

    patch_get_model(pass_init_args=args.pass_init_args, aupro=args.aupro)
    pipeline_args = argparse.Namespace(config=args.config)
    result: dict[str, Any] = {"imported": time.time()}
    train = TrainTiledEnsemble()
    train.run(pipeline_args)
    result["train_end"] = time.time()
    result["root_dir"] = str(train.root_dir)
    EvalTiledEnsemble(train.root_dir).run(pipeline_args)
    result["eval_end"] = time.time()
    args.result.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
