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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def pass_init_args_as_kwargs() -> None:
    """Make upstream's model helper accept ``TrainModels.model.init_args`` (see the module docstring)."""
    from anomalib.models import AnomalibModule, get_model  # noqa: PLC0415 - see main()
    from anomalib.pipelines.tiled_ensemble.components.utils import helper_functions  # noqa: PLC0415

    def get_model_with_init_args(model: Any, *args: Any, **kwargs: Any) -> AnomalibModule:
        if isinstance(model, dict) and model.get("init_args"):
            spec = {key: value for key, value in model.items() if key != "init_args"}
            return get_model(spec, *args, **{**model["init_args"], **kwargs})
        return get_model(model, *args, **kwargs)

    helper_functions.get_model = get_model_with_init_args


def main() -> None:
    """Train and evaluate upstream's tiled ensemble; write stage timestamps as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="upstream tiled-ensemble config (YAML)")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for run directory and timestamps")
    parser.add_argument("--pass-init-args", action="store_true", help="apply the init_args workaround")
    args = parser.parse_args()

    # Imported after parsing, so that --help and argument errors do not wait ~10 s for anomalib.
    from anomalib.pipelines.tiled_ensemble import EvalTiledEnsemble, TrainTiledEnsemble  # noqa: PLC0415

    if args.pass_init_args:
        pass_init_args_as_kwargs()
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
